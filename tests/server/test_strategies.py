"""Each strategy against an independent numpy computation of its paper's formula."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fl_server.strategies import (
    STRATEGY_NAMES,
    NoUpdatesError,
    Strategy,
    StrategyError,
    make_strategy,
)

Tensors = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]

# Tolerances for comparing a result, stored in its dtype, with a float64 reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def make_global(seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 2, generator=g),
        "conv.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "norm.half": torch.randn(6, generator=g).to(torch.float16),
        "norm.bf16": torch.randn(2, 5, generator=g).to(torch.bfloat16),
        "norm.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "fc.weight": torch.randn(3, 7, generator=g),
    }


def make_deltas(global_state: Tensors, n: int, seed: int, scale: float = 0.1) -> list[Tensors]:
    """Deltas in the global tensor's own dtype (as update - global would be)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = {}
        for name, t in global_state.items():
            if t.is_floating_point():
                d[name] = (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(
                    t.dtype
                )
        out.append(d)
    return out


def np64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def float_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [n for n, t in state.items() if t.is_floating_point()]


def run_round(
    strategy: Strategy, global_state: Tensors, deltas: list[Tensors], examples: list[int]
) -> Tensors:
    strategy.begin_round(global_state)
    for i, (d, n) in enumerate(zip(deltas, examples, strict=True)):
        strategy.accept(f"hospital_{i}", d, n)
    assert strategy.num_accepted == len(deltas)
    return strategy.finish_round()


def assert_matches(
    result: Tensors, global_state: Tensors, expected: Arrays, min_rtol: float = 0.0
) -> None:
    """Result has the global's names/order/dtypes/shapes; floats match the reference."""
    assert list(result) == list(global_state)
    for name, g in global_state.items():
        r = result[name]
        assert r.dtype == g.dtype, name
        assert r.shape == g.shape, name
        if not g.is_floating_point():
            assert torch.equal(r, g), f"{name} must keep the global value"
            continue
        rtol, atol = TOL[g.dtype]
        rtol = max(rtol, min_rtol)
        np.testing.assert_allclose(np64(r), expected[name], rtol=rtol, atol=atol, err_msg=name)


def weighted_mean(deltas: list[Tensors], weights: Sequence[float]) -> Arrays:
    w = np.asarray(weights, dtype=np.float64)
    return {
        name: sum(wi * np64(d[name]) for wi, d in zip(w, deltas, strict=True)) / w.sum()
        for name in deltas[0]
    }


def plus_global(global_state: Tensors, step: Arrays) -> Arrays:
    return {name: np64(global_state[name]) + s for name, s in step.items()}


# --------------------------------------------------------------------------- FedAvg family
def test_fedavg_is_example_weighted_mean() -> None:
    gs = make_global()
    deltas = make_deltas(gs, 3, seed=1)
    examples = [10, 30, 60]
    result = run_round(make_strategy("fedavg"), gs, deltas, examples)
    assert_matches(result, gs, plus_global(gs, weighted_mean(deltas, examples)))


def test_fedavg_accepts_float32_deltas_of_half_precision_parameters() -> None:
    gs = make_global()
    deltas = [{n: t.float() for n, t in d.items()} for d in make_deltas(gs, 4, seed=2)]
    examples = [1, 2, 3, 4]
    result = run_round(make_strategy("fedavg"), gs, deltas, examples)
    assert_matches(result, gs, plus_global(gs, weighted_mean(deltas, examples)))


def test_fedavg_output_does_not_alias_the_global_state() -> None:
    gs = make_global()
    before = {n: t.clone() for n, t in gs.items()}
    result = run_round(make_strategy("fedavg"), gs, make_deltas(gs, 2, seed=3), [1, 1])
    for name, t in result.items():
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)
        assert torch.equal(gs[name], before[name]), name


