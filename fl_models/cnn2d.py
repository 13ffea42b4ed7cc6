"""The image tasks' former 2-D CNNs (glaucoma: RGB fundus, pneumonia: grey X-ray).

Since issue 13's third pass both tasks train a fixed scattering front end and a
linear head instead (fl_models/fixed_features.py: 0.96 / 0.89 at epsilon 8, against
0.65 / 0.74 for these). Kept for comparison and for networks trained without DP;
`small_cnn` was glaucoma's, `dp_cnn` (narrowed for DP-SGD, see below) pneumonia's.

small_cnn: full resolution in the first block (the optic cup and a focal opacity are a few
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
    c_in = _conv_stack(layers, in_channels, channels, GROUPS, nn.ReLU)
    layers += [AvgMaxPool2d(), nn.Linear(2 * c_in, num_classes)]
    return nn.Sequential(*layers)


def _conv_stack(layers: list[nn.Module], c_in: int, channels: Sequence[int], groups: int,
                activation: type[nn.Module]) -> int:
    """Appends conv -> GroupNorm -> activation blocks (a 2x2 max pool between them) to
    `layers`; returns the last block's channel count."""
    for i, c_out in enumerate(channels):
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(min(groups, c_out), c_out),
            activation(),
        ]
        c_in = c_out
    return c_in


DP_CHANNELS = (8, 16, 16)
DP_GROUPS = 4


def dp_cnn(
    in_channels: int, num_classes: int, channels: Sequence[int] = DP_CHANNELS
) -> nn.Module:
    """A narrow CNN for DP-SGD (about 3,500-3,800 parameters instead of 61,000).

    Why each choice (measured at epsilon 8 per hospital, 3 label-skewed hospitals;
    the pneumonia and glaucoma READMEs have the figures):
    - DP-SGD adds noise of the same size to every coordinate of the clipped gradient
      sum, so the noise norm grows with sqrt(parameters) while the signal does not:
      8-16-16 channels keep the noise a hospital's ~600 images can pay for.
    - A 2x2 average pool first (64 -> 32 pixels): a 4x cheaper per-sample gradient in
      the first convolution (Opacus unfolds its input per example), and at 32 pixels
      the cup and an opacity are still 3-5 pixels across.
    - tanh instead of ReLU (Papernot et al., "Tempered sigmoid activations for deep
      learning with differential privacy", AAAI 2021): bounded activations keep
      per-example gradient norms from exploding, so clipping distorts them less.
    - GroupNorm (no BatchNorm: Opacus needs per-example computation).
    - The pooled features are standardised per image (GroupNorm without parameters,
      average and max halves apart) before the linear head: otherwise their common
      mode acts as a second bias, and every noisy update of the head moved the
      decision threshold; under label skew the global model flipped between calling
      every image one class and the other from round to round (accuracy 0.5 at AUROC
      0.8). It still happens on the most skewed splits (see the READMEs).
    """
    layers: list[nn.Module] = [PerImageStandardise(), nn.AvgPool2d(2)]
    c_in = _conv_stack(layers, in_channels, channels, DP_GROUPS, nn.Tanh)
    layers += [AvgMaxPool2d(), nn.GroupNorm(2, 2 * c_in, affine=False),
               nn.Linear(2 * c_in, num_classes)]
    return nn.Sequential(*layers)
