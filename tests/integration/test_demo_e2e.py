"""`make demo`, scaled down: the real `python -m fl_demo` command, real daemons on loopback.

Runs the demo as a user does (a subprocess, its own exit code, its own signal
handling), then checks what it promises: the global model learned, every hospital's
epsilon is reported, report.json and report.png exist, and not one of the processes
it started is left running, neither after success nor after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_demo.demo import DemoError, parse_args, prepare_out_dir, projected_epsilon
from fl_demo.live import _summary_epsilon
from fl_models.registry import get_task

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ["hospital_1", "hospital_2"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _alive(pid: int) -> bool:
    """True while `pid` is still one of the federation's daemons (a reused pid or a
    reaped zombie does not count)."""
    proc = Path(f"/proc/{pid}")
    if proc.parent.exists():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return b"fl_server" in cmdline or b"fl_client" in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _assert_all_gone(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    left = dict(pids)
    while left and time.monotonic() < deadline:
        left = {name: pid for name, pid in left.items() if _alive(pid)}
        time.sleep(0.1)
    assert not left, f"the demo left processes running: {left}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_two_hospitals_two_rounds(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fl_demo", "--hospitals", "2", "--rounds", "2", "--out", str(out),
         "--device", "auto"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=220)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    assert report["processes"].keys() == {"server", *HOSPITALS}
    _assert_all_gone(report["processes"])

    rounds = [r for r in report["rounds"] if r["state"] == "completed"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["reported"] == 2 for r in rounds)
    # Clearly better than chance (and than always answering "benign": 0.63).
    glob = report["final"]["global"]
    assert glob["accuracy"] > 0.8, glob
    assert glob["auroc"] > 0.85, glob
    # Every hospital's epsilon, after every round, growing and within its budget.
    for name in HOSPITALS:
        spent = [r["epsilon"][name] for r in rounds]
        assert all(e is not None and e > 0 for e in spent), (name, spent)
        assert spent == sorted(spent), (name, spent)
        assert report["epsilon"][name] == spent[-1]
        assert spent[-1] <= report["epsilon_budget"]
    # The local-only comparison: each hospital, with DP, on the same test set.
    local = report["final"]["local_only"]
    assert local.keys() == set(HOSPITALS)
    # Every model's figures are one confusion matrix on the global test set: accuracy
    # counts whole cases and agrees with sensitivity and specificity at the set's
    # own class counts (a figure from another set or a mixed-up field cannot).
    test_labels = get_task("breast_cancer").load_split(out / "data" / "test", "test").tensors[1]
    positives, negatives = int(test_labels.sum()), int((test_labels == 0).sum())
    n = positives + negatives
    assert n == report["data"]["test_examples"]
    for name, metrics in [("global", glob)] + [(h, local[h]["metrics"]) for h in HOSPITALS]:
        correct = metrics["accuracy"] * n
        assert correct == pytest.approx(round(correct), abs=1e-6), (name, metrics)
        assert metrics["sensitivity"] * positives + metrics["specificity"] * negatives \
            == pytest.approx(correct, abs=1e-6), (name, metrics)
        assert metrics["balanced_accuracy"] == pytest.approx(
            (metrics["sensitivity"] + metrics["specificity"]) / 2), (name, metrics)
    for name in HOSPITALS:
        assert 0 < local[name]["epsilon"] <= report["epsilon_budget"]

    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # four panels, not an empty canvas
    # --device auto reached the daemons, which say where they train
    where = "cuda" if torch.cuda.is_available() else "cpu"
    for name in HOSPITALS:
        log = (out / "logs" / f"{name}.log").read_text()
        assert f"device={where}" in log or f'device="{where} (' in log, name
    # The live table and the closing comparison were printed.
    assert "eval acc" in proc.stdout and "eps h2" in proc.stdout
    assert "federated (global)" in proc.stdout and "hospital_2 alone" in proc.stdout
    print(f"demo (2 hospitals, 2 rounds) took {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_demo", "--hospitals", "2", "--rounds", "50", "--out", str(out)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        pids_file = out / "pids.json"
        pids: dict[str, int] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if pids_file.exists():
                pids = json.loads(pids_file.read_text())
                if pids.keys() == {"server", *HOSPITALS}:
                    break
            time.sleep(0.2)
        assert pids.keys() == {"server", *HOSPITALS}, f"demo did not start its daemons: {pids}"
        # mid-flight: round 1 handed out and training (the server logs the phase)
        server_log = out / "logs" / "server.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if server_log.exists() and "round=1 phase=train" in server_log.read_text():
                break
            time.sleep(0.1)
        assert "round=1 phase=train" in server_log.read_text(), "round 1 never started"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the demo hung: end it and whatever it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            for pid in pids.values():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, stdout[-2000:] + stderr[-2000:]
    assert "interrupted" in stderr
    _assert_all_gone(pids)
    assert not (out / "report.png").exists()
    assert json.loads((out / "report.json").read_text())["status"] == "failed"


def test_out_dir_is_only_deleted_when_the_demo_made_it(tmp_path: Path) -> None:
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DemoError, match="refusing to delete"):
        prepare_out_dir(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    demo = tmp_path / "demo"
    prepare_out_dir(demo)
    (demo / "old_run.txt").write_text("stale")
    prepare_out_dir(demo)  # made by the demo: recreated
    assert not (demo / "old_run.txt").exists()


def test_round_summary_epsilon_and_projection() -> None:
    summary = json.dumps({"eval_accuracy": 0.9, "clients": {
        "hospital_1": {"epsilon_total": 5.75, "num_examples": 136},
        "hospital_2": {"num_examples": 154}}})
    assert _summary_epsilon(summary) == {"hospital_1": 5.75}
    assert _summary_epsilon("not json") == {}
    # The projection is the trainer's own accounting: 136 examples, batch 32 -> 5
    # Poisson batches per epoch, 2 epochs, noise 1.0 (5.75 in a real round 1).
    assert projected_epsilon(136, 32, 2, 1.0, 1e-5) == pytest.approx(5.754, abs=0.01)


def test_device_flag() -> None:
    assert parse_args([]).device == "cpu"
    assert parse_args(["--device", "auto"]).device == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
            parse_args(["--device", "cuda"])
