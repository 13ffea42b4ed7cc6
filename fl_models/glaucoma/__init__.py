"""Glaucoma detection from colour fundus photographs (vertical cup-to-disc ratio)."""

from __future__ import annotations

from fl_models.base import FolderTask
from fl_models.glaucoma import dataset, evaluate, hyperparams, model
from fl_models.glaucoma.synthetic import CLASS_NAMES, SIZE


class GlaucomaTask(FolderTask):
    name = "glaucoma"
    class_names = CLASS_NAMES
    input_shape = (3, SIZE, SIZE)
    dataset_module = dataset
    model_module = model
    hyperparams_module = hyperparams
    evaluate_module = evaluate
