"""Glaucoma training defaults, tuned for DP-SGD (issue 13): ~60-1,700 photographs per
hospital, binary, epsilon 8 per hospital for the whole job.

The model is a fixed front end and one linear layer (model.py), so the loss is convex
and the best use of the budget is a few large, full steps:
- batch_size 4096: larger than any hospital here, so each local epoch is one step on
  the whole training set (sample rate 1; Opacus's Poisson sampling then takes every
  photograph). With one step a round, FedAvg of the hospitals' steps is one step of
  gradient descent on the pooled data, whatever the label skew: the skewed hospitals'
  pulls on the threshold cancel as they would in one data set. A hospital with more
  than 4,096 photographs takes several sampled steps instead.
- local_epochs 1, SGD lr 1.0 (no local momentum: one step), max_grad_norm 1.0; the
  demo runs 12 rounds with the server's fedavgm (beta 0.7, fl_demo/settings.py): 12
  momentum steps of centralised DP-SGD, each hospital's noise planned for epsilon 8
  over the 12 (about 2.2).
  In one process (the daemons' trainer, planner and PRV ledger), seeds 0-2: 0.959.
- noise_multiplier / target_epsilon: the fallbacks when no job budget is given.
"""

from __future__ import annotations

from fl_models.base import HyperParams

BASELINE_EPOCHS = 20


def hyperparams() -> HyperParams:
    return HyperParams(
        local_epochs=1,
        batch_size=4096,
        learning_rate=1.0,
        max_grad_norm=1.0,
        noise_multiplier=2.0,
        target_epsilon=8.0,
        delta=1e-5,
        optimizer="sgd",
        momentum=0.0,
    )
