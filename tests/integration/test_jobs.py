"""Issue 15 items 1-2 with real daemons over mTLS on loopback.

One server started once with --no_job and two hospital daemons started once, each
serving two studies (breast_cancer and symptom) from a TOML config with its own job
policy. Through the admin CLI: two jobs of different model types run one after the
other; list/status/download; a hospital's policy refuses jobs (strategy, epsilon per
job, secure aggregation required, allow-list) with the reason in the server's record
and nothing charged; abort stops a running job's local training and drops a queued
one; a server SIGKILLed mid-job with a job queued resumes both, in order, on restart.
The tests run in order and share the federation (module scope)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fl_client.model_store import CARD_FILE, MODEL_FILE, load_model, model_sha256
from fl_demo.launcher import Federation, make_pki, site_keys
from fl_models.registry import get_task
from fl_server.jobs import read_model_file
from tests.hostile.kit import checkpoint_state, read_rounds, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOSPITALS = ("hospital_1", "hospital_2")
SERVER = ["--no_job", "--round_deadline_s", "90", "--wait_for_clients_s", "90"]
QUICK = {"min_clients": 2, "fed_eval": False, "local_epochs": 1}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("jobs")
    make_pki(root, HOSPITALS)
    data = root / "data"
    for model_type in ("breast_cancer", "symptom"):
        get_task(model_type).prepare(data / model_type, clients=2, alpha=None, seed=3)
    federation = Federation(root, list(HOSPITALS), "breast_cancer")
    federation.start_server(SERVER)
    policies = {
        "hospital_1": {"breast_cancer": {}, "symptom": {}},
        "hospital_2": {
            "breast_cancer": {"accept_strategies": ["fedavg", "fedprox"],
                              "max_epsilon_per_job": 4.0},
            "symptom": {"require_secure_aggregation": True,
                        "allowed_jobs": ["job-symptom", "job-symptom-plain", "job-f"]},
        },
    }
    for name in HOSPITALS:
        lines = []
        for model_type, policy in policies[name].items():
            lines.append(f"[studies.{model_type}]")
            lines.append(f'data_path = "{data / model_type / name}"')
            lines += [f"{k} = {json.dumps(v)}" for k, v in policy.items()]
        site = root / f"{name}.toml"
        site.write_text("\n".join(lines) + "\n")
        federation.clients[name] = federation._spawn([
            "-m", "fl_client.client", "--client_id", name,
            "--server_url", f"127.0.0.1:{federation.port}",
            "--keys_dir", str(site_keys(root, name)),
            "--state_dir", str(root / "sites" / name / "state"),
            "--config", str(site), "--keep_running", "--epsilon_budget", "200"],
            f"{name}.log")
    try:
        yield federation
    finally:
        federation.stop_all()


def admin(fed: Federation, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [sys.executable, "-m", "fl_server.admin", *args, "--server_url",
         f"127.0.0.1:{fed.port}", "--keys_dir", str(fed.workdir / "keys")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert run.returncode == 0, run.stderr + "\n" + fed.tail("server.log")
    return run


def submit(fed: Federation, name: str, **settings: Any) -> str:
    path = fed.workdir / f"{name}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    out = json.loads(admin(fed, "submit", str(path), "--json").stdout)
    return str(out["job_id"])


def jobs(fed: Federation) -> dict[str, dict[str, Any]]:
    listed = json.loads(admin(fed, "list", "--json").stdout).get("jobs", [])
    return {j["job_id"]: j for j in listed}


def wait_state(fed: Federation, job_id: str, states: tuple[str, ...],
               timeout: float = 300.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = jobs(fed).get(job_id)
        return job if job and job["state"] in states else None

    try:
        found: dict[str, Any] = wait_for(reached, timeout, f"{job_id} {states}", interval=0.5)
    except AssertionError:
        print(fed.tail("server.log", 80), fed.tail("hospital_2.log", 40))
        raise
    return found


def ledger(fed: Federation, name: str) -> list[dict[str, Any]]:
    path = fed.workdir / "sites" / name / "state" / f"privacy_ledger_{name}.json"
    return list(json.loads(path.read_text())["entries"]) if path.exists() else []


def reports(fed: Federation, job_id: str, client: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{fed.workdir / 'server_state' / 'server.db'}?mode=ro",
                         uri=True, timeout=10)
    try:
        return [(r[0], r[1]) for r in db.execute(
            "SELECT status, reason FROM reports WHERE job_id=? AND client_id=?",
            (job_id, client))]
    finally:
        db.close()


def test_two_jobs_of_two_studies_run_in_turn_and_reach_every_hospital(fed: Federation) -> None:
    first = submit(fed, "bc", model_type="breast_cancer", rounds=2, job_id="job-bc", **QUICK)
    second = submit(fed, "sy", model_type="symptom", rounds=1, job_id="job-symptom",
                    secure_aggregation=True, **QUICK)
    listed = jobs(fed)
    assert listed[second]["state"] == "queued" or listed[first]["state"] == "completed"
    wait_state(fed, first, ("completed",))
    done = wait_state(fed, second, ("completed",))
    state_dir = fed.workdir / "server_state"
    started_second = min(r.recorded for r in _recorded(state_dir, second))
    assert max(r.recorded for r in _recorded(state_dir, first)) < started_second
    assert [r.round for r in read_rounds(state_dir, first)] == [1, 2]
    assert [r.round for r in read_rounds(state_dir, second)] == [1]
    # every participating hospital holds each job's final model, with the server's hash
    for job_id, last in ((first, 2), (second, 1)):
        expected = model_sha256(checkpoint_state(state_dir, job_id, last))
        for name in HOSPITALS:
            model = fed.workdir / "sites" / name / "state" / "models" / job_id / MODEL_FILE
            wait_for(model.exists, 60, f"{name}'s final model of {job_id}")
            state, meta = load_model(model)
            assert model_sha256(state) == expected, fed.tail(f"{name}.log")
            card = json.loads((model.parent / CARD_FILE).read_text())
            assert (card["job_id"], card["model_type"], card["strategy"]) == \
                (job_id, meta["model_type"], "fedavg")
            assert "train_loss" in card["server_final_metrics"]
    assert done["model_sha256"] == read_rounds(state_dir, second)[-1].model_sha256
    # status of a job that is no longer the one served, and the final model's download
    status = json.loads(admin(fed, "status", first, "--json").stdout)
    assert (status["job_id"], status["job_state"], len(status["rounds"])) == \
        (first, "completed", 2)
    out = fed.workdir / "bc_final.safetensors"
    shown = admin(fed, "download", first, "--out", str(out)).stdout
    assert "round 2" in shown
    assert model_sha256(read_model_file(str(out))) == \
        model_sha256(checkpoint_state(state_dir, first, 2))
    # hospitals' ledgers hold each job's rounds (the secure one marked so)
    for name in HOSPITALS:
        entries = ledger(fed, name)
        assert sorted(e["round"] for e in entries if e["job_id"] == first) == [1, 2]
        assert [e["round"] for e in entries if e["job_id"] == second] == [1]
    # refused verbs: unknown job, a completed job's abort, a bad job file
    assert admin(fed, "status", "job-nope", check=False).returncode == 1
    refused = admin(fed, "abort", first, check=False)
    assert refused.returncode == 1 and "already ended" in refused.stderr
    bad = fed.workdir / "bad.toml"
    bad.write_text('model_type = "breast_cancer"\nroundz = 3\n')
    refused = admin(fed, "submit", str(bad), check=False)
    assert refused.returncode == 1 and "roundz" in refused.stderr
    assert admin(fed, "download", "job-nope", "--out", str(out), check=False).returncode == 1


def _recorded(state_dir: Path, job_id: str) -> list[Any]:
    db = sqlite3.connect(f"file:{state_dir / 'server.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT round, recorded FROM rounds WHERE job_id=?",
                          (job_id,)).fetchall()
    finally:
        db.close()

    class Row:
        def __init__(self, r: tuple[int, float]) -> None:
            self.round, self.recorded = r

    return [Row(r) for r in rows]


@pytest.mark.parametrize(("name", "settings", "why"), [
    ("job-fedadam", {"model_type": "breast_cancer", "strategy": "fedadam"},
     "aggregates with fedadam; this hospital accepts fedavg, fedprox"),
    ("job-eps6", {"model_type": "breast_cancer", "epsilon_per_hospital": 6.0},
     "would cost epsilon 6, over this hospital's limit of 4 per job"),
    ("job-symptom-plain", {"model_type": "symptom"},
     "not securely aggregated and this hospital requires secure aggregation"),
    ("job-symptom-other", {"model_type": "symptom"}, "is not in this hospital's allowed_jobs"),
])
def test_a_hospitals_policy_refuses_a_job_before_touching_data(
        fed: Federation, name: str, settings: dict[str, Any], why: str) -> None:
    before = ledger(fed, "hospital_2")
    # min_clients 2: the round waits until both hospitals are connected, so hospital_2
    # (momentarily reconnecting on a loaded machine) is surely asked; quorum 0.5 lets
    # hospital_1's update alone close the round
    job_id = submit(fed, name, job_id=name, rounds=1, min_clients=2, quorum=0.5,
                    fed_eval=False, local_epochs=1, **settings)
    wait_state(fed, job_id, ("completed",))
    refused = reports(fed, job_id, "hospital_2")
    assert refused and all(status == "REFUSED" for status, _ in refused), refused
    assert why in refused[0][1], refused
    # nothing charged, and the other hospital trained the job alone
    assert ledger(fed, "hospital_2") == before
    assert [e["round"] for e in ledger(fed, "hospital_1") if e["job_id"] == job_id] == [1]
    assert not (fed.workdir / "sites" / "hospital_2" / "state" / "models" / job_id).exists()


def test_abort_stops_a_running_job_between_batches_and_drops_a_queued_one(
        fed: Federation) -> None:
    long_job = submit(fed, "long", model_type="breast_cancer", rounds=1, job_id="job-long",
                      min_clients=2, fed_eval=False, local_epochs=1000, batch_size=8,
                      round_deadline_s=600.0)
    queued = submit(fed, "later", model_type="symptom", rounds=1, job_id="job-later",
                    min_clients=2, fed_eval=False)
    for name in HOSPITALS:  # both are stepping through the 1000 epochs
        wait_for(lambda n=name: "train " in _log_after(fed, n, "job=job-long"), 180,
                 f"{name} training job-long", interval=0.2)
    aborted = admin(fed, "abort", queued, "--reason", "not this week")
    assert "aborted" in aborted.stdout
    asked = time.monotonic()
    admin(fed, "abort", long_job, "--reason", "wrong cohort")
    wait_state(fed, long_job, ("aborted",), timeout=60)
    for name in HOSPITALS:
        entry = wait_for(lambda n=name: next((e for e in ledger(fed, n)
                                              if e["job_id"] == long_job), None),
                         30, f"{name}'s abandoned entry", interval=0.2)
        assert entry.get("abandoned") is True, entry
        assert entry["steps"] > 0
    assert time.monotonic() - asked < 30
    assert read_rounds(fed.workdir / "server_state", long_job) == []
    assert jobs(fed)[queued]["state"] == "aborted"
    assert read_rounds(fed.workdir / "server_state", queued) == []
    for name in HOSPITALS:
        log = (fed.log_dir / f"{name}.log").read_text()
        assert "aborted by its operator" in log and "wrong cohort" in log, fed.tail(f"{name}.log")


def _log_after(fed: Federation, name: str, marker: str) -> str:
    """A hospital's log from the first line holding `marker` on."""
    log = (fed.log_dir / f"{name}.log").read_text(errors="replace")
    at = log.find(marker)
    return log[at:] if at >= 0 else ""


