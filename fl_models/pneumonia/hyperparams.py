"""Pneumonia training defaults, tuned for DP-SGD (issue 13): ~60-1,700 films per
hospital, binary, epsilon 8 per hospital for the whole job.

The same recipe as glaucoma's (its hyperparams.py says why): a fixed front end and one
linear layer (model.py) trained by one full-batch DP step per hospital a round
(batch_size 4096, local_epochs 1, no local momentum, max_grad_norm 1.0), so that each
FedAvg round is one gradient step on the pooled films however skewed their labels;
the demo runs 15 rounds with the server's fedavgm (beta 0.7, fl_demo/settings.py).
SGD lr 2.0: in one process (the daemons' trainer, planner and PRV ledger), seeds 0-2,
12 rounds: lr 0.5 0.876, 1 0.877, 2 0.884, 3 0.891; 16 rounds at lr 2 0.891 (README.md).
noise_multiplier / target_epsilon: the fallbacks when no job budget is given.
"""

from __future__ import annotations

from fl_models.base import HyperParams

BASELINE_EPOCHS = 20


def hyperparams() -> HyperParams:
    return HyperParams(
        local_epochs=1,
        batch_size=4096,
        learning_rate=2.0,
        max_grad_norm=1.0,
        noise_multiplier=2.0,
        target_epsilon=8.0,
        delta=1e-5,
        optimizer="sgd",
        momentum=0.0,
    )
