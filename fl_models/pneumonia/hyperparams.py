"""Pneumonia training defaults: ~800 films per hospital, binary."""

from __future__ import annotations

from fl_models.base import HyperParams

BASELINE_EPOCHS = 20


def hyperparams() -> HyperParams:
    return HyperParams(
        local_epochs=2,
        batch_size=64,
        learning_rate=0.001,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        target_epsilon=8.0,
        delta=1e-5,
        optimizer="adam",
    )
