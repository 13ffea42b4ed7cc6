"""The pneumonia network: the shared small 2-D CNN on grey chest films."""

from __future__ import annotations

from torch import nn

from fl_models.cnn2d import small_cnn
from fl_models.pneumonia.synthetic import CLASS_NAMES


def build_model() -> nn.Module:
    return small_cnn(in_channels=1, num_classes=len(CLASS_NAMES))
