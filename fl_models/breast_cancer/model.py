"""The breast cancer network: one hidden layer is enough for 30 standardised features."""

from __future__ import annotations

from torch import nn

from fl_models.breast_cancer.dataset import NUM_FEATURES

HIDDEN = 32


def build_model() -> nn.Module:
    """MLP 30 -> 32 -> 2 (logits for benign, malignant); plain Linear layers suit Opacus."""
    return nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
