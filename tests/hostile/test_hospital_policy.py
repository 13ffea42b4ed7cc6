"""The hospital decides what it runs and what it reports (issue 11 items 6 and 7),
over real processes: a real server that asks for a delta far larger than the
hospital's own, with federated evaluation on, and a real client daemon (DP on) that
noises its evaluation metrics.

- Item 7: the round is calibrated and accounted at the hospital's own delta, not the
  server's: the epsilon it reports is the ledger's mechanism at its own delta.
- Item 6: evaluations are answered only for the job's global models, with accuracy
  alone, noised, rounded to METRIC_DECIMALS, and each one charged to the ledger.
(The refusals themselves, which a well-behaved server never triggers, are unit-tested
in tests/client/test_task_policy.py.)
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from fl_client.privacy_ledger import rdp_epsilon
from fl_core.constants import METRIC_DECIMALS
from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task
from tests.hostile.kit import read_jobs, read_rounds

pytestmark = pytest.mark.slow

HOSPITAL = "hospital_1"
SERVER_DELTA = 0.05  # what the server asks for
OWN_DELTA = 1e-5     # what the hospital accounts at
EVAL_SIGMA = 40.0


def _reports(state_dir: Path) -> list[tuple[int, str, str, dict[str, float]]]:
    db = sqlite3.connect(f"file:{state_dir / 'server.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT round, kind, status, metrics_json FROM reports"
                          " ORDER BY round").fetchall()
    finally:
        db.close()
    return [(r[0], r[1], r[2], json.loads(r[3])) for r in rows]


def test_own_delta_wins_and_evaluations_are_noised_rounded_and_charged(tmp_path: Path) -> None:
    make_pki(tmp_path, [HOSPITAL])
    data = tmp_path / "data"
    get_task("breast_cancer").prepare(data, clients=2, alpha=None, seed=3)
    with Federation(tmp_path, [HOSPITAL], "breast_cancer") as fed:
        fed.start_server(["--rounds", "2", "--min_clients", "1", "--local_epochs", "1",
                          "--delta", str(SERVER_DELTA), "--noise_multiplier", "1.0",
                          "--round_deadline_s", "120", "--eval_deadline_s", "60",
                          "--seed", "4", "--exit_when_done"])
        fed.start_client(HOSPITAL, data / HOSPITAL,
                         ["--delta", str(OWN_DELTA), "--epsilon_budget", "100",
                          "--eval_noise_multiplier", str(EVAL_SIGMA)])
        assert fed.wait_server(timeout_s=240) == 0, fed.tail("server.log")
    state_dir = tmp_path / "server_state"
    assert [s for _, s in read_jobs(state_dir)] == ["completed"]
    rounds = read_rounds(state_dir)
    assert [r.round for r in rounds] == [1, 2]

    ledger = json.loads((tmp_path / "sites" / HOSPITAL / "state"
                         / f"privacy_ledger_{HOSPITAL}.json").read_text())
    assert ledger["delta"] == OWN_DELTA
    # an evaluation's release is charged at sigma EVAL_SIGMA (one step, sample rate 1);
    # training may also run at sample rate 1 (full-batch tasks), so tell them by noise
    training = [e for e in ledger["entries"] if e["noise_multiplier"] != EVAL_SIGMA]
    evaluations = [e for e in ledger["entries"] if e["noise_multiplier"] == EVAL_SIGMA]
    assert [e["round"] for e in training] == [1, 2]
    # item 7: the epsilon reported for each round is the ledger's, at the hospital's
    # delta (at the server's 0.05 it would be far smaller)
    for row, entry in zip(rounds, training, strict=True):
        reported = row.metrics["clients"][HOSPITAL]["epsilon_round"]
        mechanism = [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
        assert math.isclose(reported, entry["epsilon_round"], rel_tol=1e-9), (reported, entry)
        assert reported > 1.2 * rdp_epsilon(mechanism, SERVER_DELTA)
        # train metrics leave the hospital rounded too
        loss = row.metrics["clients"][HOSPITAL]["train_loss"]
        assert loss == round(loss, METRIC_DECIMALS)

    # item 6: one evaluation per round, accuracy only, rounded, charged to the ledger
    evals = [(r, m) for r, kind, status, m in _reports(state_dir)
             if kind == "EVALUATE" and status == "OK"]
    assert [r for r, _ in evals] == [1, 2], _reports(state_dir)
    for _, metrics in evals:
        assert set(metrics) == {"accuracy"}
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert metrics["accuracy"] == round(metrics["accuracy"], METRIC_DECIMALS)
    assert [(e["round"], e["noise_multiplier"], e["steps"]) for e in evaluations] == \
        [(1, EVAL_SIGMA, 1), (2, EVAL_SIGMA, 1)]
