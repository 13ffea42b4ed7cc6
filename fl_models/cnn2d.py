"""The small 2-D CNN the image tasks share (glaucoma: RGB fundus, pneumonia: grey X-ray).

Full resolution in the first block (the optic cup and a focal opacity are a few
pixels across at 64x64), then a max-pool per block; GroupNorm instead of BatchNorm so
Opacus can compute per-example gradients; global average pooling, so the network
does not care where in the image the disc or the opacity lies.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

GROUPS = 8


def small_cnn(
    in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 64)
) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c_out in enumerate(channels):
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(min(GROUPS, c_out), c_out),
            nn.ReLU(),
        ]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
