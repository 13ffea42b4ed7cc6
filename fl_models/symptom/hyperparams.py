"""Symptom training defaults: ~1,000 records per hospital, 41 classes."""

from __future__ import annotations

from fl_models.base import HyperParams

BASELINE_EPOCHS = 30


def hyperparams() -> HyperParams:
    return HyperParams(
        local_epochs=3,
        batch_size=64,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        target_epsilon=8.0,
        delta=1e-5,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=1e-4,
    )
