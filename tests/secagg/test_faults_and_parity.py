"""Secure aggregation under faults, and its accuracy against the same run without it,
over real processes on loopback."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_core.secagg.quantize import QuantParams, dequantize
from fl_demo.launcher import Federation
from tests.hostile.kit import checkpoint_state, read_jobs
from tests.secagg.conftest import HOSPITALS, start_client_double

pytestmark = pytest.mark.slow

BASE = ["--round_deadline_s", "60", "--wait_for_clients_s", "60", "--exit_when_done",
        "--local_epochs", "1", "--no_fed_eval", "--secagg_stage_timeout_s", "15"]
CLIENT = ["--epsilon_budget", "50"]
# A killed hospital holds its round open until the deadline: short, but enough for the
# others' key stages, training of the 62-parameter model and upload on a loaded machine.
FAULT_DEADLINE_S = 25


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


def _expected_step(plain: Path, rnd: int, survivors: list[str]) -> torch.Tensor:
    """What FedAvg must add to the model in round `rnd`: the survivors' quantized
    inputs (as the hospitals meant them, recorded by tests.secagg.client_double)
    summed mod 2^32, dequantized and divided by their example total."""
    total: np.ndarray | None = None
    examples = 0
    for cid in survivors:
        words = np.load(plain / f"plain-r{rnd}-{cid}.npy")
        total = words.copy() if total is None else total + words
        meta = json.loads((plain / f"meta-r{rnd}-{cid}.json").read_text())
        examples += meta["num_examples"]
    assert total is not None
    params = QuantParams(meta["bits"], meta["clip"])
    return torch.from_numpy(dequantize(total, params, meta["divisor"]) / examples)


def _model_step(state_dir: Path, rnd: int) -> torch.Tensor:
    (job_id, _), = read_jobs(state_dir)
    before = checkpoint_state(state_dir, job_id, rnd - 1)
    after = checkpoint_state(state_dir, job_id, rnd)
    return torch.cat([(after[k].double() - before[k].double()).reshape(-1)
                      for k in before if before[k].is_floating_point()])


def test_hospitals_killed_after_sharing_and_mid_masked_upload_leave_the_survivors_sum(
        secfed: Federation, bc_data: dict[int, Path], tmp_path: Path) -> None:
    """Round 1: hospital_3 is SIGKILLed once the shares are out (while it trains).
    Round 2: hospital_3 comes back as tests.secagg.secure_slow_uploader, which takes
    part in the key stages and is SIGKILLed halfway through streaming its masked input
    (32-byte chunks). Both rounds complete with exactly the other two hospitals' sum
    (the dead one's pairwise masks removed with its mask key rebuilt from their
    shares; nothing of its half upload in the model), and every attempt has its own
    session."""
    fed = secfed
    plain = tmp_path / "plain"
    fed.start_server([*BASE, "--secure_aggregation", "--min_clients", "3", "--quorum", "0.6",
                      "--rounds", "2", "--round_deadline_s", str(FAULT_DEADLINE_S)])
    for name in HOSPITALS[:2]:
        start_client_double(fed, name, bc_data[3] / name, plain, CLIENT)
    fed.start_client("hospital_3", bc_data[3] / "hospital_3", CLIENT)
    server_log = fed.log_dir / "server.log"
    assert _wait_for(server_log, "stage=collect", 120), fed.tail("server.log")
    fed.clients["hospital_3"].kill()
    fed.clients["hospital_3"].wait(timeout=10)
    assert _wait_for(server_log, "round_summary", 120), fed.tail("server.log", 60)
    marker = tmp_path / "uploader.marker"
    fed.clients["hospital_3"] = fed._spawn(
        ["-m", "tests.secagg.secure_slow_uploader", str(fed.port), str(fed.workdir),
         "hospital_3", str(marker)], "uploader.log")
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        assert fed.clients["hospital_3"].poll() is None, fed.tail("uploader.log")
        time.sleep(0.1)
    sent, chunks = map(int, marker.read_text().split())
    assert 0 < sent < chunks  # truly mid-upload, several chunks in
    fed.clients["hospital_3"].kill()
    fed.clients["hospital_3"].wait(timeout=10)
    assert fed.wait_server(timeout_s=180) == 0, fed.tail("server.log", 60)
    rows = _rows(fed)
    assert [(r, s, n) for r, s, n, _ in rows] == [(1, "completed", 2), (2, "completed", 2)]
    assert all(m["secagg_dropped"] == 1 for *_, m in rows)
    log = server_log.read_text()
    assert log.count("dropped=1") >= 2  # secagg_unmasked ... dropped=1: a mask key rebuilt
    sessions = [line.split("session=")[1].split()[0] for line in log.splitlines()
                if "secagg_open" in line]
    assert len(sessions) == len(set(sessions)) == 2
    state_dir = fed.workdir / "server_state"
    for rnd in (1, 2):  # the right model: exactly the survivors' quantized sum
        got = _model_step(state_dir, rnd)
        want = _expected_step(plain, rnd, list(HOSPITALS[:2]))
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (rnd, got - want)


def test_server_killed_while_unmasking_restarts_the_round_with_fresh_keys(
        secfed: Federation, bc_data: dict[int, Path], tmp_path: Path) -> None:
    """SIGKILL at the unmask fault point of round 1 (masked inputs summed, reveals
    asked for): nothing of the round is recorded; the restarted server runs round 1
    again under a new session, and its model is exactly the second attempt's sum."""
    fed = secfed
    plain = tmp_path / "plain"
    args = [*BASE, "--secure_aggregation", "--min_clients", "3", "--rounds", "1"]
    port = fed.start_server(args, env={"FL_FAULT_POINT": "unmask@1"})
    for name in HOSPITALS[:3]:
        start_client_double(fed, name, bc_data[3] / name, plain, CLIENT)
    assert fed.wait_server(timeout_s=240) == -9, fed.tail("server.log", 40)  # SIGKILLed
    first = (fed.log_dir / "server.log").read_text()
    assert "fault_point" in first or "unmask" in first
    assert not _rows(fed)  # nothing of round 1 was recorded
    fed.start_server(args, port=port)
    assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log", 60)
    rows = _rows(fed)
    assert [(r, s, n) for r, s, n, _ in rows] == [(1, "completed", 3)]
    assert all(m["secure"] == 1 for *_, m in rows)
    log = (fed.log_dir / "server.log").read_text()
    sessions = [line.split("session=")[1].split()[0] for line in log.splitlines()
                if "secagg_open" in line]
    assert len(sessions) == len(set(sessions)) == 2  # round 1 twice, fresh keys each time
    # the hospitals' records are of their last masking: the second attempt's
    got = _model_step(fed.workdir / "server_state", 1)
    want = _expected_step(plain, 1, list(HOSPITALS[:3]))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), got - want


