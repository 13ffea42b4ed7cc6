"""Shared evaluation: one forward pass, then scikit-learn's metrics.

Every task reports through these functions so a number called "accuracy" means the
same thing for all five models and for the federation's reports.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn import metrics as skm
from torch.utils.data import DataLoader, TensorDataset


def predict(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities, true labels and the mean cross-entropy over `dataset`.

    The model is put in eval mode for the pass and restored afterwards, because the
    federation evaluates the same module it is about to keep training.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for inputs, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                logits = model(inputs.to(device)).float()
                targets = targets.to(device)
                loss_sum += torch.nn.functional.cross_entropy(
                    logits, targets, reduction="sum"
                ).item()
                probs.append(torch.softmax(logits, dim=1).cpu().numpy())
                labels.append(targets.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probs), np.concatenate(labels), loss_sum / len(dataset)


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def binary_metrics(labels: np.ndarray, probs: np.ndarray, loss: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUROC, sensitivity, specificity and loss.

    Class 1 is the finding (malignant, glaucoma, pneumonia). AUROC is NaN when the
    labels hold a single class, where it is undefined, rather than a made-up 0.5.
    """
    predicted = probs.argmax(axis=1)
    matrix = skm.confusion_matrix(labels, predicted, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": _balanced_accuracy(labels, predicted),
        "auroc": float(skm.roc_auc_score(labels, probs[:, 1])) if both_classes else math.nan,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "loss": float(loss),
    }


def multiclass_metrics(labels: np.ndarray, probs: np.ndarray, loss: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 and loss.

    Macro F1 averages over the classes present in the labels or the predictions: a
    small hospital's test split rarely holds all 41 diseases, and a class that is
    neither there nor predicted says nothing about the model.
    """
    predicted = probs.argmax(axis=1)
    present = np.unique(np.concatenate([labels, predicted]))
    return {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": _balanced_accuracy(labels, predicted),
        "macro_f1": float(
            skm.f1_score(labels, predicted, labels=present, average="macro", zero_division=0)
        ),
        "loss": float(loss),
    }


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    # scikit-learn warns (and still answers) when a predicted class is absent from the
    # labels, which is routine on a small hospital's test split.
    recalls = [float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls))


def confusion_matrix(
    model: torch.nn.Module, dataset: TensorDataset, num_classes: int, batch_size: int = 256
) -> list[list[int]]:
    """Rows are true classes, columns predicted ones, both in class-index order."""
    probs, labels, _ = predict(model, dataset, batch_size)
    matrix = skm.confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(num_classes)))
    return [[int(v) for v in row] for row in matrix]
