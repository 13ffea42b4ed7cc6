"""Central (client-level) differential privacy: DP-FedAvg (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models"), with fixed or
adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping").

Each client's delta is clipped to L2 norm ``clip`` and the clipped deltas are
summed with equal weight (example counts would let one client buy influence and
would break the sensitivity bound); Gaussian noise of standard deviation
``noise_multiplier * clip`` is added to every coordinate of the sum, which is then
divided by the number of updates. One client changes the sum by at most ``clip``,
so each round is a Gaussian mechanism on a sample of clients (rate ``sample_rate``,
the server's --fraction); Opacus's RDP accountant composes the rounds and the
epsilon at ``delta`` is reported with every round (``central_epsilon``).

Adaptive clipping (``target_quantile`` > 0): a fixed clip is either too small
(updates lose their signal) or too large (noise drowns it), and the right value
changes as training converges. So the clip follows the ``target_quantile`` of the
update norms. Each round every client contributes the bit ``b = [norm <= clip]``;
the server releases the noised fraction ``b~ = (sum(b - 1/2) + N(0, sigma_b^2)) / m
+ 1/2`` (``m`` updates, ``sigma_b`` = ``count_noise``) and moves the clip
geometrically, ``clip *= exp(-clip_lr * (b~ - target_quantile))``: when more than
the target fraction fit under the clip it shrinks, when fewer fit it grows. The
centred bit has sensitivity 1/2, so the count is a Gaussian mechanism of noise
multiplier ``2 sigma_b``; the update sum's noise multiplier becomes
``sigma_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that the two Gaussian mechanisms
together are exactly one of multiplier ``z`` = ``noise_multiplier`` (their Renyi
divergences add: ``z^-2 = sigma_u^-2 + (2 sigma_b)^-2``, Andrew et al. Thm. 1).
The epsilon reported is therefore that of ``z`` over the rounds, the count included;
the price is a little more noise on the update (``count_noise`` = ``z``, the default,
costs 15%). With secure aggregation the bit would be summed with the update by the
hospitals that clip; here the server clips and counts.

This protects against what the released models reveal about any one hospital; it
complements, not replaces, each hospital's local DP. The noise comes from the OS's
random source, never from the job's seed.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import torch

from fl_server.strategies.base import StrategyError, check_fraction, check_positive
from fl_server.strategies.norm_bounding import NormBounding


class DPFedAvg(NormBounding):
    name: ClassVar[str] = "dp_fedavg"
    equal_weights: ClassVar[bool] = True
    streaming: ClassVar[bool] = True

    def __init__(self, clip: float = 1.0, noise_multiplier: float = 1.0,
                 sample_rate: float = 1.0, delta: float = 1e-5,
                 target_quantile: float = 0.0, clip_lr: float = 0.2,
                 count_noise: float = 0.0) -> None:
        super().__init__(bound=check_positive("clip", clip))  # named as the caller knows it
        self.noise_multiplier = check_positive("noise_multiplier", noise_multiplier)
        self.target_quantile = check_fraction("target_quantile", target_quantile, 0.0, 1.0,
                                              high_open=True)
        self.clip_lr = check_positive("clip_lr", clip_lr)
        self.count_noise = check_positive("count_noise", count_noise, allow_zero=True)
        if self.adaptive:
            self.count_noise = self.count_noise or self.noise_multiplier
            if 2 * self.count_noise <= self.noise_multiplier:
                raise StrategyError(
                    f"count_noise must be above noise_multiplier / 2 ({self.noise_multiplier / 2}),"
                    f" got {self.count_noise}: the clipped count alone would spend more than"
                    " the whole round's noise multiplier allows")
        self.unclipped: list[float] = []  # the round's bits, or its securely summed count
        self._next_fraction = math.nan
        self.last_fraction = math.nan  # the noised fraction released by the last round
        self.last_clip = self.bound
        self.sample_rate = check_fraction("sample_rate", sample_rate, 0.0, 1.0, high_open=False)
        if self.sample_rate == 0.0:
            raise StrategyError("sample_rate must be > 0")
        self.delta = check_fraction("delta", delta, 0.0, 1.0, high_open=True)
        if self.delta == 0.0:
            raise StrategyError("delta must be > 0")
        self.rounds_done = 0

    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    @property
    def update_noise_multiplier(self) -> float:
        """The update sum's share of ``z`` once the clipped count has taken its own."""
        if not self.adaptive:
            return self.noise_multiplier
        return float((self.noise_multiplier ** -2 - (2 * self.count_noise) ** -2) ** -0.5)

    def _on_begin(self) -> None:
        super()._on_begin()
        self.unclipped = []

    def _fold(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> None:
        super()._fold(client_id, delta, 1)  # equal weights: the sensitivity is one clip
        self.unclipped.append(0.0 if client_id in self.clipped else 1.0)

    def accept_sum(self, client_ids: list[str], sums: dict[str, torch.Tensor],
                   weight_total: float, unclipped_count: float | None = None) -> None:
        """Secure aggregation: the hospitals clipped and the server sees only the sum.
        For adaptive clipping the hospitals' bits must be summed securely with it
        (``unclipped_count``); without them this round's clip cannot move, and the
        round says so (``central_unclipped_fraction`` NaN) rather than guess."""
        super().accept_sum(client_ids, sums, weight_total)
        with self._lock:
            if unclipped_count is None:
                self.unclipped = []
                return
            m = len(client_ids)
            if not (math.isfinite(unclipped_count) and 0 <= unclipped_count <= m):
                raise StrategyError(f"unclipped_count must be in [0, {m}], got {unclipped_count}")
            # Only the sum matters (noised_fraction adds the bits), so spread it evenly.
            self.unclipped = [unclipped_count / m] * m

    def _aggregate(self) -> dict[str, torch.Tensor]:
        sums, self._sums = self._sums, {}
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        std = self.update_noise_multiplier * self.bound
        for t in sums.values():
            noise = torch.normal(0.0, std, size=t.shape, generator=generator, dtype=t.dtype)
            t.add_(noise).div_(self._weight_total)
        if self.adaptive:
            count_noise = float(torch.normal(0.0, self.count_noise, size=(1,),
                                             generator=generator, dtype=torch.float64))
            self._next_fraction = (self.noised_fraction(self.unclipped, count_noise)
                                   if self.unclipped else math.nan)
        return sums

    @staticmethod
    def noised_fraction(unclipped: list[float], count_noise: float) -> float:
        """(sum(b - 1/2) + noise) / m + 1/2: the released fraction of updates that fit."""
        m = len(unclipped)
        return (sum(b - 0.5 for b in unclipped) + count_noise) / m + 0.5

    def next_clip(self, fraction: float) -> float:
        """The geometric step of Andrew et al. (their Algorithm 1, line 11)."""
        return self.bound * math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def _commit(self) -> None:
        self.rounds_done += 1
        self.last_clip = self.bound
        if self.adaptive:
            self.last_fraction = self._next_fraction
            if math.isfinite(self._next_fraction):  # NaN: no count this round, no step
                self.bound = self.next_clip(self._next_fraction)

    def epsilon(self, rounds: int | None = None) -> float:
        """Client-level epsilon at `delta` after `rounds` rounds (default: so far)."""
        steps = self.rounds_done if rounds is None else rounds
        if steps == 0:
            return 0.0
        # Imported here: `opacus` loads its whole package (grad samplers, optimizers,
        # scipy) with the accountant, ~120 MB and ~1.5 s that every server daemon paid
        # at start-up though only this strategy needs it
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(self.delta))

    def round_metrics(self) -> dict[str, float]:
        metrics = {"central_epsilon": self.epsilon(), "central_clipped": float(len(self.clipped))}
        if self.adaptive:
            # Both are post-processing of the noised count: free to release.
            metrics.update(central_clip=self.last_clip, central_next_clip=self.bound,
                           central_unclipped_fraction=self.last_fraction)
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"rounds_done": torch.tensor(self.rounds_done, dtype=torch.int64)}
        if self.adaptive:  # a restarted server goes on from the clip it had reached
            state["clip"] = torch.tensor(self.bound, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # type: ignore[override]
        unknown = sorted(set(state) - {"rounds_done", "clip"})
        if unknown:
            raise StrategyError(f"{self.name}: unknown server state entries {unknown}")
        self.rounds_done = int(state["rounds_done"]) if "rounds_done" in state else 0
        if "clip" in state and self.adaptive:
            clip = float(state["clip"])
            if not (math.isfinite(clip) and clip > 0):
                raise StrategyError(f"{self.name}: checkpointed clip {clip} is not positive")
            self.bound = self.last_clip = clip
