"""Mistakes an operator will make, over real processes: each fails fast with one line
naming the cause, and loses nothing (the running server, its job and its rounds stay
as they were)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_demo.launcher import REPO_ROOT, Federation, site_keys
from fl_server.store import DB_NAME, Store

# Each case starts several daemons (each imports torch): generous bounds for a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENV = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def run(module: str, args: list[str], cwd: Path, timeout: float = 240
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def server_args(fed: Federation, state_dir: Path, port: int, *extra: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--keys_dir", str(fed.workdir / "keys"),
            "--state_dir", str(state_dir), "--model_type", "breast_cancer", *extra]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fl-server: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def job_snapshot(state_dir: Path) -> tuple[str, str, dict[str, object], list[int]]:
    store = Store(state_dir)
    try:
        job = store.latest_job()
        assert job is not None
        return job.job_id, job.state, dict(job.config), [r.round for r in store.rounds(job.job_id)]
    finally:
        store.close()


def test_one_server_per_port_and_per_state_folder(federation: Federation,
                                                  tmp_path: Path) -> None:
    fed = federation
    fed.start_server(["--rounds", "1", "--min_clients", "2"])
    before = fed.status()
    other_state = tmp_path / "other_state"
    same_port = run("fl_server.server", server_args(fed, other_state, fed.port), tmp_path)
    line = one_error_line(same_port)
    assert f"127.0.0.1:{fed.port}" in line and "in use" in line, line
    assert not (other_state / DB_NAME).exists(), "a job row was written before the bind"
    same_state = run("fl_server.server",
                     server_args(fed, fed.workdir / "server_state", 0), tmp_path)
    line = one_error_line(same_state)
    assert "in use by another fl-server" in line, line
    assert f"pid {fed.server.pid}" in line if fed.server else False, line
    after = fed.status()  # the first server is untouched and still the only one
    assert (after.job_id, after.model_sha256) == (before.job_id, before.model_sha256)


def test_a_running_jobs_settings_cannot_change(federation: Federation, tmp_path: Path) -> None:
    fed = federation
    state = fed.workdir / "server_state"
    fed.start_server(["--rounds", "3", "--min_clients", "2", "--noise_multiplier", "1.1",
                      "--strategy", "fedavg"])
    job_id = fed.status().job_id
    fed.stop_all()
    job, state_name, config, rounds = job_snapshot(state)
    assert (job, state_name) == (job_id, "running")
    # the settled job config holds the task defaults it resolved, not zeros
    assert config["noise_multiplier"] == 1.1 and int(str(config["local_epochs"])) >= 1
    assert float(str(config["max_grad_norm"])) > 0 and float(str(config["delta"])) > 0

    changed = run("fl_server.server", server_args(fed, state, 0, "--noise_multiplier", "1.5",
                                                  "--rounds", "3"), tmp_path)
    line = one_error_line(changed)
    assert "noise_multiplier=1.5 (the job has 1.1)" in line and "--new_job" in line, line
    other_strategy = run("fl_server.server",
                         server_args(fed, state, 0, "--strategy", "fedprox"), tmp_path)
    assert "strategy=fedprox (the job has fedavg)" in one_error_line(other_strategy)
    # a flag that would kill the job later, or a TOML value of the wrong type, is refused
    # before anything is touched (tests/server/test_config.py checks every such value)
    line = one_error_line(run("fl_server.server",
                              server_args(fed, state, 0, "--round_deadline_s", "inf"), tmp_path))
    assert "round_deadline_s must be a finite number" in line, line
    toml = tmp_path / "server.toml"
    toml.write_text("rounds = true\n")
    line = one_error_line(run("fl_server.server",
                              server_args(fed, state, 0, "--config", str(toml)), tmp_path))
    assert f"config file {toml}: rounds must be a whole number" in line, line
    assert job_snapshot(state) == (job_id, "running", config, rounds)

    # without the flags the same job resumes with every stored setting
    fed.start_server(["--min_clients", "2"])
    status = fed.status()
    assert (status.job_id, status.strategy, status.total_rounds) == (job_id, "fedavg", 3)
    fed.stop_all()
    # --new_job is the explicit way to change settings
    fed.start_server(["--new_job", "--strategy", "fedprox", "--strategy_param", "mu=0.1",
                      "--rounds", "2"])
    status = fed.status()
    assert status.job_id != job_id and status.strategy == "fedprox"


def test_a_second_daemon_with_one_identity_is_refused(federation: Federation,
                                                      breast_cancer_data: Path) -> None:
    fed = federation
    # two hospitals needed: no round starts (and the job cannot end) until hospital_2
    # joins at the end, so hospital_1 is surely live while its double is tried
    fed.start_server(["--rounds", "2", "--min_clients", "2", "--fraction", "1.0",
                      "--no_fed_eval", "--round_deadline_s", "120"])
    fed.start_client("hospital_1", breast_cancer_data / "hospital_1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            c.connected for c in fed.status().clients if c.client_id == "hospital_1"):
        time.sleep(0.2)
    keys = str(site_keys(fed.workdir, "hospital_1"))
    base = ["--client_id", "hospital_1", "--server_url", f"127.0.0.1:{fed.port}",
            "--data_path", str(breast_cancer_data / "hospital_1"),
            "--model_type", "breast_cancer", "--keys_dir", keys]
    # the same state folder: refused at once, before any connection
    same_state = run("fl_client.client",
                     [*base, "--state_dir", str(fed.workdir / "sites" / "hospital_1" / "state")],
                     fed.workdir)
    assert same_state.returncode == 2, same_state.stderr[-2000:]
    assert "in use by another fl-client" in same_state.stderr
    # another folder: the server refuses the second session and the client says why
    started = time.monotonic()
    second = run("fl_client.client", [*base, "--state_dir", str(fed.workdir / "second")],
                 fed.workdir)
    assert second.returncode == 6, second.stderr[-2000:]
    message = second.stderr.strip().splitlines()[-1]
    assert re.search(r"hospital_1 already has a live session from ipv[46]:", message), message
    assert "--replace_session" in message and time.monotonic() - started < 200
    # the first daemon was never displaced: with hospital_2 it finishes the job
    fed.start_client("hospital_2", breast_cancer_data / "hospital_2")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and fed.status().job_state == "running":
        time.sleep(0.3)
    status = fed.status()
    assert status.job_state == "completed", fed.tail("server.log")
    assert [r.round for r in status.rounds] == [1, 2]
    assert all(r.reported == 2 for r in status.rounds)
