"""Pneumonia detection from chest X-rays."""

from __future__ import annotations

from fl_models.base import FolderTask
from fl_models.pneumonia import dataset, evaluate, hyperparams, model
from fl_models.pneumonia.synthetic import CLASS_NAMES, SIZE


class PneumoniaTask(FolderTask):
    name = "pneumonia"
    class_names = CLASS_NAMES
    input_shape = (1, SIZE, SIZE)
    dataset_module = dataset
    model_module = model
    hyperparams_module = hyperparams
    evaluate_module = evaluate
