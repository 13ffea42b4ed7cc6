"""The ECG network: a 1-D CNN with GroupNorm over a 10 s, 100 Hz window.

Six stride-2 blocks see about 3.8 s of signal per output position, enough to
compare several RR intervals (atrial fibrillation); global max pooling keeps a
single premature beat from being averaged away, global average pooling keeps the
overall rhythm. GroupNorm instead of BatchNorm: per-example, so Opacus can clip
per-example gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from fl_models.ecg.synthetic import CLASS_NAMES

CHANNELS = (16, 32, 32, 64, 64, 64)
KERNEL = 7
GROUPS = 8


class AvgMaxPool1d(nn.Module):
    """Concatenated global average and max over time: [n, c, t] -> [n, 2c]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv1d(c_in, c_out, KERNEL, stride=2, padding=KERNEL // 2, bias=False),
        nn.GroupNorm(min(GROUPS, c_out), c_out),
        nn.ReLU(),
    ]


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 1
    for c_out in CHANNELS:
        layers += _block(c_in, c_out)
        c_in = c_out
    layers += [AvgMaxPool1d(), nn.Linear(2 * c_in, len(CLASS_NAMES))]
    return nn.Sequential(*layers)
