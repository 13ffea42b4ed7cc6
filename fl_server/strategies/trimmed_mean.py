"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning").

For each coordinate, the ``k = floor(beta * n)`` largest and ``k`` smallest client
values are dropped and the rest averaged. Up to ``k`` Byzantine clients per side
are discarded outright, while the mean of the remaining values keeps more of the
honest signal than the median does.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fl_server.strategies.base import check_fraction
from fl_server.strategies.coordinatewise import BufferedStrategy


class TrimmedMean(BufferedStrategy):
    name: ClassVar[str] = "trimmed_mean"
    equal_weights: ClassVar[bool] = True

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        # beta >= 0.5 would trim every value of some coordinate.
        self.beta = check_fraction("beta", beta, 0.0, 0.5, high_open=True)

    def trim_count(self, n: int) -> int:
        """Values dropped at each end for ``n`` clients."""
        # The epsilon keeps e.g. 0.29 * 100 (28.999...) from trimming one value too few.
        return math.floor(self.beta * n + 1e-9)

    def _aggregate(self) -> dict[str, torch.Tensor]:
        n = self.num_accepted
        k = self.trim_count(n)

        def reduce(block: torch.Tensor) -> torch.Tensor:
            if k == 0:
                return block.mean(dim=0)
            return block.sort(dim=0).values[k : n - k].mean(dim=0)

        return self._per_coordinate(reduce)
