"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning").

Each coordinate of the aggregate is the median of the clients' values there
(the mean of the two middle values for an even number of clients), so fewer than
half the clients, however extreme, cannot drag any coordinate outside the range
of the honest ones.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fl_server.strategies.coordinatewise import BufferedStrategy


def median_of_rows(block: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; numpy's convention (average of the middle pair) for even n."""
    n = block.shape[0]
    ordered = block.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) * 0.5


class Median(BufferedStrategy):
    name: ClassVar[str] = "median"
    equal_weights: ClassVar[bool] = True

    def _aggregate(self) -> dict[str, torch.Tensor]:
        return self._per_coordinate(median_of_rows)
