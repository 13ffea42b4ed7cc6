"""The server SIGKILLed while it aggregates, then restarted: the job continues and
ends with every round recorded exactly once and the same final model, bit for bit,
as an uninterrupted run with the same seed. The hospitals are scripted (their
update depends only on the round and on who they are, see kit.deterministic_delta)
so two runs can be compared exactly; they reconnect by themselves after the kill."""

from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fl_demo.launcher import Federation
from fl_server.faults import FAULT_ENV
from tests.hostile.kit import (
    RoundRow,
    ScriptedClient,
    checkpoint_sha,
    read_jobs,
    read_rounds,
    scripted_clients,
    site_identity,
)

pytestmark = pytest.mark.slow

ROUNDS = 4
KILL_IN_ROUND = 2
FLAGS = ["--rounds", str(ROUNDS), "--min_clients", "2", "--quorum", "1.0", "--seed", "11",
         "--no_fed_eval", "--round_deadline_s", "60", "--wait_for_clients_s", "120",
         "--exit_when_done", "--final_model_grace_s", "2"]


def run_job(fed: Federation, kill_in_round: int | None
            ) -> tuple[str, list[RoundRow], dict[str, object]]:
    """One whole job with two scripted hospitals; optionally the server SIGKILLs itself
    at the fault point inside aggregation of `kill_in_round` (FL_FAULT_POINT, see
    fl_server/faults.py: after the strategy has aggregated, before the new model is
    set, checkpointed or the round recorded), and is restarted on the same port
    without the fault point."""
    fault_env = {FAULT_ENV: f"aggregate@{kill_in_round}"} if kill_in_round else {}
    port = fed.start_server(FLAGS, env=fault_env)
    state_dir = fed.workdir / "server_state"
    clients = [ScriptedClient(lambda: fed.port, site_identity(fed.workdir, f"hospital_{i + 1}"),
                              f"hospital_{i + 1}", i) for i in range(2)]
    info: dict[str, object] = {}
    with scripted_clients(clients):
        if kill_in_round is not None:
            assert fed.server is not None
            assert fed.wait_server(timeout_s=120) == -signal.SIGKILL, fed.tail("server.log")
            job_before = read_jobs(state_dir)
            info["recorded_at_kill"] = [r.round for r in read_rounds(state_dir)]
            log_text = (fed.log_dir / "server.log").read_text()
            info["fault_logged"] = f"fault_point point=aggregate round={kill_in_round}" \
                in log_text
            phases = re.findall(rf"round={kill_in_round} phase=(\w+)", log_text)
            info["phase_at_kill"] = phases[-1] if phases else ""
            fed.start_server(FLAGS, port=port)
            info["job_before"] = job_before
        code = fed.wait_server(timeout_s=120)
        assert code == 0, fed.tail("server.log")
        for client in clients:
            assert client.finished.wait(timeout=30), f"{client.client_id} never got STOP"
    (job_id, job_state), = read_jobs(state_dir)
    assert job_state == "completed"
    if kill_in_round is not None:
        assert info["job_before"] == [(job_id, "running")]  # the same job, continued
    return job_id, read_rounds(state_dir, job_id), info


def test_server_killed_during_aggregation_continues_the_same_job(
        fault_pki: Path, tmp_path: Path) -> None:
    import shutil

    def one_run(name: str, kill: int | None) -> tuple[Path, str, list[RoundRow],
                                                        dict[str, object]]:
        work = tmp_path / name
        shutil.copytree(fault_pki, work)
        fed = Federation(work, [], "breast_cancer")
        try:
            return (work, *run_job(fed, kill))
        finally:
            fed.stop_all()

    # the two runs are independent (own keys copy, state dir, port): run them side by side
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {name: pool.submit(one_run, name, kill)
                for name, kill in (("uninterrupted", None), ("killed", KILL_IN_ROUND))}
        results = {name: future.result(timeout=400) for name, future in runs.items()}
    (work_a, job_a, rounds_a, _), (work_b, job_b, rounds_b, info) = \
        results["uninterrupted"], results["killed"]
    # it died at the fault point, inside aggregation of the round, and that round was
    # not recorded: the rounds before it were, exactly once
    assert info["fault_logged"], info
    assert info["phase_at_kill"] == "aggregate", info
    assert info["recorded_at_kill"] == list(range(1, KILL_IN_ROUND)), info
    assert [r.round for r in rounds_b] == list(range(1, ROUNDS + 1))  # each exactly once
    assert all(r.state == "completed" and r.accepted == {"hospital_1", "hospital_2"}
               for r in rounds_b)
    # the same model after every round, and the same final checkpoint on disk
    assert [r.model_sha256 for r in rounds_b] == [r.model_sha256 for r in rounds_a]
    final_a = checkpoint_sha(work_a / "server_state", job_a, ROUNDS)
    final_b = checkpoint_sha(work_b / "server_state", job_b, ROUNDS)
    assert final_a == final_b == rounds_a[-1].model_sha256
