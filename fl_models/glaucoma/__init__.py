"""Glaucoma detection from colour fundus photographs (vertical cup-to-disc ratio)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fl_models.base import Task
from fl_models.glaucoma import dataset as _dataset
from fl_models.glaucoma import evaluate as _evaluate
from fl_models.glaucoma import hyperparams as _hyperparams
from fl_models.glaucoma import model as _model
from fl_models.glaucoma.synthetic import CLASS_NAMES, SIZE


class GlaucomaTask(Task):
    name = "glaucoma"

    def __init__(self, samples: int = _dataset.DEFAULT_SAMPLES) -> None:
        self.samples = samples
        self.class_names = CLASS_NAMES
        self.input_shape = (3, SIZE, SIZE)
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
        _dataset.prepare(out_dir, clients, alpha, seed, self.samples)