def _start_server(fed: Federation, data: Path, n: int, rounds: int, secure: bool) -> None:
    # a loaded machine starts 2 servers and 2n clients slowly: waiting for the clients
    # longer costs nothing when they come sooner
    args = ["--min_clients", str(n), "--rounds", str(rounds), "--no_dp", "--seed", "3",
            "--eval_data", str(data / "test"), *BASE, "--wait_for_clients_s", "240"]
    if secure:
        args.append("--secure_aggregation")
    fed.start_server(args, timeout_s=180)


def _final_accuracy(fed: Federation, rounds: int, secure: bool) -> float:
    assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log", 60)
    rows = _rows(fed)
    assert [s for _, s, _, _ in rows] == ["completed"] * rounds
    assert all(bool(m.get("secure")) == secure for *_, m in rows)
    return float(rows[-1][3]["eval_accuracy"])


@pytest.mark.parametrize("task,n,rounds", [("breast_cancer", 3, 1), ("breast_cancer", 5, 1),
                                           ("glaucoma", 3, 2)])
def test_secure_aggregation_reaches_the_same_accuracy(
        secagg_pki: Path, bc_data: dict[int, Path], glaucoma_data: Path, tmp_path: Path,
        task: str, n: int, rounds: int) -> None:
    """The same job (no DP, same seeds) with and without secure aggregation, side by
    side: only quantization separates them. glaucoma is the image model (its CNN on
    tiny synthetic fundus photographs, 2 rounds)."""
    import shutil

    data = glaucoma_data if task == "glaucoma" else bc_data[n]
    feds = {}
    try:
        for secure in (False, True):
            work = tmp_path / f"fed-{secure}"
            shutil.copytree(secagg_pki, work)
            feds[secure] = Federation(work, [], task)
            _start_server(feds[secure], data, n, rounds, secure)
        for fed in feds.values():  # both servers up before any hospital starts
            for name in HOSPITALS[:n]:
                fed.start_client(name, data / name, ["--allow_no_dp"])
        accuracy = {secure: _final_accuracy(fed, rounds, secure)
                    for secure, fed in feds.items()}
    finally:
        for fed in feds.values():
            fed.stop_all()
    assert abs(accuracy[True] - accuracy[False]) <= 0.005, accuracy
