"""Real server and client processes over mTLS on loopback: whole rounds."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fl_demo.launcher import Federation

pytestmark = pytest.mark.slow

SERVER_FAST = ["--min_clients", "2", "--round_deadline_s", "90", "--wait_for_clients_s", "60",
               "--exit_when_done", "--local_epochs", "1"]


def test_two_hospitals_two_rounds(federation: Federation, breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server([*SERVER_FAST, "--rounds", "2",
                      "--eval_data", str(breast_cancer_data / "test")])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    code = fed.wait_server(timeout_s=240)
    assert code == 0, fed.tail("server.log") + fed.tail("hospital_1.log")
    for name, proc in fed.clients.items():
        assert proc.wait(timeout=30) == 0, fed.tail(f"{name}.log")
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    rows = db.execute("SELECT round, state, reported FROM rounds ORDER BY round").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(1, "completed"), (2, "completed")]
    assert all(r[2] == 2 for r in rows)
    log = (fed.log_dir / "server.log").read_text()
    assert "round_summary" in log and "eval_accuracy" in log
    for name in fed.hospitals:
        ledger = fed.workdir / "sites" / name / "state" / f"privacy_ledger_{name}.json"
        assert ledger.exists(), f"{name} kept no privacy ledger"


def test_median_strategy_reads_spooled_updates_and_leaves_no_spool(
        federation: Federation, breast_cancer_data: Path) -> None:
    """A non-streaming strategy keeps updates memory-mapped from their spool files;
    the files are unlinked at once (the mapping outlives them), so none pile up."""
    fed = federation
    fed.start_server([*SERVER_FAST, "--rounds", "2", "--strategy", "median", "--no_fed_eval"])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    assert fed.wait_server(timeout_s=240) == 0, fed.tail("server.log")
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    rows = db.execute("SELECT round, state, reported FROM rounds ORDER BY round").fetchall()
    assert rows == [(1, "completed", 2), (2, "completed", 2)]
    assert not list((fed.workdir / "server_state" / "spool").glob("*.spool"))


def test_central_dp_reports_its_epsilon_each_round(federation: Federation,
                                                   breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server([*SERVER_FAST, "--rounds", "2", "--strategy", "dp_fedavg",
                      "--strategy_param", "clip=0.5", "--strategy_param", "noise_multiplier=0.5",
                      "--no_fed_eval"])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    assert fed.wait_server(timeout_s=240) == 0, fed.tail("server.log")
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    rows = db.execute("SELECT metrics_json FROM rounds ORDER BY round").fetchall()
    eps = [json.loads(r[0])["central_epsilon"] for r in rows]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
