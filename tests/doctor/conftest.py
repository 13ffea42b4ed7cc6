"""Two federations on loopback (their own CA each), hospital data, and helpers to run
the client daemon and the doctors as an operator would, with bounded timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_demo.launcher import REPO_ROOT, make_pki, site_keys
from fl_models.registry import get_task

HOSPITALS = ["hospital_1", "hospital_2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("doctor")
    make_pki(base / "fed", HOSPITALS)
    make_pki(base / "other", HOSPITALS)  # another federation: another CA
    get_task("breast_cancer").prepare(base / "data", clients=2, alpha=None, seed=7)
    return base


def data_of(root: Path, name: str) -> Path:
    return root / "data" / name


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out["PYTHONPATH"] = str(REPO_ROOT)
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def client_args(root: Path, fed: str, name: str, port: int, *extra: str) -> list[str]:
    return ["--client_id", name, "--server_url", f"127.0.0.1:{port}",
            "--data_path", str(data_of(root, name)), "--model_type", "breast_cancer",
            "--keys_dir", str(site_keys(root / fed, name)),
            "--state_dir", str(root / fed / "sites" / name / "state"), *extra]


def spawn(module: str, args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], deadline: float) -> tuple[int, str, str]:
    """Wait until `deadline` (time.monotonic()); a process still running then is killed
    and the test fails, showing its stderr."""
    timeout_s = max(1.0, deadline - time.monotonic())
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{proc.args} still running after {timeout_s} s:\n{err[-3000:]}")
    return proc.returncode, out, err
