"""The small 2-D CNN the image tasks share (glaucoma: RGB fundus, pneumonia: grey X-ray).

Full resolution in the first block (the optic cup and a focal opacity are a few
pixels across at 64x64), then a max-pool per block; GroupNorm instead of BatchNorm so
Opacus can compute per-example gradients; global average pooling, so the network
does not care where in the image the disc or the opacity lies. Average and max
pooling are concatenated: the finding (a cup, an opacity) covers a few percent of the
image, and an average alone dilutes it into the background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

GROUPS = 8


class PerImageStandardise(nn.Module):
    """Zero mean, unit variance per image (over all channels and pixels), no parameters.

    Exposure and contrast differ between devices and between films; removing them
    inside the network means every data path (PNG, DICOM, .npz) gets it for free,
    and the first convolution learns shapes rather than brightness. It more than
    halved the epochs the pneumonia network needed to leave its initial plateau.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-5)


class AvgMaxPool2d(nn.Module):
    """Concatenated global average and max over space: [n, c, h, w] -> [n, 2c]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def small_cnn(
    in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 64)
) -> nn.Module:
    layers: list[nn.Module] = [PerImageStandardise()]
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
    layers += [AvgMaxPool2d(), nn.Linear(2 * c_in, num_classes)]
    return nn.Sequential(*layers)
