"""Symptom metrics (multiclass) and the Naive Bayes reference the target is set against.

Records are generated with symptoms independent given the disease, which is exactly
Naive Bayes's assumption; so Bernoulli Naive Bayes is close to the best possible
classifier here and the network is judged by its gap to it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.naive_bayes import BernoulliNB
from torch.utils.data import TensorDataset

from fl_models.metrics import confusion_matrix, multiclass_metrics, predict
from fl_models.symptom.vocabulary import DISEASES


def evaluate(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> dict[str, float]:
    probs, labels, loss = predict(model, dataset, batch_size)
    return multiclass_metrics(labels, probs, loss)


def confusion(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
) -> list[list[int]]:
    return confusion_matrix(model, dataset, len(DISEASES), batch_size)


def naive_bayes_metrics(train: TensorDataset, test: TensorDataset) -> dict[str, float]:
    """Bernoulli Naive Bayes fitted on `train`, scored on `test` with the same metrics."""
    x_train, y_train = (t.numpy() for t in train.tensors)
    x_test, y_test = (t.numpy() for t in test.tensors)
    model = BernoulliNB().fit(x_train, y_train)
    probs = np.zeros((len(x_test), len(DISEASES)))
    probs[:, model.classes_] = model.predict_proba(x_test)
    picked = np.clip(probs[np.arange(len(y_test)), y_test], 1e-12, 1.0)
    return multiclass_metrics(y_test, probs, float(-np.log(picked).mean()))
