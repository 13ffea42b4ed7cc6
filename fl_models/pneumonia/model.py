"""The pneumonia network: the shared narrow 2-D CNN for DP-SGD on grey chest films."""

from __future__ import annotations

from torch import nn

from fl_models.cnn2d import dp_cnn
from fl_models.pneumonia.synthetic import CLASS_NAMES


def build_model() -> nn.Module:
    return dp_cnn(in_channels=1, num_classes=len(CLASS_NAMES))
