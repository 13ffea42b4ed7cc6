"""Breast cancer training defaults, tuned for DP-SGD on hospitals of ~40-180 cases.

- batch_size 512, above any hospital's size: Opacus then samples each case with
  probability 1 (one full, Poisson-sampled batch per epoch). With so few cases, the
  gradient's signal grows with the batch while the noise (noise multiplier x clip,
  per coordinate) does not, and privacy amplification by sampling buys little at
  these sizes, so fewer, fuller steps are the better trade.
- 3 local epochs a round (3 steps): with the demo's 4 rounds, 12 steps in the whole
  job, which the budget planner's noise multiplier (about 7 at epsilon 3) pays for.
- SGD, learning rate 0.5, momentum 0.9: large steps for a convex model with only a
  dozen noisy gradients to learn from.
- max_grad_norm 1.0: per-case gradients of the logistic loss are |p - y| x ||x||
  (||x|| ~ 5 for 30 standardised features), so most are clipped: each case then
  votes with a unit vector, the noise is calibrated to that vote.
- noise_multiplier / target_epsilon: the fallbacks when no job budget is given.
"""

from __future__ import annotations

from fl_models.base import HyperParams

# Epochs for the centralised baseline (fl_models.train): full-batch steps, so more.
BASELINE_EPOCHS = 60


def hyperparams() -> HyperParams:
    return HyperParams(
        local_epochs=3,
        batch_size=512,
        learning_rate=0.5,
        max_grad_norm=1.0,
        noise_multiplier=7.0,
        target_epsilon=3.0,
        delta=1e-5,
        optimizer="sgd",
        momentum=0.9,
    )
