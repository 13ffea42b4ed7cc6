"""What an operator's tooling sees: health, reflection, Status, clear start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fl_demo.launcher import REPO_ROOT, Federation

pytestmark = pytest.mark.slow


def test_health_reflection_and_status(federation: Federation) -> None:
    fed = federation
    fed.start_server(["--rounds", "1", "--min_clients", "2"])
    with fed.admin_channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fl.v1.Coordinator", "fl.v1.Aggregator"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert {"fl.v1.Coordinator", "fl.v1.Aggregator", "grpc.health.v1.Health"} <= names
    status = fed.status()
    assert status.model_type == "breast_cancer"
    assert status.job_state == "running" and status.total_rounds == 1
    assert status.phase == "select" and len(status.model_sha256) == 64
    # the operator's CLI: a table, or JSON for scripts
    admin = [sys.executable, "-m", "fl_server.admin", "--server_url",
             f"127.0.0.1:{fed.port}", "--keys_dir", str(fed.workdir / "keys")]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    table = subprocess.run(admin, capture_output=True, text=True, timeout=60, env=env)
    assert table.returncode == 0, table.stderr
    assert f"job {status.job_id}" in table.stdout and "phase select" in table.stdout
    as_json = subprocess.run([*admin, "--json"], capture_output=True, text=True, timeout=60,
                             env=env)
    assert json.loads(as_json.stdout)["model_sha256"] == status.model_sha256
    wrong = subprocess.run([*admin, "--admin", "hospital_1"], capture_output=True, text=True,
                           timeout=60, env=env)
    assert wrong.returncode == 2 and "fl-admin: error:" in wrong.stderr


def run_server(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_server.server", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})


def test_start_up_errors_are_one_clear_line(tmp_path: Path, pki: Path) -> None:
    missing = run_server(["--keys_dir", str(tmp_path / "nowhere"), "--port", "0"], tmp_path)
    assert missing.returncode == 2
    assert "fl-server: error:" in missing.stderr and "Traceback" not in missing.stderr
    bad_model = run_server(["--keys_dir", str(pki / "keys"), "--model_type", "xray"], tmp_path)
    assert bad_model.returncode == 2 and "unknown model type 'xray'" in bad_model.stderr
    bad_flag = run_server(["--fraction", "1.5", "--keys_dir", str(pki / "keys")], tmp_path)
    assert bad_flag.returncode == 2 and "fraction" in bad_flag.stderr
    toml = tmp_path / "server.toml"
    toml.write_text('rounds = 3\nbogus = 1\n')
    bad_toml = run_server(["--config", str(toml), "--keys_dir", str(pki / "keys")], tmp_path)
    assert bad_toml.returncode == 2 and "unknown keys: bogus" in bad_toml.stderr
