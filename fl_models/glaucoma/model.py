"""The glaucoma network: the shared small 2-D CNN on RGB fundus images."""

from __future__ import annotations

from torch import nn

from fl_models.cnn2d import small_cnn
from fl_models.glaucoma.synthetic import CLASS_NAMES


def build_model() -> nn.Module:
    return small_cnn(in_channels=3, num_classes=len(CLASS_NAMES))
