"""Secure aggregation under faults, and its accuracy against the same run without it,
over real processes on loopback."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from fl_demo.launcher import Federation
from tests.secagg.conftest import HOSPITALS

pytestmark = pytest.mark.slow

BASE = ["--round_deadline_s", "60", "--wait_for_clients_s", "60", "--exit_when_done",
        "--local_epochs", "1", "--no_fed_eval", "--secagg_stage_timeout_s", "15"]
CLIENT = ["--epsilon_budget", "50"]


def _rows(fed: Federation) -> list[tuple[int, str, int, dict[str, float]]]:
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    try:
        rows = db.execute(
            "SELECT round, state, reported, metrics_json FROM rounds ORDER BY round")
        return [(r, s, n, json.loads(m or "{}")) for r, s, n, m in rows.fetchall()]
    finally:
        db.close()


def _wait_for(path: Path, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def test_a_hospital_killed_after_sharing_its_keys_is_unmasked_from_its_shares(
        secfed: Federation, bc_data: dict[int, Path]) -> None:
    """hospital_3 is SIGKILLed once the shares are out (while it trains): the round
    completes with the other two, its pairwise masks removed with its mask key rebuilt
    from their shares; restarted, it takes part in round 2 with fresh keys."""
    fed = secfed
    fed.start_server([*BASE, "--secure_aggregation", "--min_clients", "3", "--quorum", "0.6",
                      "--rounds", "2"])
    for name in HOSPITALS[:3]:
        fed.start_client(name, bc_data[3] / name, CLIENT)
    server_log = fed.log_dir / "server.log"
    assert _wait_for(server_log, "stage=collect", 120), fed.tail("server.log")
    fed.clients["hospital_3"].kill()
    fed.clients["hospital_3"].wait(timeout=10)
    assert _wait_for(server_log, "round_summary", 180), fed.tail("server.log", 60)
    fed.start_client("hospital_3", bc_data[3] / "hospital_3", CLIENT)
    assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log", 60)
    rows = _rows(fed)
    assert [(r, s, n) for r, s, n, _ in rows] == [(1, "completed", 2), (2, "completed", 3)]
    assert rows[0][3]["secagg_dropped"] == 1 and rows[1][3]["secagg_dropped"] == 0
    log = server_log.read_text()
    assert "dropped=1" in log  # secagg_unmasked ... dropped=1: a mask key was rebuilt
    sessions = [line.split("session=")[1].split()[0] for line in log.splitlines()
                if "secagg_open" in line]
    assert len(sessions) == len(set(sessions)) >= 2  # every attempt had its own session


def test_server_killed_while_unmasking_restarts_the_round_with_fresh_keys(
        secfed: Federation, bc_data: dict[int, Path]) -> None:
    fed = secfed
    args = [*BASE, "--secure_aggregation", "--min_clients", "3", "--rounds", "2"]
    port = fed.start_server(args, env={"FL_FAULT_POINT": "unmask@1"})
    for name in HOSPITALS[:3]:
        fed.start_client(name, bc_data[3] / name, CLIENT)
    assert fed.wait_server(timeout_s=240) == -9, fed.tail("server.log", 40)  # SIGKILLed
    first = (fed.log_dir / "server.log").read_text()
    assert "fault_point" in first or "unmask" in first
    assert not _rows(fed)  # nothing of round 1 was recorded
    fed.start_server(args, port=port)
    assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log", 60)
    rows = _rows(fed)
    assert [(r, s, n) for r, s, n, _ in rows] == [(1, "completed", 3), (2, "completed", 3)]
    assert all(m["secure"] == 1 for *_, m in rows)
    log = (fed.log_dir / "server.log").read_text()
    sessions = [line.split("session=")[1].split()[0] for line in log.splitlines()
                if "secagg_open" in line]
    assert len(sessions) == len(set(sessions)) >= 3  # round 1 twice (fresh keys), round 2


def _start(fed: Federation, data: Path, n: int, secure: bool) -> None:
    args = ["--min_clients", str(n), "--rounds", "1", "--no_dp", "--seed", "3",
            "--eval_data", str(data / "test"), *BASE]
    if secure:
        args.append("--secure_aggregation")
    fed.start_server(args)
    for name in HOSPITALS[:n]:
        fed.start_client(name, data / name, ["--allow_no_dp"])


def _final_accuracy(fed: Federation, secure: bool) -> float:
    assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log", 60)
    rows = _rows(fed)
    assert [s for _, s, _, _ in rows] == ["completed"]
    assert all(bool(m.get("secure")) == secure for *_, m in rows)
    return float(rows[-1][3]["eval_accuracy"])


@pytest.mark.parametrize("n", [3, 5])
def test_secure_aggregation_reaches_the_same_accuracy(
        secagg_pki: Path, bc_data: dict[int, Path], tmp_path: Path, n: int) -> None:
    """The same job (no DP, same seeds) with and without secure aggregation, side by
    side: only quantization separates them."""
    import shutil

    feds = {}
    try:
        for secure in (False, True):
            work = tmp_path / f"fed-{secure}"
            shutil.copytree(secagg_pki, work)
            feds[secure] = Federation(work, [], "breast_cancer")
            _start(feds[secure], bc_data[n], n, secure)
        accuracy = {secure: _final_accuracy(fed, secure) for secure, fed in feds.items()}
    finally:
        for fed in feds.values():
            fed.stop_all()
    assert abs(accuracy[True] - accuracy[False]) <= 0.005, accuracy
