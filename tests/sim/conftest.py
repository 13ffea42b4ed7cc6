"""Helpers for the simulation's tests: the real `python -m fl_sim` in a subprocess, so
Ray's processes belong to it and end with it, whatever the test does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Ray kept small: two CPUs, no dashboard, workers' logs not forwarded (the defaults).
RAY_SMALL = ["--num_cpus", "2", "--no_plot", "--progress_s", "10"]


def run_sim(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run the CLI; on timeout its whole process group (Ray included) is killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"fl_sim did not finish in {timeout_s} s:\n{out[-3000:]}\n"
                             f"{err[-3000:]}") from None
    finally:
        # Ray's own daemons run in the CLI's session: anything left is ended with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def load_report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report
