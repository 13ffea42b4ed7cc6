"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries").

With ``n`` clients of which at most ``f`` are Byzantine, each client's score is
the sum of squared L2 distances from its delta to its ``n - f - 2`` nearest other
deltas. Krum applies the single lowest-scoring delta; Multi-Krum averages the
``m`` lowest-scoring ones (unweighted, as in the paper). An outlier is far from
every honest update, so its score is large and it is not selected. The guarantee
needs ``n > 2f + 2``.

Distances are accumulated tensor by tensor and slice by slice from the
memory-mapped deltas, in float64, so the full models are never in memory at once.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fl_server.strategies.base import StrategyError, accumulation_dtype, check_int
from fl_server.strategies.coordinatewise import BufferedStrategy, stacked_slices


class Krum(BufferedStrategy):
    name: ClassVar[str] = "krum"
    equal_weights: ClassVar[bool] = True

    def __init__(self, f: int = 1, m: int | None = 1) -> None:
        super().__init__()
        self.f = check_int("f", f, minimum=0)
        # None: Multi-Krum's usual choice m = n - f, known only at finish.
        self.m = None if m is None else check_int("m", m, minimum=1)
        self.selected: list[str] = []

    def _on_begin(self) -> None:
        super()._on_begin()
        self.selected = []

    def pairwise_squared_distances(self) -> torch.Tensor:
        """``(n, n)`` float64 matrix of squared L2 distances between the accepted deltas."""
        n = self.num_accepted
        dist = torch.zeros((n, n), dtype=torch.float64)
        for name in self._float_tensor_names:
            for _, _, block in stacked_slices(self._deltas, name, torch.float64, self.slice_bytes):
                for i in range(n):
                    dist[i] += (block - block[i]).square_().sum(dim=1)
        return dist

    def scores(self, dist: torch.Tensor) -> torch.Tensor:
        """Krum score per client: sum of its ``n - f - 2`` smallest distances to others."""
        n = dist.shape[0]
        nearest = n - self.f - 2
        # Column 0 of the sorted row is the zero distance to itself.
        return dist.sort(dim=1).values[:, 1 : 1 + nearest].sum(dim=1)

    def _aggregate(self) -> dict[str, torch.Tensor]:
        n = self.num_accepted
        if n <= 2 * self.f + 2:
            raise StrategyError(
                f"{self.name} with f={self.f} needs more than 2f+2={2 * self.f + 2} updates, "
                f"got {n}"
            )
        m = n - self.f if self.m is None else self.m
        if m > n - self.f:
            raise StrategyError(
                f"{self.name}: m={m} would select more than the n-f={n - self.f} updates "
                "that can be honest"
            )
        scores = self.scores(self.pairwise_squared_distances())
        # Stable sort: ties go to the earlier report, so the result is deterministic.
        chosen = sorted(scores.argsort(stable=True)[:m].tolist())
        self.selected = [self._client_ids[i] for i in chosen]
        picked = [self._deltas[i] for i in chosen]
        global_state = self._global_state()
        out: dict[str, torch.Tensor] = {}
        for name in self._float_tensor_names:
            g = global_state[name]
            dtype = accumulation_dtype(g.dtype)
            result = torch.empty(g.numel(), dtype=dtype)
            for start, stop, block in stacked_slices(picked, name, dtype, self.slice_bytes):
                result[start:stop] = block.mean(dim=0)
            out[name] = result.reshape(g.shape)
        return out


class MultiKrum(Krum):
    """Multi-Krum; ``m=None`` selects ``n - f`` updates."""

    name: ClassVar[str] = "multi_krum"
    equal_weights: ClassVar[bool] = True

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f=f, m=m)
