"""Secure aggregation in the simulation: the daemons' SecAgg+ code (the client's
session and masking, the server's fold and unmasking) driven in memory.

In process, without Ray: a round with hospitals that never advertise and hospitals
that mask and then drop out gives exactly the survivors' sum (within the documented
quantization bound); fewer than t survivors fail the attempt cleanly, and a fresh
attempt succeeds; the strategies the server refuses under secure aggregation are
refused with the server's one line. With Ray (the real CLI, two runs): an attempt
whose survivors are fewer than t fails and is retried, and the retry ends with the
plain simulation's model within the quantization bound, injected dropouts on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_core.constants import SECAGG_DEFAULT_BITS, SECAGG_DEFAULT_CLIP
from fl_core.secagg import SecAggError
from fl_core.secagg.graph import neighbour_count, threshold
from fl_demo.baseline import initial_state
from fl_models.registry import get_task
from fl_server.config import ServerConfig
from fl_server.rounds import select_clients
from fl_server.secagg_round import strategy_refusal
from fl_server.strategies import Strategy, make_strategy
from fl_sim.cli import main
from fl_sim.engine import AFTER, BEFORE, injected_dropouts
from fl_sim.secure import SECURE_ERRORS, SecureSimRound, SimIdentity, secure_policy
from tests.sim.conftest import RAY_SMALL, load_report, run_sim

STEP = SECAGG_DEFAULT_CLIP / 2 ** (SECAGG_DEFAULT_BITS - 1)  # one quantum of the sum


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(6, 4), "b": torch.zeros(4),
            "steps": torch.tensor(7)}  # not floating: never masked, keeps the global value


def _deltas(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return {h: {"w": torch.randn(6, 4, generator=gen) * 0.3,
                "b": torch.randn(4, generator=gen) * 0.3, "steps": torch.tensor(7)}
            for h in names}


def _open(names: list[str], examples: dict[str, int], absent: Sequence[str] = ()
          ) -> tuple[SecureSimRound, Strategy]:
    cfg = ServerConfig(secure_aggregation=True)
    strategy = make_strategy("fedavg")
    identity = SimIdentity.make()
    policy = secure_policy(cfg, strategy, identity, Path("/nonexistent"))
    strategy.begin_round(_state())
    return SecureSimRound(policy, identity, "job", 1, names, _state(), examples,
                          absent=absent), strategy


def test_dropouts_after_masking_are_unmasked_to_the_survivors_sum() -> None:
    names = [f"hospital_{i}" for i in range(1, 41)]  # 40: a k-regular graph, not complete
    k = neighbour_count(len(names))
    assert k < len(names) - 1
    examples = {h: 20 + i for i, h in enumerate(names)}
    deltas = _deltas(names)
    absent, dropped = names[:2], names[2:7]
    secure, strategy = _open(names, examples, absent)
    assert not secure.failed and secure.ready == set(names[2:])
    for h in sorted(secure.ready):
        if h in dropped:  # masked by the hospital, then lost on the way
            secure.hospitals[h].masked_state(deltas[h], _state(), True, examples[h])
        else:
            secure.fold(h, deltas[h], _state(), examples[h])
    total = secure.unmask_into(strategy)
    survivors = names[7:]
    assert total.survivors == sorted(survivors) and total.dropped == sorted(dropped)
    new = strategy.finish_round()
    weight = sum(examples[h] for h in survivors)
    divisor = sum(examples.values())  # every participant's, as the server declares it
    bound = len(survivors) * STEP * divisor / weight
    for name in ("w", "b"):
        exact = sum(examples[h] * deltas[h][name] for h in survivors) / weight
        assert float((new[name] - exact).abs().max()) < bound + 1e-6, name
        # one dropped hospital more or less is far outside the bound: the sum is exact
        other = (exact * weight + examples[dropped[0]] * deltas[dropped[0]][name]) / (
            weight + examples[dropped[0]])
        assert float((new[name] - other).abs().max()) > 100 * bound
    assert torch.equal(new["steps"], torch.tensor(7))
    assert secure.summary()["secagg_dropped"] == len(absent) + len(dropped)


def test_fewer_than_t_survivors_fail_cleanly_and_a_new_attempt_succeeds() -> None:
    names = [f"hospital_{i}" for i in range(1, 6)]  # complete graph: k=4, t=3
    assert threshold(neighbour_count(5), 0.5) == 3
    examples = dict.fromkeys(names, 10)
    deltas = _deltas(names)
    secure, strategy = _open(names, examples)
    for h in names[:2]:  # the other three mask, then drop out: 2 survivors < t
        secure.fold(h, deltas[h], _state(), examples[h])
    with pytest.raises(SecAggError, match="NOT_ENOUGH_SHARES"):
        secure.unmask_into(strategy)
    assert strategy.num_accepted == 0  # nothing reached the strategy
    with pytest.raises(SECURE_ERRORS, match="failed: NOT_ENOUGH_SHARES"):
        secure.unmask_into(strategy)  # never a second try with the same keys

    few, _ = _open(names, examples, absent=names[:3])  # only 2 advertise: fails at once
    assert "advertised keys" in few.failed and not few.ready

    again, strategy = _open(names, examples)  # the retry: fresh keys, everyone survives
    for h in names:
        again.fold(h, deltas[h], _state(), examples[h])
    assert again.unmask_into(strategy).survivors == names


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_strategies_the_server_refuses_are_refused_in_one_line(
        strategy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["--secure_aggregation", "--strategy", strategy, "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"fl-sim: error: {strategy_refusal(strategy)}"]
    assert not out.exists()  # refused before Ray or any data


# --- with Ray: the real CLI ---------------------------------------------------------
HOSPITALS = 5
MODEL = "breast_cancer"


def _dropouts(seed: int, rate: float, attempt: int) -> dict[str, str]:
    names = [f"hospital_{i}" for i in range(1, HOSPITALS + 1)]
    job = f"sim-{MODEL}-seed{seed}"
    selected = select_clients(names, 2, 1.0, seed, job, 1, attempt)
    return injected_dropouts(selected, rate, seed, job, 1, attempt)


def _seed(rate: float, wanted: list[tuple[int, int]]) -> int:
    """A seed whose attempts 1.. have (BEFORE, AFTER) dropouts as `wanted` says."""
    for seed in range(2000):
        counts = [_dropouts(seed, rate, a + 1) for a in range(len(wanted))]
        if [(list(c.values()).count(BEFORE), list(c.values()).count(AFTER))
                for c in counts] == wanted:
            return seed
    raise AssertionError(f"no seed gives {wanted}")


COMMON = ["--hospitals", str(HOSPITALS), "--rounds", "1", "--no_dp", "--local_epochs", "1",
          *RAY_SMALL]


@pytest.mark.slow
@pytest.mark.timeout(900)  # two runs of the CLI, each bounded by run_sim's 400 s
def test_secure_simulation_retries_below_t_and_then_equals_plain(tmp_path: Path) -> None:
    """Attempt 1: everyone advertises and shares, three hospitals mask and drop out, so
    2 survive, fewer than t=3: the unmasking fails and the attempt is retried. Attempt
    2: one hospital never trains, one trains and is lost, 3 survive: their sum is
    unmasked, and the model equals the plain simulation's (same seed and dropouts; its
    quorum of 3 fails attempt 1 too) within the quantization bound."""
    rate = 0.5
    seed = _seed(rate, [(0, 3), (1, 1)])
    args = [*COMMON, "--seed", str(seed), "--dropout_rate", str(rate)]
    plain = run_sim([*args, "--quorum", "0.5", "--out", str(tmp_path / "plain")],
                    timeout_s=400)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    secure = run_sim([*args, "--quorum", "0.2", "--secure_aggregation",
                      "--out", str(tmp_path / "secure")], timeout_s=400)
    assert secure.returncode == 0, secure.stdout[-3000:] + secure.stderr[-3000:]

    report = load_report(tmp_path / "secure")
    first, second = report["simulation"]["attempts"]
    assert first["state"] == "failed" and len(first["accepted"]) == 2
    assert "secure aggregation failed" in first["reason"]
    assert "NOT_ENOUGH_SHARES" in first["reason"]
    survivors = second["accepted"]
    assert second["state"] == "completed" and len(survivors) == 3
    assert set(second["dropouts"]).isdisjoint(survivors)
    plain_attempts = load_report(tmp_path / "plain")["simulation"]["attempts"]
    assert [a["state"] for a in plain_attempts] == ["failed", "completed"]
    assert plain_attempts[1]["accepted"] == survivors
    assert report["settings"]["secure_aggregation"] is True
    metrics = report["rounds"][0]["metrics"]
    assert metrics["secure"] == 1.0 and metrics["secagg_dropped"] == 2

    train = {h: report["data"]["hospitals"][h]["train"] for h in report["data"]["hospitals"]}
    bound = len(survivors) * STEP * sum(train.values()) / sum(train[h] for h in survivors)
    a = load_file(str(tmp_path / "plain" / "global_model.safetensors"))
    b = load_file(str(tmp_path / "secure" / "global_model.safetensors"))
    assert sorted(a) == sorted(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < bound + 1e-6, (worst, bound)
    start = initial_state(get_task(MODEL), seed)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 1000 * bound  # the round did move the model: the match is not trivial
