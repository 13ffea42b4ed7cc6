"""FedAvg (McMahan et al. 2017): the example-weighted mean of the clients' deltas.

Streaming: each delta is folded into a running sum ``sum_k n_k * delta_k`` the
moment it is accepted (in place, float32 or float64), so memory stays one model
in the accumulation dtype whatever the number of clients, and the update's own
tensors (a spool file) can be released as soon as ``accept`` returns.

The sums become the new global model (the mean step is added to the old model in
place). Once the server has let go of that model, `recycle` keeps its tensors for
the next round's sums: on the server's machines a model's worth of fresh pages cost
~125 ms of CPU a round (100 MB, ~5 us a page faulted in; BENCHMARKS.md, issue 16).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import ClassVar

import torch

from fl_server.strategies.base import Strategy, StrategyError, accumulation_dtype


class FedAvg(Strategy):
    """x_{t+1} = x_t + sum_k n_k delta_k / sum_k n_k."""

    name: ClassVar[str] = "fedavg"
    streaming: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[str, torch.Tensor] = {}
        self._weight_total = 0.0
        # the last sums handed out as a model (their addresses), and the tensors of such
        # a model given back by `recycle` for the next round's sums; own lock, since a
        # model's last reference can go on any thread
        self._spare_lock = threading.Lock()
        self._handed_out: frozenset[int] = frozenset()
        self._spare: dict[str, torch.Tensor] = {}
        self._made: set[int] = set()  # this round's sums that the fold allocated itself

    def _on_begin(self) -> None:
        # Allocated lazily on the first accept: a round nobody reports to costs nothing.
        self._sums = {}
        self._weight_total = 0.0
        self._made = set()

    def _on_end(self) -> None:
        self._sums = {}
        self._weight_total = 0.0

    def _weight(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> float:
        """Multiplier of this delta in the running sum; overridden by norm bounding."""
        return float(num_examples)

    def _fold(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> None:
        alpha = self._weight(client_id, delta, num_examples)
        global_state = self._global_state()
        first = not self._sums
        for name, t in delta.items():
            acc = accumulation_dtype(global_state[name].dtype)
            if first and t.dtype == acc:
                # the first update starts the sum: alpha * t written once, not zeros
                # written and then added to (a 100 MB model's worth of fresh pages each)
                self._sums[name] = torch.mul(t, alpha, out=self._spare_for(name, t))
                self._made.add(self._sums[name].data_ptr())
            elif first:  # a narrower delta is summed in the accumulation dtype
                self._sums[name] = torch.zeros(t.shape, dtype=acc).add_(t, alpha=alpha)
            else:
                self._sums[name].add_(t, alpha=alpha)
            self._release(name)
        if first:
            with self._spare_lock:
                self._spare = {}  # what the first update did not take does not fit
        self._weight_total += float(num_examples)

    def _spare_for(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        with self._spare_lock:
            spare = self._spare.pop(name, None)
        if spare is None or spare.shape != like.shape or spare.dtype != like.dtype \
                or spare.device != like.device:
            return None
        return spare

    def recycle(self, state: Mapping[str, torch.Tensor]) -> None:
        """Keeps the tensors of `state` that are this strategy's own last sums, handed
        out as the model `finish_round` returned, for the next round's sums. Only where
        the new model is the sums themselves (FedAvg's own `_aggregate`: subclasses
        that derive the step from the mean may keep references to it), and only whole,
        contiguous tensors at the addresses handed out."""
        if type(self)._aggregate is not FedAvg._aggregate:
            return
        if self._sums:  # a round has started its sums: kept now, this would add a model
            return
        with self._spare_lock:
            spare = {name: t for name, t in state.items()
                     if t.data_ptr() in self._handed_out and t.is_contiguous()
                     and t.storage_offset() == 0
                     and t.untyped_storage().nbytes() == t.numel() * t.element_size()}
            if spare:
                self._spare = spare
                self._handed_out = frozenset()

    def accept_sum(self, client_ids: list[str], sums: dict[str, torch.Tensor],
                   weight_total: float) -> None:
        """Takes a round's already-summed update (secure aggregation: the server never
        sees the terms): ``sums`` is sum_k n_k delta_k (or, for equal-weight strategies,
        sum_k delta_k, clipped by the hospitals) and ``weight_total`` sum_k n_k (or k)."""
        with self._lock:
            if self._global is None:
                raise StrategyError("accept_sum called outside a round")
            if self._client_ids:
                raise StrategyError("a summed update cannot join individual updates")
            if not client_ids or not weight_total > 0:
                raise StrategyError("a summed update needs contributors and a positive weight")
            checked = self._check_delta("secure sum", sums)
            global_state = self._global_state()
            self._sums = {name: t.to(accumulation_dtype(global_state[name].dtype))
                          for name, t in checked.items()}
            self._weight_total = float(weight_total)
            self._client_ids = list(client_ids)
            self._examples = [1] * len(client_ids)

    def _mean_delta(self) -> dict[str, torch.Tensor]:
        """The example-weighted mean delta; consumes the running sums."""
        sums, self._sums = self._sums, {}
        for t in sums.values():
            t.div_(self._weight_total)
        with self._spare_lock:  # (a secure round's sums are not the fold's: not offered)
            self._handed_out = frozenset(t.data_ptr() for t in sums.values()
                                         if t.numel() and t.data_ptr() in self._made)
        return sums

    def _aggregate(self) -> dict[str, torch.Tensor]:
        return self._mean_delta()
