"""The one interface every aggregation strategy implements.

A strategy sees *deltas* (a client's update minus the global model it started
from) of the floating tensors only: integer and bool buffers (step counters,
masks) have no meaningful average, so they keep the global value. The caller
computes the deltas; this base class checks them, so a malformed update is
refused with an error that names the client and tensor rather than silently
corrupting the next global model.

Two families share the interface:
- *streaming* strategies fold each update into a running weighted sum as it is
  accepted, so the server holds about one model whatever the number of clients;
- the others (median, trimmed mean, Krum) need every update at once; they keep
  references to the tensors they are given (memory-mapped spool files) and read
  them back coordinate-wise in bounded slices (`coordinatewise.py`).
"""

from __future__ import annotations

import math
import operator
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, SupportsIndex

import torch


class StrategyError(ValueError):
    """A strategy parameter, an update, or the round itself is not acceptable."""


class NoUpdatesError(StrategyError):
    """finish_round was called for a round that accepted no update."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters keep their precision; everything narrower sums in float32.

    Summing float16/bfloat16 deltas in their own dtype would lose most of the
    signal after a handful of clients, so the running sums are never narrower
    than float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite, at about the cost of one sum.

    A float32 sum is non-finite if any element is, so a finite sum settles it;
    only a non-finite sum (a bad element, or an overflow of huge finite values)
    pays for the exact elementwise test, which is ~20x slower on large tensors.
    """
    if bool(torch.isfinite(t.sum(dtype=accumulation_dtype(t.dtype)))):
        return True
    return bool(torch.isfinite(t).all())


def tensor_norm(t: torch.Tensor) -> float:
    """L2 norm of one tensor, in float32 (float64 tensors in float64), which is ~15-30x
    faster than float64 on large tensors; a float32 overflow (entries beyond ~1e19) is
    redone in float64 so a huge update still gets its true norm."""
    norm = float(torch.linalg.vector_norm(t, dtype=accumulation_dtype(t.dtype)))
    if not math.isfinite(norm):
        norm = float(torch.linalg.vector_norm(t, dtype=torch.float64))
    return norm


class MeasuredUpdate(dict[str, torch.Tensor]):
    """An update whose floating tensors' L2 norms were measured as its bytes arrived
    (`StreamAssembler(measure=True)`), so the passes that need them (the round's
    outlier norm, norm bounding, the finiteness check) do not read a 100 MB update
    again from its spool, page by page (issue 16 item 3). A finite norm also proves
    every element of its tensor finite. `norms` may leave tensors out; those are
    measured as before. The tensors must not change after measuring."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], norms: Mapping[str, float]) -> None:
        super().__init__(tensors)
        self.norms = {name: float(norm) for name, norm in norms.items() if name in self}


def _known_norm(delta: Mapping[str, torch.Tensor], name: str) -> float | None:
    return delta.norms.get(name) if isinstance(delta, MeasuredUpdate) else None


def update_norm(delta: Mapping[str, torch.Tensor],
                release: Callable[[str], None] | None = None) -> float:
    """L2 norm of an update's floating tensors, each in float32 unless that overflows
    (`tensor_norm`: a float64 pass cost ~0.3 CPU-s per 100 MB update), summed in
    float64 (an update of 1e30 must give 1e30-ish, not inf); `release(name)` after
    each tensor is read. A `MeasuredUpdate`'s known norms are taken as they are."""
    total = 0.0
    for name, tensor in delta.items():
        known = _known_norm(delta, name)
        if known is not None:
            total += known * known
            continue
        if tensor.is_floating_point():
            total += tensor_norm(tensor) ** 2
        if release is not None:
            release(name)
    return math.sqrt(total)


def _keep(name: str) -> None:
    """The default `release`: tensors handed to a strategy stay as they are."""


def check_fraction(name: str, value: float, low: float, high: float, *, high_open: bool) -> float:
    """Validates a real parameter in [low, high] or [low, high) with a message naming it."""
    value = float(value)
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise StrategyError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validates a non-negative (or strictly positive) real parameter."""
    value = float(value)
    if not (value >= 0.0 if allow_zero else value > 0.0) or value != value:
        kind = "non-negative" if allow_zero else "positive"
        raise StrategyError(f"{name} must be {kind}, got {value}")
    return value


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Accepts ints and integral floats (JSON configs carry numbers as floats)."""
    if isinstance(value, bool):
        raise StrategyError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise StrategyError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    if not isinstance(value, SupportsIndex):
        raise StrategyError(f"{name} must be an integer, got {value!r}")
    result = operator.index(value)
    if result < minimum:
        raise StrategyError(f"{name} must be >= {minimum}, got {result}")
    return result


NOT_AVERAGED = ("epsilon", "dp_enabled")