def test_a_restart_resumes_the_running_job_then_runs_the_queued_one(fed: Federation) -> None:
    fed.kill_server(signal.SIGTERM)
    fed.start_server(SERVER, port=fed.port, env={"FL_FAULT_POINT": "aggregate@2"})
    running = submit(fed, "e", model_type="breast_cancer", rounds=3, job_id="job-e", **QUICK)
    queued = submit(fed, "f", model_type="symptom", rounds=1, job_id="job-f",
                    secure_aggregation=True, **QUICK)
    assert fed.wait_server(timeout_s=300) is not None, "the fault point never fired"
    state_dir = fed.workdir / "server_state"
    assert [r.round for r in read_rounds(state_dir, running)] == [1]
    fed.start_server(SERVER, port=fed.port)
    wait_state(fed, running, ("completed",))
    wait_state(fed, queued, ("completed",))
    assert [r.round for r in read_rounds(state_dir, running)] == [1, 2, 3]
    assert [r.round for r in read_rounds(state_dir, queued)] == [1]
    assert max(r.recorded for r in _recorded(state_dir, running)) < \
        min(r.recorded for r in _recorded(state_dir, queued))


def test_a_hospitals_certificate_cannot_use_the_job_verbs(fed: Federation) -> None:
    import grpc

    from fl_core.tls import channel_credentials, channel_options
    from fl_proto import coordinator_pb2 as cpb
    from fl_proto import coordinator_pb2_grpc as cpb_grpc

    keys = site_keys(fed.workdir, "hospital_1")
    creds = channel_credentials((keys / "ca.crt").read_bytes(),
                                (keys / "hospital_1.crt").read_bytes(),
                                (keys / "hospital_1.key").read_bytes())
    before = jobs(fed)
    with grpc.secure_channel(f"127.0.0.1:{fed.port}", creds,
                             options=channel_options()) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        for call in (lambda: stub.SubmitJob(cpb.SubmitJobRequest(
                        job_toml='model_type = "ecg"\n'), timeout=10),
                     lambda: stub.ListJobs(cpb.ListJobsRequest(), timeout=10),
                     lambda: stub.AbortJob(cpb.JobRequest(job_id="job-bc"), timeout=10),
                     lambda: list(stub.DownloadModel(cpb.JobRequest(job_id="job-bc"),
                                                     timeout=10))):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs an admin certificate" in (refused.value.details() or "")
    assert jobs(fed) == before