def test_fedprox_aggregates_like_fedavg_and_tells_clients_mu() -> None:
    gs = make_global()
    deltas = make_deltas(gs, 3, seed=4)
    examples = [5, 7, 11]
    prox = make_strategy("fedprox", mu=0.25)
    assert prox.client_config() == {"proximal_mu": 0.25}
    assert make_strategy("fedavg").client_config() == {}
    result = run_round(prox, gs, deltas, examples)
    assert_matches(result, gs, plus_global(gs, weighted_mean(deltas, examples)))
    with pytest.raises(StrategyError, match="mu"):
        make_strategy("fedprox", mu=-1.0)


def test_streaming_fold_does_not_keep_the_delta() -> None:
    """A folded delta can be mutated (spool reused) without changing the round."""
    gs = make_global()
    deltas = make_deltas(gs, 2, seed=5)
    expected = plus_global(gs, weighted_mean(deltas, [3, 1]))
    s = make_strategy("fedavg")
    assert s.streaming
    s.begin_round(gs)
    for i, (d, n) in enumerate(zip(deltas, [3, 1], strict=True)):
        scratch = {k: v.clone() for k, v in d.items()}
        s.accept(f"c{i}", scratch, n)
        for v in scratch.values():
            v.fill_(1e3)
    assert_matches(s.finish_round(), gs, expected)


@pytest.mark.parametrize(("name", "passes"), [("fedavg", 2), ("norm_bounding", 3), ("median", 1)])
def test_release_after_each_pass_leaves_the_result_unchanged(name: str, passes: int) -> None:
    """`release(name)` (the server drops a spooled tensor's pages) follows every read
    of a tensor: the checks, then a streaming fold (and norm bounding's norm); a robust
    strategy keeps its references and reads them again when it aggregates (issue 16
    item 3)."""
    gs = make_global()
    deltas = make_deltas(gs, 3, seed=9)
    plain = run_round(make_strategy(name), gs, deltas, [1, 2, 3])
    s = make_strategy(name)
    s.begin_round(gs)
    released: list[str] = []
    for i, (d, n) in enumerate(zip(deltas, [1, 2, 3], strict=True)):
        released.clear()
        s.accept(f"c{i}", d, n, released.append)
        assert released == float_names(gs) * passes
    result = s.finish_round()
    for key, t in plain.items():
        assert torch.equal(result[key], t), key
    # a refused update is released as far as it was read, and not folded
    s.begin_round(gs)
    bad = {**deltas[0], "fc.weight": torch.full((3, 7), float("nan"))}
    released.clear()
    with pytest.raises(StrategyError, match="NaN"):
        s.accept("bad", bad, 1, released.append)
    assert released == float_names(gs)[:float_names(gs).index("fc.weight")]
    assert s.num_accepted == 0
    s.accept("good", deltas[0], 1, released.append)
    s.finish_round()


