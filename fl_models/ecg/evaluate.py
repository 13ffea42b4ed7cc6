"""ECG metrics: multiclass (normal, af, pvc)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from fl_models.ecg.synthetic import CLASS_NAMES
from fl_models.metrics import confusion_matrix, multiclass_metrics, predict


def evaluate(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> dict[str, float]:
    probs, labels, loss = predict(model, dataset, batch_size)
    return multiclass_metrics(labels, probs, loss)


def confusion(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> list[list[int]]:
    return confusion_matrix(model, dataset, len(CLASS_NAMES), batch_size)
