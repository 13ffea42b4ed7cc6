"""Updates measured as they arrived (issue 16 item 3): the aggregator hands the
strategies a `MeasuredUpdate` whose floating tensors' norms the assembler took from
the bytes on arrival, so neither the round's norm nor the strategy's finiteness
check reads a spooled update again; a tensor without a (finite) known norm is read
and checked exactly as before. And FedAvg's first fold writes alpha * delta once
instead of zeros and then a sum: the same bits."""

from __future__ import annotations

import math

import pytest
import torch

from fl_server.strategies import StrategyError, make_strategy
from fl_server.strategies.base import MeasuredUpdate, update_norm


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"a": torch.randn(40, generator=g), "b": torch.randn(3, 4, generator=g),
            "steps": torch.tensor(3)}


def test_known_norms_are_taken_and_the_rest_is_read() -> None:
    delta = {"a": torch.full((4,), 3.0), "b": torch.full((9,), 1.0)}  # norms 6 and 3
    released: list[str] = []
    # a known norm is believed (no pass over "a"): 8 instead of its true 6
    got = update_norm(MeasuredUpdate(delta, {"a": 8.0}), released.append)
    assert got == pytest.approx(math.hypot(8.0, 3.0))
    assert released == ["b"]  # only the tensor that was read is released
    assert update_norm(delta) == pytest.approx(math.hypot(6.0, 3.0))
    # names outside the update are dropped
    assert MeasuredUpdate(delta, {"zzz": 1.0}).norms == {}


def test_a_non_finite_known_norm_is_checked_and_refused() -> None:
    glob = state()
    fedavg = make_strategy("fedavg")
    fedavg.begin_round(glob)
    bad = {n: torch.zeros_like(t) for n, t in glob.items() if t.is_floating_point()}
    bad["b"][1, 2] = math.nan
    with pytest.raises(StrategyError, match="'b' contains NaN"):
        fedavg.accept("h1", MeasuredUpdate(bad, {"a": 0.0, "b": math.nan}), 10)
    # a finite measured norm spares the check (the caller measured those bytes)
    fedavg.accept("h2", MeasuredUpdate({n: t + 1 for n, t in bad.items()
                                        if n == "a"} | {"b": torch.ones(3, 4)},
                                       {"a": 1.0, "b": 1.0}), 10)


@pytest.mark.parametrize("name", ["fedavg", "norm_bounding"])
def test_measured_and_plain_updates_give_the_same_model(name: str) -> None:
    glob = state()
    g = torch.Generator().manual_seed(9)
    deltas = [{n: torch.randn(t.shape, generator=g) for n, t in glob.items()
               if t.is_floating_point()} for _ in range(3)]
    results = []
    for measured in (False, True):
        strategy = make_strategy(name, bound=1.0) if name == "norm_bounding" \
            else make_strategy(name)
        strategy.begin_round(glob)
        for i, d in enumerate(deltas):
            norms = {n: float(torch.linalg.vector_norm(t)) for n, t in d.items()}
            strategy.accept(f"h{i}", MeasuredUpdate(d, norms) if measured else d, 10 + i)
        results.append(strategy.finish_round())
    for n in glob:
        assert torch.equal(results[0][n], results[1][n]), n


def test_first_fold_is_bitwise_zeros_plus_sum() -> None:
    """alpha * t written once equals 0 + alpha * t, bit for bit (float32 and a float16
    delta summed in float32)."""
    glob = {"f": torch.randn(1000), "h": torch.randn(50).half()}
    delta = {"f": torch.randn(1000), "h": torch.randn(50).half()}
    fedavg = make_strategy("fedavg")
    fedavg.begin_round(glob)
    fedavg.accept("h1", delta, 7)
    got = fedavg.finish_round()
    for n, t in glob.items():
        acc = torch.zeros(t.shape, dtype=torch.float32).add_(delta[n], alpha=7.0)
        want = acc.div_(7.0).add_(t).to(t.dtype)
        assert torch.equal(got[n], want), n
