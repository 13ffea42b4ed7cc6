"""The simulation is worth trusting only if it computes what the real federation
computes: with DP off and the same data and seeds, three simulated hospitals end with
the same global model, to float tolerance, as three client daemons and a server over
mutual TLS started by the demo's launcher. (Updates are folded in arrival order on
both sides, so the sums may differ in the last bits, not more.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_demo.baseline import initial_state
from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task
from fl_server.store import Store
from tests.sim.conftest import RAY_SMALL, load_report, run_sim

pytestmark = pytest.mark.slow

HOSPITALS = ["hospital_1", "hospital_2", "hospital_3"]
SEED = 11
ROUNDS = 2
# The same round rules and training for both: DP off, one local epoch, every update.
COMMON = ["--rounds", str(ROUNDS), "--seed", str(SEED), "--no_dp", "--local_epochs", "1",
          "--min_clients", "3", "--quorum", "1.0"]


def _federation_model(work: Path, data: Path) -> dict[str, torch.Tensor]:
    make_pki(work, HOSPITALS)
    with Federation(work, HOSPITALS, "breast_cancer") as fed:
        fed.start_server([*COMMON, "--exit_when_done", "--no_fed_eval",
                          "--round_deadline_s", "120", "--wait_for_clients_s", "120"])
        for name in HOSPITALS:
            fed.start_client(name, data / name, ["--allow_no_dp"])
        assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log")
    store = Store(work / "server_state")
    try:
        job = store.latest_job()
        assert job is not None
        assert store.last_completed_round(job.job_id) == ROUNDS
        state, _ = store.load_checkpoint(job.job_id, ROUNDS)
    finally:
        store.close()
    return state


@pytest.mark.timeout(800)  # the federation (bounded at 300 s) then the CLI (400 s)
def test_simulation_equals_the_grpc_federation(tmp_path: Path) -> None:
    task = get_task("breast_cancer")
    data = tmp_path / "data"
    task.prepare(data, len(HOSPITALS), 0.5, SEED)
    real = _federation_model(tmp_path / "fed", data)

    out = tmp_path / "sim"
    result = run_sim([*COMMON, "--hospitals", "3", "--data_dir", str(data), "--out", str(out),
                      *RAY_SMALL], timeout_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    simulated = load_file(str(out / "global_model.safetensors"))

    assert sorted(simulated) == sorted(real)
    start = initial_state(task, SEED)
    moved = max(float((real[k] - start[k]).abs().max()) for k in real
                if real[k].is_floating_point())
    assert moved > 1e-3  # the federation did train: equality below is not trivial
    for name, tensor in real.items():
        assert simulated[name].dtype == tensor.dtype
        assert torch.allclose(simulated[name], tensor, rtol=1e-5, atol=1e-6), name
    report = load_report(out)
    assert report["status"] == "ok" and report["settings"]["dp"] is False
    assert [r["reported"] for r in report["rounds"]] == [3] * ROUNDS
