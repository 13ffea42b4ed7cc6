"""Pneumonia metrics: binary, pneumonia (class 1) as the positive finding."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from fl_models.metrics import binary_metrics, confusion_matrix, predict


def evaluate(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> dict[str, float]:
    probs, labels, loss = predict(model, dataset, batch_size)
    return binary_metrics(labels, probs, loss)


def confusion(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> list[list[int]]:
    return confusion_matrix(model, dataset, num_classes=2, batch_size=batch_size)
