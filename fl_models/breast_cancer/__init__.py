"""Breast cancer detection from the 30 Wisconsin Diagnostic features."""

from __future__ import annotations

from torch.utils.data import TensorDataset

from fl_models.base import FolderTask
from fl_models.breast_cancer import dataset, evaluate, hyperparams, model


class BreastCancerTask(FolderTask):
    name = "breast_cancer"
    class_names = dataset.CLASS_NAMES
    input_shape = (dataset.NUM_FEATURES,)
    dataset_module = dataset
    model_module = model
    hyperparams_module = hyperparams
    evaluate_module = evaluate

    def reference_metrics(
        self, train: TensorDataset, test: TensorDataset
    ) -> tuple[str, dict[str, float]]:
        return "logistic_regression", evaluate.logistic_regression_metrics(train, test)