def test_concurrent_accepts_equal_sequential() -> None:
    gs = make_global()
    deltas = make_deltas(gs, 8, seed=6)
    examples = list(range(1, 9))
    s = make_strategy("fedavg")
    s.begin_round(gs)
    threads = [
        threading.Thread(target=s.accept, args=(f"c{i}", d, n))
        for i, (d, n) in enumerate(zip(deltas, examples, strict=True))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.num_accepted == 8
    assert_matches(s.finish_round(), gs, plus_global(gs, weighted_mean(deltas, examples)))


# ---------------------------------------------------------------------------- FedOpt
def fedopt_reference(
    kind: str,
    global_state: Tensors,
    rounds: list[tuple[list[Tensors], list[int]]],
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> list[Arrays]:
    """Reddi et al. 2021, Algorithm 2, in float64 numpy; returns each round's new global."""
    x = {n: np64(t) for n, t in global_state.items() if t.is_floating_point()}
    m = {n: np.zeros_like(v) for n, v in x.items()}
    v = {n: np.full_like(a, tau**2) for n, a in x.items()}
    out = []
    for deltas, examples in rounds:
        big_delta = weighted_mean(deltas, examples)
        for n, d in big_delta.items():
            m[n] = beta1 * m[n] + (1 - beta1) * d
            if kind == "fedadagrad":
                v[n] = v[n] + d**2
            elif kind == "fedyogi":
                v[n] = v[n] - (1 - beta2) * d**2 * np.sign(v[n] - d**2)
            else:
                v[n] = beta2 * v[n] + (1 - beta2) * d**2
            x[n] = x[n] + eta * m[n] / (np.sqrt(v[n]) + tau)
        out.append({n: a.copy() for n, a in x.items()})
        # The next round starts from the stored (rounded) global, as the server would.
    return out


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_matches_reddi_algorithm_over_rounds(kind: str) -> None:
    gs = make_global()
    # float32-only model so the numpy reference can carry x across rounds unrounded.
    gs = {n: t for n, t in gs.items() if t.dtype in (torch.float32, torch.int64)}
    params = {"eta": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-2}
    rounds = [(make_deltas(gs, 3, seed=10 + r), [4, 2, 9 + r]) for r in range(4)]
    expected = fedopt_reference(kind, gs, rounds, **params)
    s = make_strategy(kind, **params)
    current = gs
    for (deltas, examples), exp in zip(rounds, expected, strict=True):
        current = run_round(s, current, deltas, examples)
        assert_matches(current, gs, exp)
    assert set(s.state_dict()) == {f"{slot}/{n}" for slot in "mv" for n in float_names(gs)}


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_handles_mixed_dtypes_one_round(kind: str) -> None:
    gs = make_global()
    params = {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    deltas = make_deltas(gs, 3, seed=20)
    (expected,) = fedopt_reference(kind, gs, [(deltas, [1, 2, 3])], **params)
    result = run_round(make_strategy(kind, **params), gs, deltas, [1, 2, 3])
    assert_matches(result, gs, expected)


def fedavgm_reference(
    global_state: Tensors,
    rounds: list[tuple[list[Tensors], list[int]]],
    server_lr: float,
    beta: float,
) -> list[Arrays]:
    x = {n: np64(t) for n, t in global_state.items() if t.is_floating_point()}
    velocity = {n: np.zeros_like(a) for n, a in x.items()}
    out = []
    for deltas, examples in rounds:
        for n, d in weighted_mean(deltas, examples).items():
            velocity[n] = beta * velocity[n] + d
            x[n] = x[n] + server_lr * velocity[n]
        out.append({n: a.copy() for n, a in x.items()})
    return out


def test_fedavgm_matches_server_momentum_over_rounds() -> None:
    gs = {n: t for n, t in make_global().items() if t.dtype in (torch.float32, torch.int64)}
    rounds = [(make_deltas(gs, 4, seed=30 + r), [3, 1, 4, 1 + r]) for r in range(3)]
    expected = fedavgm_reference(gs, rounds, server_lr=0.7, beta=0.6)
    s = make_strategy("fedavgm", server_lr=0.7, beta=0.6)
    current = gs
    for (deltas, examples), exp in zip(rounds, expected, strict=True):
        current = run_round(s, current, deltas, examples)
        assert_matches(current, gs, exp)


def serialise(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Round trip through safetensors bytes, as a checkpoint would."""
    return st_load(st_save(dict(state)))


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_state_dict_round_trip_gives_identical_next_round(kind: str) -> None:
    gs = make_global()
    first = make_strategy(kind)
    after_one = run_round(first, gs, make_deltas(gs, 3, seed=40), [2, 3, 4])
    restored = make_strategy(kind)
    restored.load_state_dict(serialise(first.state_dict()))
    deltas = make_deltas(gs, 3, seed=41)
    a = run_round(first, after_one, deltas, [5, 1, 2])
    b = run_round(restored, after_one, deltas, [5, 1, 2])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    fresh = run_round(make_strategy(kind), after_one, deltas, [5, 1, 2])
    assert not torch.equal(fresh["fc.weight"], a["fc.weight"]), "state must matter"


def test_server_state_for_another_model_is_refused() -> None:
    gs = make_global()
    s = make_strategy("fedadam")
    run_round(s, gs, make_deltas(gs, 1, seed=42), [1])
    other = make_strategy("fedadam")
    other.load_state_dict(s.state_dict())
    wrong = dict(gs)
    wrong["fc.weight"] = torch.zeros(2, 2)
    with pytest.raises(StrategyError, match="fc.weight"):
        other.begin_round(wrong)
    with pytest.raises(StrategyError, match="unexpected server state entry"):
        other.load_state_dict({"bogus": torch.zeros(1)})
    with pytest.raises(StrategyError, match="no server state"):
        make_strategy("fedavg").load_state_dict({"m/x": torch.zeros(1)})


def test_failed_round_leaves_server_state_untouched() -> None:
    gs = {"w": torch.zeros(3)}
    s = make_strategy("fedadam")
    run_round(s, gs, [{"w": torch.full((3,), 0.1)}], [1])
    before = s.state_dict()
    s.begin_round(gs)
    # Finite on its own, but the example-weighted sum overflows float32.
    s.accept("big", {"w": torch.tensor([3e38, 0.0, 0.0])}, 100)
    with pytest.raises(StrategyError, match="not finite"):
        s.finish_round()
    after = s.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -------------------------------------------------------------------------- robust
def robust_global() -> Tensors:
    """Robust strategies with slicing: a tensor larger than one slice."""
    gs = make_global()
    gs["big"] = torch.randn(50, 9, generator=torch.Generator().manual_seed(9))
    return gs


def coordinatewise(deltas: list[Tensors], fn: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    return {name: fn(np.stack([np64(d[name]) for d in deltas])) for name in deltas[0]}


def with_small_slices(strategy: Strategy) -> Strategy:
    strategy.slice_bytes = 256  # forces several slices per tensor
    return strategy


@pytest.mark.parametrize("n", [4, 5])
def test_median_is_numpy_median(n: int) -> None:
    gs = robust_global()
    deltas = make_deltas(gs, n, seed=50 + n)
    s = with_small_slices(make_strategy("median"))
    assert not s.streaming
    result = run_round(s, gs, deltas, [1, 100, 3, 2, 5][:n])
    expected = coordinatewise(deltas, lambda a: np.median(a, axis=0))
    assert_matches(result, gs, plus_global(gs, expected))


@pytest.mark.parametrize(("n", "beta"), [(7, 0.2), (10, 0.3), (5, 0.0), (4, 0.49)])
def test_trimmed_mean_is_numpy_trimmed_mean(n: int, beta: float) -> None:
    gs = robust_global()
    deltas = make_deltas(gs, n, seed=60 + n)
    k = int(np.floor(beta * n))

    def reference(a: np.ndarray) -> np.ndarray:
        return np.sort(a, axis=0)[k : n - k].mean(axis=0)

    s = with_small_slices(make_strategy("trimmed_mean", beta=beta))
    result = run_round(s, gs, deltas, [1] * n)
    assert_matches(result, gs, plus_global(gs, coordinatewise(deltas, reference)))


def test_trimmed_mean_rejects_beta_of_half_or_more() -> None:
    for beta in (0.5, 0.7, -0.1):
        with pytest.raises(StrategyError, match="beta"):
            make_strategy("trimmed_mean", beta=beta)


def krum_reference(deltas: list[Tensors], f: int, m: int) -> tuple[list[int], Arrays]:
    flat = np.stack([np.concatenate([np64(t).ravel() for t in d.values()]) for d in deltas])
    n = len(deltas)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])
    mean = {name: np.mean([np64(deltas[i][name]) for i in chosen], axis=0) for name in deltas[0]}
    return chosen, mean


@pytest.mark.parametrize(("name", "f", "m", "n"), [("krum", 1, 1, 5), ("multi_krum", 2, 3, 8)])
def test_krum_matches_blanchard_scores(name: str, f: int, m: int, n: int) -> None:
    gs = robust_global()
    deltas = make_deltas(gs, n, seed=70 + n)
    # Spread the clients so the scores are well separated.
    for i, d in enumerate(deltas):
        for t in d.values():
            t.mul_(1 + i % 3)
    chosen, mean = krum_reference(deltas, f, m)
    s = with_small_slices(make_strategy(name, f=f, m=m))
    result = run_round(s, gs, deltas, [1] * n)
    assert s.selected == [f"hospital_{i}" for i in chosen]  # type: ignore[attr-defined]
    assert_matches(result, gs, plus_global(gs, mean))


def test_multi_krum_default_m_is_n_minus_f() -> None:
    gs = robust_global()
    deltas = make_deltas(gs, 6, seed=80)
    chosen, mean = krum_reference(deltas, 1, 5)
    s = make_strategy("multi_krum", f=1)
    result = run_round(s, gs, deltas, [1] * 6)
    assert len(s.selected) == 5  # type: ignore[attr-defined]
    assert_matches(result, gs, plus_global(gs, mean))


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    gs = make_global()
    s = make_strategy("krum", f=2)
    s.begin_round(gs)
    for i, d in enumerate(make_deltas(gs, 6, seed=81)):
        s.accept(f"c{i}", d, 1)
    with pytest.raises(StrategyError, match=r"more than 2f\+2=6 updates, got 6"):
        s.finish_round()
    with pytest.raises(StrategyError, match="f must be >= 0"):
        make_strategy("krum", f=-1)
    with pytest.raises(StrategyError, match="m must be >= 1"):
        make_strategy("multi_krum", f=1, m=0)
    s = make_strategy("multi_krum", f=1, m=5)
    run = [make_deltas(gs, 5, seed=82)]
    s.begin_round(gs)
    for i, d in enumerate(run[0]):
        s.accept(f"c{i}", d, 1)
    with pytest.raises(StrategyError, match="m=5"):
        s.finish_round()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 1}),
        ("multi_krum", {"f": 1}),
        ("norm_bounding", {"bound": 1.0}),
    ],
)
def test_robust_strategies_resist_a_huge_update(name: str, params: dict[str, float]) -> None:
    gs = robust_global()
    honest = make_deltas(gs, 6, seed=90, scale=0.01)
    attacker = {n: torch.full_like(t, 1e4) for n, t in honest[0].items()}
    deltas = [*honest[:3], attacker, *honest[3:]]
    result = run_round(make_strategy(name, **params), gs, deltas, [1, 1, 1, 1000, 1, 1, 1])
    for n in float_names(gs):
        moved = (result[n].double() - gs[n].double()).abs().max().item()
        limit = 1.0 if name == "norm_bounding" else 0.1
        assert moved < limit, (name, n, moved)
    fedavg = run_round(make_strategy("fedavg"), gs, deltas, [1, 1, 1, 1000, 1, 1, 1])
    assert (fedavg["big"] - gs["big"]).abs().min().item() > 1e3  # the attack works on FedAvg


def test_krum_does_not_select_the_outlier() -> None:
    gs = robust_global()
    deltas = make_deltas(gs, 7, seed=91, scale=0.01)
    deltas[2] = {n: t + 5.0 for n, t in deltas[2].items()}
    s = make_strategy("multi_krum", f=2)
    run_round(s, gs, deltas, [1] * 7)
    assert "hospital_2" not in s.selected  # type: ignore[attr-defined]


def test_norm_bounding_clips_then_weighted_mean() -> None:
    gs = make_global()
    deltas = make_deltas(gs, 4, seed=100, scale=0.5)
    examples = [3, 1, 2, 5]
    bound = 1.5
    norms = [np.sqrt(sum(np.sum(np64(t) ** 2) for t in d.values())) for d in deltas]
    scales = [min(1.0, bound / nrm) for nrm in norms]
    expected = weighted_mean(
        [{k: v.double() * sc for k, v in d.items()} for d, sc in zip(deltas, scales, strict=True)],
        examples,
    )
    s = make_strategy("norm_bounding", bound=bound)
    result = run_round(s, gs, deltas, examples)
    # The clip factor comes from float32 norms, so float64 tensors agree to ~1e-7.
    assert_matches(result, gs, plus_global(gs, expected), min_rtol=1e-6)
    clipped = {f"hospital_{i}" for i, sc in enumerate(scales) if sc < 1.0}
    assert set(s.clipped) == clipped  # type: ignore[attr-defined]
    assert clipped, "the example must exercise clipping"


def test_buffered_strategies_keep_memory_mapped_tensors_by_reference(tmp_path: Path) -> None:
    gs = {"w": torch.zeros(1000)}
    deltas = []
    for i in range(3):
        path = tmp_path / f"spool{i}.bin"
        np.full(1000, float(i), dtype=np.float32).tofile(path)
        deltas.append({"w": torch.from_file(str(path), shared=False, size=1000)})
    s = make_strategy("median")
    s.begin_round(gs)
    for i, d in enumerate(deltas):
        s.accept(f"c{i}", d, 1)
    kept = s._deltas  # type: ignore[attr-defined]
    assert [k["w"].data_ptr() for k in kept] == [d["w"].data_ptr() for d in deltas]
    result = s.finish_round()
    assert torch.equal(result["w"], torch.ones(1000))
    assert s._deltas == []  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- validation
def test_round_without_updates_is_an_error() -> None:
    for name in STRATEGY_NAMES:
        s = make_strategy(name)
        s.begin_round(make_global())
        with pytest.raises(NoUpdatesError, match="no update"):
            s.finish_round()


def test_bad_updates_are_refused_with_names() -> None:
    gs = make_global()
    (good,) = make_deltas(gs, 1, seed=110)
    s = make_strategy("fedavg")
    with pytest.raises(StrategyError, match="outside a round"):
        s.accept("c", good, 1)
    s.begin_round(gs)
    with pytest.raises(StrategyError, match="'c'.*num_examples must be >= 1"):
        s.accept("c", good, 0)
    with pytest.raises(StrategyError, match="lacks floating tensors.*fc.weight"):
        s.accept("c", {k: v for k, v in good.items() if k != "fc.weight"}, 1)
    with pytest.raises(StrategyError, match="not in the global model.*extra"):
        s.accept("c", {**good, "extra": torch.zeros(1)}, 1)
    with pytest.raises(StrategyError, match=r"conv.bias.*shape \(3,\)"):
        s.accept("c", {**good, "conv.bias": torch.zeros(3)}, 1)
    with pytest.raises(StrategyError, match="must be a floating tensor"):
        s.accept("c", {**good, "conv.bias": torch.zeros(4, dtype=torch.int32)}, 1)
    nan = good["fc.weight"].clone()
    nan[1, 1] = float("nan")
    with pytest.raises(StrategyError, match="fc.weight.*NaN"):
        s.accept("c", {**good, "fc.weight": nan}, 1)
    assert s.num_accepted == 0
    # Integer buffers may ride along; they are ignored, never averaged.
    s.accept("c", {**good, "norm.num_batches_tracked": torch.tensor(99)}, 1)
    with pytest.raises(StrategyError, match="already contributed"):
        s.accept("c", good, 1)
    result = s.finish_round()
    assert result["norm.num_batches_tracked"].item() == 7
    with pytest.raises(StrategyError, match="outside a round"):
        s.finish_round()


def test_registry_names_and_parameters() -> None:
    assert set(STRATEGY_NAMES) == {
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedavgm",
        "trimmed_mean",
        "median",
        "krum",
        "multi_krum",
        "norm_bounding",
        "dp_fedavg",
    }
    for name in STRATEGY_NAMES:
        s = make_strategy(name)
        assert s.name == name
        assert isinstance(s.streaming, bool)
    with pytest.raises(StrategyError, match="unknown strategy 'fedsgd'.*fedavg"):
        make_strategy("fedsgd")
    with pytest.raises(StrategyError, match=r"no parameter\(s\) \['lr'\].*eta"):
        make_strategy("fedadam", lr=0.1)
    # JSON configs carry integral floats.
    assert make_strategy("krum", f=2.0).f == 2  # type: ignore[attr-defined]
    with pytest.raises(StrategyError, match="f must be an integer"):
        make_strategy("krum", f=1.5)


def test_norm_bounding_measures_huge_updates_exactly() -> None:
    """Entries whose squares overflow float32 still get their true norm (and are clipped)."""
    gs = {"w": torch.zeros(4)}
    huge = torch.tensor([3e25, -4e25, 0.0, 0.0])  # norm 5e25
    small = torch.tensor([0.3, 0.0, 0.0, 0.4])  # norm 0.5, under the bound
    s = make_strategy("norm_bounding", bound=2.0)
    result = run_round(s, gs, [{"w": huge}, {"w": small}], [1, 3])
    expected = (
        np.array([3.0, -4.0, 0.0, 0.0]) * 2.0 / 5.0 * 1 + np.array([0.3, 0, 0, 0.4]) * 3
    ) / 4
    np.testing.assert_allclose(result["w"].numpy(), expected, rtol=1e-6)
    assert s.clipped == {"hospital_0": pytest.approx(5e25)}  # type: ignore[attr-defined]


# ---------------------------------------------- FedAvg's sums in the last model's memory
def _fedavg_round(strategy: Strategy, global_state: Tensors, deltas: Sequence[Tensors]
                  ) -> Tensors:
    strategy.begin_round(global_state)
    for i, delta in enumerate(deltas):
        strategy.accept(f"h{i}", delta, 1 + i)
    return strategy.finish_round()


def _deltas(seed: int) -> list[Tensors]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g),
             "steps": torch.tensor(3)} for _ in range(3)]


def test_fedavg_writes_the_next_sums_into_a_released_models_memory() -> None:
    """Once the server lets go of the model a round returned (its sums, with the old
    model added), `recycle` keeps that memory and the next round's sums are written
    into it: the same result as in fresh memory."""
    start = {"w": torch.zeros(64, 8), "b": torch.ones(8), "steps": torch.tensor(0)}
    strategy, fresh = make_strategy("fedavg"), make_strategy("fedavg")
    first = _fedavg_round(strategy, start, _deltas(1))
    served = {k: v.clone() for k, v in first.items()}  # the model as its checkpoint serves it
    addresses = {k: first[k].data_ptr() for k in ("w", "b")}
    strategy.recycle(first)  # (`first` stays referenced: no address freed and taken again)
    second = _fedavg_round(strategy, served, _deltas(2))
    assert {k: second[k].data_ptr() for k in ("w", "b")} == addresses
    expected = _fedavg_round(fresh, served, _deltas(2))
    for name in expected:
        assert torch.equal(second[name], expected[name]), name


def test_fedavg_keeps_only_its_own_last_sums_and_only_before_a_round_folds() -> None:
    start = {"w": torch.zeros(64, 8), "b": torch.ones(8), "steps": torch.tensor(0)}
    strategy = make_strategy("fedavg")
    first = _fedavg_round(strategy, start, _deltas(1))
    served = {k: v.clone() for k, v in first.items()}
    strangers = {k: v.clone() for k, v in first.items()}  # same shapes, not its memory
    strategy.recycle(strangers)
    second = _fedavg_round(strategy, served, _deltas(2))
    assert all(second[k].data_ptr() != strangers[k].data_ptr() for k in ("w", "b"))
    # offered while a round has begun its sums: not kept (it would add a model's memory)
    strategy.begin_round({k: v.clone() for k, v in second.items()})
    strategy.accept("h0", _deltas(3)[0], 1)
    strategy.recycle(second)
    strategy.accept("h1", _deltas(3)[1], 1)
    third = strategy.finish_round()
    strategy.begin_round({k: v.clone() for k, v in third.items()})
    strategy.accept("h0", _deltas(4)[0], 1)
    fourth = strategy.finish_round()
    assert all(fourth[k].data_ptr() != second[k].data_ptr() for k in ("w", "b"))


def test_a_strategy_that_derives_its_step_from_the_mean_keeps_nothing() -> None:
    """FedAvgM's step is its velocity, which it keeps: its returned model's memory is
    not FedAvg's sums to write into."""
    start = {"w": torch.zeros(64, 8), "b": torch.ones(8), "steps": torch.tensor(0)}
    strategy = make_strategy("fedavgm", beta=0.9)
    first = _fedavg_round(strategy, start, _deltas(1))
    served = {k: v.clone() for k, v in first.items()}
    strategy.recycle(first)
    second = _fedavg_round(strategy, served, _deltas(2))
    assert all(second[k].data_ptr() != first[k].data_ptr() for k in ("w", "b"))
