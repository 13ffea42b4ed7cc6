"""Breast cancer metrics: binary, malignant (class 1) as the positive finding."""

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


def logistic_regression_metrics(train: TensorDataset, test: TensorDataset) -> dict[str, float]:
    """A linear reference (scikit-learn logistic regression) on the same standardised data.

    The Wisconsin features are close to linearly separable, so the MLP should match it;
    a clear gap points at the training setup rather than the data.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = (t.numpy() for t in train.tensors)
    x_test, y_test = (t.numpy() for t in test.tensors)
    probs = LogisticRegression(max_iter=2000).fit(x_train, y_train).predict_proba(x_test)
    picked = np.clip(probs[np.arange(len(y_test)), y_test], 1e-12, 1.0)
    return binary_metrics(y_test, probs, float(-np.log(picked).mean()))
