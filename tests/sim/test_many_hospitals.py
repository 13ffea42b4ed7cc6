"""Fifty virtual hospitals, three rounds of breast_cancer with DP on local Ray (two
CPUs): every hospital's ledger holds exactly the rounds it trained in, the injected
dropouts are in the record (a dropout after training still spends privacy), and
the report agrees with the ledgers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_client.privacy_ledger import PrivacyLedger
from tests.sim.conftest import RAY_SMALL, load_report, run_sim

pytestmark = pytest.mark.slow

HOSPITALS = 50
ROUNDS = 3


def test_fifty_hospitals_with_dp_and_dropouts(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    result = run_sim(["--hospitals", str(HOSPITALS), "--rounds", str(ROUNDS),
                      "--local_epochs", "1", "--dropout_rate", "0.2", "--fraction", "0.8",
                      "--epsilon_budget", "50", "--seed", "3", "--out", str(out),
                      *RAY_SMALL], timeout_s=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hospitals done" in result.stdout and "ETA" in result.stdout
    report = load_report(out)
    assert report["status"] == "ok"
    attempts = report["simulation"]["attempts"]
    assert [a["round"] for a in attempts if a["state"] == "completed"] == [1, 2, 3]
    assert report["simulation"]["workers"] == 2  # a bounded pool, not 50 processes
    assert report["simulation"]["worker_devices"] == ["cpu"]  # no --gpus_per_hospital
    assert "workers train on cpu" in result.stdout
    delta = report["settings"]["delta"]

    trained: dict[str, list[int]] = {f"hospital_{i}": [] for i in range(1, HOSPITALS + 1)}
    dropouts = {"before": 0, "after": 0}
    for a in attempts:
        assert a["selected"] == 40  # fraction 0.8 of 50
        for name in a["accepted"]:
            trained[name].append(a["round"])
        for name, when in a["dropouts"].items():
            dropouts[when] += 1
            assert "injected dropout" in a["failures"][name]
            assert name not in a["accepted"]
            if when == "after":
                trained[name].append(a["round"])  # trained: privacy spent, update lost
        assert set(a["failures"]) == set(a["dropouts"])  # nothing else failed
    assert dropouts["before"] > 0 and dropouts["after"] > 0

    for name, rounds in trained.items():
        ledger = PrivacyLedger(out / "state", name, 50.0, delta)
        entries = ledger.entries()
        assert sorted(e.round for e in entries) == sorted(rounds), name
        assert all(e.dp_enabled and e.job_id == report["job_id"] for e in entries)
        assert report["epsilon"][name] == pytest.approx(ledger.spent(), rel=1e-9)
    assert all(r["metrics"]["eval_accuracy"] > 0.5 for r in report["rounds"])
