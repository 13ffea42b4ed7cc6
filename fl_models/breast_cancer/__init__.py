"""Breast cancer detection from the 30 Wisconsin Diagnostic features."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fl_models.base import Task
from fl_models.breast_cancer import dataset as _dataset
from fl_models.breast_cancer import evaluate as _evaluate
from fl_models.breast_cancer import hyperparams as _hyperparams
from fl_models.breast_cancer import model as _model


class BreastCancerTask(Task):
    name = "breast_cancer"

    def __init__(self) -> None:
        self.class_names = _dataset.CLASS_NAMES
        self.input_shape = (_dataset.NUM_FEATURES,)
        self.hyperparams = _hyperparams.hyperparams()
        self.baseline_epochs = _hyperparams.BASELINE_EPOCHS

    def build_model(self) -> torch.nn.Module:
        return _model.build_model()

    def load_split(self, data_path: Path, split: str) -> TensorDataset:
        return _dataset.load_split(data_path, split)

    def evaluate(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> dict[str, float]:
        return _evaluate.evaluate(model, dataset, batch_size)

    def confusion(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> list[list[int]]:
        return _evaluate.confusion(model, dataset, batch_size)

    def prepare(self, out_dir: Path, clients: int, alpha: float | None, seed: int) -> None:
        _dataset.prepare(out_dir, clients, alpha, seed)

    def reference_metrics(
        self, train: TensorDataset, test: TensorDataset
    ) -> tuple[str, dict[str, float]]:
        return "logistic_regression", _evaluate.logistic_regression_metrics(train, test)
