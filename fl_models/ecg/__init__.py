"""ECG rhythm analysis: normal sinus rhythm, atrial fibrillation, premature ventricular beats."""

from __future__ import annotations

from fl_models.base import FolderTask
from fl_models.ecg import dataset, evaluate, hyperparams, model
from fl_models.ecg.synthetic import CLASS_NAMES, LENGTH


class EcgTask(FolderTask):
    name = "ecg"
    class_names = CLASS_NAMES
    input_shape = (1, LENGTH)
    dataset_module = dataset
    model_module = model
    hyperparams_module = hyperparams
    evaluate_module = evaluate