def weighted_metrics(reports: Sequence[tuple[int, Mapping[str, float]]], *,
                     equal: bool) -> dict[str, float]:
    """Per-metric mean over the clients that have it (by examples unless `equal`),
    plus `epsilon_max`, the largest `epsilon_total` any client reported."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for examples, metrics in reports:
        w = 1.0 if equal else float(examples)
        for key, value in metrics.items():
            if key.startswith(NOT_AVERAGED):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    out = {key: total / weights[key] for key, total in sums.items() if weights[key] > 0}
    eps = [float(m["epsilon_total"]) for _, m in reports if "epsilon_total" in m]
    if eps:
        out["epsilon_max"] = max(eps)
    return out


class Strategy(ABC):
    """Turns one round's accepted deltas into the next global model.

    Lifecycle per round: ``begin_round(global)``, ``accept(...)`` once per client
    (possibly from several server threads: calls are serialised by a lock), then
    ``finish_round()`` which returns the new global state and ends the round
    whether it succeeds or raises (a failed aggregation must not leak the
    previous round's spool references into the next).
    """

    name: ClassVar[str]
    streaming: ClassVar[bool]
    # Clients count equally in the aggregate (robust strategies, central DP), so they
    # count equally in the round's averaged metrics too.
    equal_weights: ClassVar[bool] = False
    # Non-streaming strategies read all clients' values for this many bytes of
    # coordinates at a time; a class attribute so tests can force many slices.
    slice_bytes: int = 32 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._global: dict[str, torch.Tensor] | None = None
        self._float_names: tuple[str, ...] = ()
        self._client_ids: list[str] = []
        self._examples: list[int] = []
        self._release: Callable[[str], None] = _keep
        self._release_global: Callable[[str], None] = _keep

    # ----------------------------------------------------------------- public API
    @property
    def num_accepted(self) -> int:
        """Updates accepted in the current round."""
        return len(self._client_ids)

    def client_config(self) -> dict[str, float]:
        """Extra training configuration the clients need (none for most strategies)."""
        return {}

    def begin_round(self, global_state: Mapping[str, torch.Tensor],
                    release: Callable[[str], None] | None = None) -> None:
        """Starts a round against ``global_state`` (held by reference, not copied).

        ``release(name)`` is called once ``finish_round`` has read the global tensor
        ``name``: the server serves a large model from its checkpoint file and drops
        each tensor's pages once read (fl_server/model_pages.py)."""
        with self._lock:
            self._release_global = release or _keep
            state: dict[str, torch.Tensor] = {}
            for name, tensor in global_state.items():
                if not isinstance(tensor, torch.Tensor):
                    raise StrategyError(
                        f"global state entry {name!r} is {type(tensor).__name__}, not a tensor"
                    )
                state[name] = tensor
            self._global = state
            self._float_names = tuple(n for n, t in state.items() if t.is_floating_point())
            self._client_ids = []
            self._examples = []
            self._on_begin()

    def accept(self, client_id: str, delta: Mapping[str, torch.Tensor], num_examples: int,
               release: Callable[[str], None] | None = None) -> None:
        """Takes one client's delta into the round (folded, or referenced for later).

        ``release(name)`` is called each time a pass over the delta (the checks, a
        streaming fold) has finished reading tensor ``name``: the server hands over
        updates mapped from their spool files and drops each tensor's pages there, so
        a fold keeps one tensor of the update resident instead of the whole model
        (issue 16 item 3). A tensor may still be read after its release (it is read
        back from the file), so robust strategies keep their references as before."""
        with self._lock:
            if self._global is None:
                raise StrategyError(f"accept({client_id!r}) called outside a round")
            if client_id in self._client_ids:
                raise StrategyError(f"client {client_id!r} already contributed to this round")
            try:
                examples = check_int("num_examples", num_examples, minimum=1)
            except StrategyError as exc:
                raise StrategyError(f"client {client_id!r}: {exc}") from None
            self._release = release or _keep
            try:
                checked = self._check_delta(client_id, delta)
                self._fold(client_id, checked, examples)
            finally:
                self._release = _keep
            self._client_ids.append(client_id)
            self._examples.append(examples)

    def recycle(self, state: Mapping[str, torch.Tensor]) -> None:
        """Offers the tensors of a global model nothing reads any more (the server calls
        it once the model's last reference is gone); a strategy that made them may write
        its next round's sums into them instead of into fresh memory. Most keep nothing."""
        return None

    def finish_round(self) -> dict[str, torch.Tensor]:
        """Returns the new global state: same names, dtypes, shapes and order as the old."""
        with self._lock:
            if self._global is None:
                raise StrategyError("finish_round called outside a round")
            global_state = self._global
            try:
                if not self._client_ids:
                    raise NoUpdatesError(
                        f"{self.name}: the round accepted no update, nothing to aggregate"
                    )
                step = self._aggregate()
                new_state: dict[str, torch.Tensor] = {}
                for name, g in global_state.items():
                    if not g.is_floating_point():
                        new_state[name] = g.clone()
                        self._release_global(name)
                        continue
                    s = step.pop(name)
                    s.add_(g)
                    self._release_global(name)
                    if not all_finite(s):
                        raise StrategyError(
                            f"{self.name}: aggregated tensor {name!r} is not finite "
                            "(overflow or non-finite server state); the round is not applied"
                        )
                    new_state[name] = s.to(g.dtype).reshape(g.shape)
                self._commit()
                return new_state
            finally:
                self._global = None
                self._release_global = _keep
                self._client_ids = []
                self._examples = []
                self._on_end()

    def round_metrics(self) -> dict[str, float]:
        """Figures about the round just finished for its summary (e.g. central DP's
        epsilon); most strategies have none."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server optimiser state for checkpoints; stateless strategies have none."""
        return {}

    def export_state(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` with each key under ``"<strategy name>:"``, as checkpointed:
        state that names its strategy cannot be restored into another one."""
        return {f"{self.name}:{key}": value for key, value in self.state_dict().items()}

    def import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores ``export_state()`` output, refusing another strategy's state.

        Keys without a ``"name:"`` prefix come from checkpoints written before state
        was named; they are loaded as they are (``load_state_dict`` checks them)."""
        mine: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            owner, sep, rest = key.partition(":")
            if not sep:
                mine[key] = value
            elif owner != self.name:
                raise StrategyError(
                    f"the checkpoint holds server state of strategy {owner!r}, not"
                    f" {self.name!r}: a job's strategy cannot change while it runs")
            else:
                mine[rest] = value
        self.load_state_dict(mine)

    def train_metrics(self, reports: Sequence[tuple[int, Mapping[str, float]]]
                      ) -> dict[str, float]:
        """The round's training metrics from each accepted update's (examples, metrics).

        Weighted by examples, as FedAvg weights the model; each metric over the
        clients that reported it (a client may lack one); strategies whose aggregate
        weights clients equally (`equal_weights`) average equally too. Privacy figures
        are not averaged: only the largest epsilon spent is worth showing."""
        return weighted_metrics(reports, equal=self.equal_weights)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores ``state_dict()`` output; stateless strategies accept only ``{}``."""
        if state:
            raise StrategyError(
                f"{self.name} keeps no server state, but got entries {sorted(state)[:5]}"
            )

    # ------------------------------------------------------------ for subclasses
    def _on_begin(self) -> None:
        """Resets per-round buffers; the global state is available as ``self._global``."""
        return None

    def _on_end(self) -> None:
        """Drops per-round buffers (and with them any memory-mapped spool references)."""
        return None

    @abstractmethod
    def _fold(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> None:
        """Takes a checked delta (floating names only, in global order)."""

    @abstractmethod
    def _aggregate(self) -> dict[str, torch.Tensor]:
        """The step to add to each floating global tensor, in its accumulation dtype.

        Returned tensors are owned by the caller and modified in place.
        """

    def _commit(self) -> None:
        """Called once the new global state is known to be valid (server state update)."""
        return None

    def _global_state(self) -> dict[str, torch.Tensor]:
        assert self._global is not None
        return self._global

    @property
    def _float_tensor_names(self) -> tuple[str, ...]:
        return self._float_names

    # --------------------------------------------------------------- validation
    def _check_delta(
        self, client_id: str, delta: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        global_state = self._global_state()
        unknown = [n for n in delta if n not in global_state]
        if unknown:
            raise StrategyError(
                f"client {client_id!r}: delta has tensors not in the global model: {unknown[:5]}"
            )
        missing = [n for n in self._float_names if n not in delta]
        if missing:
            raise StrategyError(f"client {client_id!r}: delta lacks floating tensors {missing[:5]}")
        checked: dict[str, torch.Tensor] = {}
        for name in self._float_names:
            t = delta[name]
            g = global_state[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise StrategyError(
                    f"client {client_id!r}: delta {name!r} must be a floating tensor, got {kind}"
                )
            if t.shape != g.shape:
                raise StrategyError(
                    f"client {client_id!r}: delta {name!r} has shape {tuple(t.shape)}, "
                    f"the global model has {tuple(g.shape)}"
                )
            # One poisoned update would make the whole aggregate NaN; refuse it here,
            # where the client can still be named and left out. A finite measured norm
            # already proves it (no second read of the tensor).
            known = _known_norm(delta, name)
            if known is None or not math.isfinite(known):
                if not all_finite(t):
                    raise StrategyError(
                        f"client {client_id!r}: delta {name!r} contains NaN or infinite values"
                    )
                self._release(name)
            checked[name] = t
        if isinstance(delta, MeasuredUpdate):  # the fold's own norm (norm bounding)
            return MeasuredUpdate(checked, delta.norms)
        return checked
