"""Breast cancer training defaults, sized for a hospital holding ~100-400 cases."""

from __future__ import annotations

from fl_models.base import HyperParams

# Epochs for the centralised baseline (fl_models.train); the data set is tiny.
BASELINE_EPOCHS = 15


def hyperparams() -> HyperParams:
    return HyperParams(
        local_epochs=5,
        batch_size=32,
        learning_rate=0.05,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        target_epsilon=8.0,
        delta=1e-5,
        optimizer="sgd",
        momentum=0.9,
    )
