"""Central (client-level) differential privacy: DP-FedAvg with fixed clipping
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models").

Each client's delta is clipped to L2 norm ``clip`` and the clipped deltas are
summed with equal weight (example counts would let one client buy influence and
would break the sensitivity bound); Gaussian noise of standard deviation
``noise_multiplier * clip`` is added to every coordinate of the sum, which is then
divided by the number of updates. One client changes the sum by at most ``clip``,
so each round is a Gaussian mechanism on a sample of clients (rate ``sample_rate``,
the server's --fraction); Opacus's RDP accountant composes the rounds and the
epsilon at ``delta`` is reported with every round (``central_epsilon``).

This protects against what the released models reveal about any one hospital; it
complements, not replaces, each hospital's local DP. The noise comes from the OS's
random source, never from the job's seed.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from opacus.accountants import RDPAccountant

from fl_server.strategies.base import StrategyError, check_fraction, check_positive
from fl_server.strategies.norm_bounding import NormBounding


class DPFedAvg(NormBounding):
    name: ClassVar[str] = "dp_fedavg"
    streaming: ClassVar[bool] = True

    def __init__(self, clip: float = 1.0, noise_multiplier: float = 1.0,
                 sample_rate: float = 1.0, delta: float = 1e-5) -> None:
        super().__init__(bound=check_positive("clip", clip))  # named as the caller knows it
        self.noise_multiplier = check_positive("noise_multiplier", noise_multiplier)
        self.sample_rate = check_fraction("sample_rate", sample_rate, 0.0, 1.0, high_open=False)
        if self.sample_rate == 0.0:
            raise StrategyError("sample_rate must be > 0")
        self.delta = check_fraction("delta", delta, 0.0, 1.0, high_open=True)
        if self.delta == 0.0:
            raise StrategyError("delta must be > 0")
        self.rounds_done = 0

    def _fold(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> None:
        super()._fold(client_id, delta, 1)  # equal weights: the sensitivity is one clip

    def _aggregate(self) -> dict[str, torch.Tensor]:
        sums, self._sums = self._sums, {}
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        std = self.noise_multiplier * self.bound
        for t in sums.values():
            noise = torch.normal(0.0, std, size=t.shape, generator=generator, dtype=t.dtype)
            t.add_(noise).div_(self._weight_total)
        return sums

    def _commit(self) -> None:
        self.rounds_done += 1

    def epsilon(self, rounds: int | None = None) -> float:
        """Client-level epsilon at `delta` after `rounds` rounds (default: so far)."""
        steps = self.rounds_done if rounds is None else rounds
        if steps == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(self.delta))

    def round_metrics(self) -> dict[str, float]:
        return {"central_epsilon": self.epsilon(), "central_clipped": float(len(self.clipped))}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds_done": torch.tensor(self.rounds_done, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # type: ignore[override]
        unknown = sorted(set(state) - {"rounds_done"})
        if unknown:
            raise StrategyError(f"{self.name}: unknown server state entries {unknown}")
        self.rounds_done = int(state["rounds_done"]) if "rounds_done" in state else 0
