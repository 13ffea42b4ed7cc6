"""Issue 15 items 3 and 4 with real daemons over mTLS on loopback:
- every hospital that trained a completed job ends it holding the final model (the
  server's last checkpoint, same SHA-256) beside its model card, and
  ``python -m fl_client.predict`` on the server's --eval_data folder gives the server's
  own evaluation figures;
- SIGINT during a long local epoch: the client exits within 2 s, the round is
  reported "stopped by the operator", and the ledger holds that round once, abandoned,
  charged for the steps taken."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_client.model_store import CARD_FILE, MODEL_FILE, load_model, model_sha256
from fl_demo.launcher import Federation
from fl_proto import coordinator_pb2 as cpb
from tests.hostile.kit import (
    HostileClient,
    checkpoint_state,
    read_jobs,
    read_rounds,
    site_identity,
    wait_for,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVER = ["--min_clients", "2", "--round_deadline_s", "120", "--wait_for_clients_s", "90",
          "--exit_when_done", "--local_epochs", "1"]


def _predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_client.predict", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_hospitals_get_final_model_and_predict_matches_server(
        federation: Federation, breast_cancer_data: Path, tmp_path: Path) -> None:
    fed = federation
    eval_dir = breast_cancer_data / "test"
    fed.start_server([*SERVER, "--rounds", "2", "--eval_data", str(eval_dir)])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    assert fed.wait_server(timeout_s=400) == 0, fed.tail("server.log")
    for name, proc in fed.clients.items():
        assert proc.wait(timeout=60) == 0, fed.tail(f"{name}.log")
    server_state = fed.workdir / "server_state"
    (job_id, job_state), = read_jobs(server_state)
    assert job_state == "completed"
    final = checkpoint_state(server_state, job_id, 2)
    expected = model_sha256(final)
    for name in fed.hospitals:
        folder = fed.workdir / "sites" / name / "state" / "models" / job_id
        card = json.loads((folder / CARD_FILE).read_text())
        state, meta = load_model(folder / MODEL_FILE)
        assert model_sha256(state) == expected == card["sha256"], fed.tail(f"{name}.log")
        assert list(state) == list(final)
        assert meta["model_type"] == card["model_type"] == "breast_cancer"
        assert (card["job_id"], card["rounds"]) == (job_id, 2)
        ledger = json.loads((fed.workdir / "sites" / name / "state"
                             / f"privacy_ledger_{name}.json").read_text())
        assert [(r["round"], r["epsilon_round"]) for r in card["privacy"]["rounds"]] \
            == [(e["round"], e["epsilon_round"]) for e in ledger["entries"]] != []
        assert 0 < card["privacy"]["epsilon_job"] <= 50
        assert "accuracy" in card["local_test_metrics"]
    # the hospital's predict on the server's evaluation folder = the server's figures
    server_eval = read_rounds(server_state, job_id)[-1].metrics
    model = fed.workdir / "sites" / "hospital_1" / "state" / "models" / job_id / MODEL_FILE
    out_csv = tmp_path / "predictions.csv"
    run = _predict("--model", str(model), "--data_path", str(eval_dir),
                   "--out", str(out_csv))
    assert run.returncode == 0, run.stderr
    scored = json.loads(run.stdout)
    assert scored["accuracy"] == pytest.approx(server_eval["eval_accuracy"], abs=1e-9)
    assert scored["loss"] == pytest.approx(server_eval["eval_loss"], rel=1e-5)
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("index,label,predicted") and len(rows) > 10
    # a file that is not safetensors (e.g. a pickle) is refused, nothing executed
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04\x95not a model")
    refused = _predict("--model", str(bad), "--data_path", str(eval_dir),
                       "--model_type", "breast_cancer")
    assert refused.returncode == 2 and "not a safetensors model" in refused.stderr


def test_sigint_during_local_training_exits_fast_and_charges_once(
        federation: Federation, breast_cancer_data: Path) -> None:
    fed = federation
    # a long round: 200 epochs of ~12 DP steps; a fixed noise multiplier, so the client
    # does not spend minutes planning a job budget for thousands of steps first
    fed.start_server(["--min_clients", "1", "--round_deadline_s", "600",
                      "--wait_for_clients_s", "120", "--rounds", "1", "--local_epochs", "200",
                      "--batch_size", "16", "--noise_multiplier", "20"])
    fed.start_client("hospital_1", breast_cancer_data / "hospital_1",
                     ["--epsilon_budget", "50"])
    log = fed.log_dir / "hospital_1.log"
    # the first progress line is written at the first DP step
    wait_for(lambda: re.search(r"train \d+/200 epochs", log.read_text(errors="replace")),
             300, "the client's first training step", interval=0.2)
    proc = fed.clients["hospital_1"]
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    took = time.monotonic() - sent
    assert code == 0, fed.tail("hospital_1.log")
    assert took < 2.0, f"exit took {took:.2f}s\n" + fed.tail("hospital_1.log")
    text = log.read_text(errors="replace")
    assert "round_abandoned" in text
    (job_id, _), = read_jobs(fed.workdir / "server_state")
    ledger = json.loads((fed.workdir / "sites" / "hospital_1" / "state"
                         / "privacy_ledger_hospital_1.json").read_text())
    entries = ledger["entries"]
    assert len(entries) == 1, entries  # charged once
    entry, = entries
    assert (entry["job_id"], entry["round"], entry["abandoned"]) == (job_id, 1, True)
    assert entry["steps"] > 0 and entry["epsilon_round"] > 0
    # the server was told why (the operator's Status shows the hospital's last report)
    status = fed.status()
    reasons = {c.client_id: c.last_report_reason for c in status.clients}
    assert reasons.get("hospital_1") == "stopped by the operator", status


def test_a_late_fetch_gets_the_final_model_while_the_next_job_runs(
        federation: Federation, tmp_path: Path) -> None:
    """A queued job starts as soon as the one before completes, and its engine serves
    its own model from then on. A hospital that fetches the completed job's final model
    only after that (it was busy, or its STOP came late) still gets that job's model:
    it was refused FAILED_PRECONDITION ("needs the model of job ... round ...") and the
    hospital was left without it."""
    fed = federation
    port = fed.start_server(["--no_job", "--round_deadline_s", "60",
                             "--wait_for_clients_s", "60"])
    client = HostileClient(port, site_identity(fed.workdir, "hospital_1"), "hospital_1")
    try:
        client.open_tasks()
        for name in ("job-a", "job-b"):  # the second waits in the queue
            path = tmp_path / f"{name}.toml"
            path.write_text(f'job_id = "{name}"\nmodel_type = "breast_cancer"\nrounds = 1\n'
                            "min_clients = 1\nfed_eval = false\n")
            run = subprocess.run(
                [sys.executable, "-m", "fl_server.admin", "submit", str(path),
                 "--server_url", f"127.0.0.1:{port}", "--keys_dir", str(fed.workdir / "keys")],
                cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
            assert run.returncode == 0, run.stderr
        task = client.next_task(cpb.TRAIN, timeout=60)
        assert task.job_id == "job-a"
        client.submit(client.sealed(task, client.zero_delta(task)).messages())
        stop = client.next_task(cpb.STOP, timeout=60)
        assert stop.job_id == "job-a" and stop.HasField("model_manifest")
        assert client.next_task(cpb.TRAIN, timeout=60).job_id == "job-b"  # b's engine runs
        final = client.fetch_model(stop, stop.model_manifest)
        expected = checkpoint_state(fed.workdir / "server_state", "job-a", stop.round)
        assert list(final) == list(expected)
        assert all(torch.equal(final[k], expected[k]) for k in expected)
    finally:
        client.close()
