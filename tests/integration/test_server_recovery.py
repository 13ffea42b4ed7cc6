"""The server keeps its promises under failure: quorum with a silent client, SIGKILL
mid-job and restart (no completed round lost or recorded twice, clients reconnect by
themselves), SIGTERM is a clean exit, and a restarted client keeps its ledger."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fl_client.connection import ServerConnection
from fl_client.identity import load_client_tls
from fl_demo.launcher import Federation, site_keys
from fl_proto import coordinator_pb2 as cpb
from tests.hostile.kit import checkpoint_sha, read_jobs, read_rounds

pytestmark = pytest.mark.slow

BASE = ["--local_epochs", "1", "--no_fed_eval", "--wait_for_clients_s", "60"]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def completed_rounds(fed: Federation) -> list[int]:
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    try:
        rows = db.execute("SELECT round FROM rounds WHERE state='completed' ORDER BY round")
        return [r[0] for r in rows.fetchall()]
    finally:
        db.close()


def status_or_none(fed: Federation) -> cpb.StatusReply | None:
    try:
        return fed.status(timeout_s=3)
    except grpc.RpcError:
        return None


def ledger_entries(fed: Federation, name: str) -> list[dict[str, object]]:
    path = fed.workdir / "sites" / name / "state" / f"privacy_ledger_{name}.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return list(data["entries"] if isinstance(data, dict) else data)


def test_round_closes_on_quorum_with_a_silent_client(federation: Federation,
                                                     breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server([*BASE, "--rounds", "1", "--min_clients", "3", "--quorum", "0.6",
                      "--round_deadline_s", "12", "--exit_when_done"])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    # hospital_3 joins and takes its task, then never answers
    ca, cert, key = load_client_tls(site_keys(fed.workdir, "hospital_3"), "hospital_3")
    silent = ServerConnection(f"127.0.0.1:{fed.port}", ca, cert, key, "hospital_3",
                              "breast_cancer", 100)
    silent.connect()
    silent.join()
    stream = silent.tasks()
    got: list[cpb.Task] = []

    def read() -> None:
        try:
            for task in stream:
                got.append(task)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert fed.wait_server(timeout_s=120) == 0, fed.tail("server.log")
    finally:
        stream.cancel()
        silent.close()
    assert any(t.kind == cpb.TRAIN for t in got), "the silent client was never given a task"
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    row = db.execute("SELECT state, selected, reported, failed FROM rounds").fetchone()
    assert row == ("completed", 3, 2, 1)
    assert "no update before the round deadline" in (fed.log_dir / "server.log").read_text()


def test_sigkill_mid_job_restart_finishes_every_round_once(federation: Federation,
                                                          breast_cancer_data: Path) -> None:
    fed = federation
    args = [*BASE, "--rounds", "4", "--min_clients", "2", "--round_deadline_s", "60",
            "--exit_when_done"]
    # the server SIGKILLs itself inside round 2's aggregation (tests-only fault point):
    # mid-job whatever the speed of a round (the small model's take a tenth of a second,
    # faster than any polling of Status could catch a phase)
    port = fed.start_server(args, env={"FL_FAULT_POINT": "aggregate@2"})
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "100"])
    assert fed.wait_server(timeout_s=240) == -signal.SIGKILL, fed.tail("server.log")
    state = fed.workdir / "server_state"
    (job_id, job_state), = read_jobs(state)
    assert job_state == "running"
    before = read_rounds(state, job_id)
    assert before, "no round was recorded before the kill"
    fed.start_server(args, port=port)
    assert fed.wait_server(timeout_s=240) == 0, fed.tail("server.log")
    # the same job was continued (a restart that began a new job would also record
    # rounds 1-4 once each, under another job id)
    assert read_jobs(state) == [(job_id, "completed")]
    after = read_rounds(state, job_id)
    assert [(r.round, r.state) for r in after] == [(n, "completed") for n in range(1, 5)]
    # from the last recorded round: the rounds recorded before the kill kept their
    # models and figures (none was run again), and the restart said where it resumed
    assert [(r.round, r.model_sha256, r.metrics) for r in after[:len(before)]] \
        == [(r.round, r.model_sha256, r.metrics) for r in before]
    log = (fed.log_dir / "server.log").read_text()
    assert re.search(rf"job_resumed job={job_id} completed_rounds={len(before)}\b", log), log
    assert checkpoint_sha(state, job_id, 4) == after[-1].model_sha256
    for name, proc in fed.clients.items():  # the same client processes, never restarted
        assert proc.wait(timeout=30) == 0, fed.tail(f"{name}.log")


def test_sigterm_stops_cleanly_and_a_killed_client_keeps_its_ledger(
        federation: Federation, breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server([*BASE, "--rounds", "30", "--min_clients", "2",
                      "--round_deadline_s", "60"])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "1000"])
    wait_until(lambda: len(ledger_entries(fed, "hospital_1")) >= 1, 120,
               "hospital_1 to record a round in its ledger")
    fed.clients["hospital_1"].send_signal(signal.SIGKILL)
    fed.clients["hospital_1"].wait(timeout=10)
    kept = ledger_entries(fed, "hospital_1")
    fed.start_client("hospital_1", breast_cancer_data / "hospital_1",
                     ["--epsilon_budget", "1000"])
    wait_until(lambda: len(ledger_entries(fed, "hospital_1")) > len(kept), 120,
               "the restarted hospital_1 to train again")
    after = ledger_entries(fed, "hospital_1")
    assert after[:len(kept)] == kept, "the restarted client rewrote its ledger"
    # a client told to stop mid-job finishes or abandons its work and exits 0
    fed.clients["hospital_2"].send_signal(signal.SIGTERM)
    assert fed.clients["hospital_2"].wait(timeout=60) == 0, fed.tail("hospital_2.log")
    assert fed.server is not None
    fed.server.send_signal(signal.SIGTERM)
    assert fed.wait_server(timeout_s=30) == 0, fed.tail("server.log")
    # a clean stop leaves the job resumable: still running (neither failed nor
    # completed, either of which would make the next start begin a new job), its
    # rounds contiguous, the last one's checkpoint the model it recorded
    state = fed.workdir / "server_state"
    (job_id, job_state), = read_jobs(state)
    assert job_state == "running"
    rows = read_rounds(state, job_id)
    assert rows and [(r.round, r.state) for r in rows] \
        == [(n, "completed") for n in range(1, len(rows) + 1)]
    assert checkpoint_sha(state, job_id, rows[-1].round) == rows[-1].model_sha256
    assert not list((state / "spool").glob("*.spool"))
