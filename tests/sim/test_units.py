"""The simulation's own pieces, without Ray: CLI validation, dropouts, addresses, the
pool's size, and one pool worker training real hospitals in this process."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_client.privacy_ledger import PrivacyLedger
from fl_demo.baseline import initial_state
from fl_models.registry import get_task
from fl_server.server import train_config
from fl_sim.cli import parse_args, prepare_out_dir
from fl_sim.cluster import RayUnavailable, SimError, pool_size, split_address
from fl_sim.engine import AFTER, BEFORE, injected_dropouts
from fl_sim.worker import DROPPED, OK, REFUSED, HospitalWorker, WorkerSpec, part_folder


def test_dropouts_are_seeded_and_at_the_rate() -> None:
    names = [f"hospital_{i}" for i in range(1, 2001)]
    a = injected_dropouts(names, 0.2, 3, "job", 1, 1)
    assert a == injected_dropouts(names, 0.2, 3, "job", 1, 1)
    assert a != injected_dropouts(names, 0.2, 3, "job", 1, 2)  # a retry draws afresh
    assert 300 < len(a) < 500
    assert {BEFORE, AFTER} == set(a.values())
    assert injected_dropouts(names, 0.0, 3, "job", 1, 1) == {}


def test_addresses() -> None:
    assert split_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert split_address("ray://head:10001") == ("head", 10001)
    assert split_address("auto") is None
    for bad in ("head", "head:x", "head:0", ":6379"):
        with pytest.raises(RayUnavailable):
            split_address(bad)


def test_pool_size(tmp_path: Path) -> None:
    s = parse_args(["--hospitals", "100", "--out", str(tmp_path)])
    assert pool_size(s, {"CPU": 2.0}, 100) == 2
    assert pool_size(s, {"CPU": 16.0}, 5) == 5  # never more actors than tasks
    half = parse_args(["--hospitals", "100", "--cpus_per_hospital", "0.5"])
    assert pool_size(half, {"CPU": 2.0}, 100) == 4
    gpu = parse_args(["--hospitals", "100", "--gpus_per_hospital", "0.25"])
    assert pool_size(gpu, {"CPU": 16.0, "GPU": 1.0}, 100) == 4
    with pytest.raises(SimError, match="GPU"):
        pool_size(gpu, {"CPU": 16.0}, 100)
    big = parse_args(["--cpus_per_hospital", "4"])
    with pytest.raises(SimError, match="CPU"):
        pool_size(big, {"CPU": 2.0}, 10)


@pytest.mark.parametrize("argv, message", [
    (["--hospitals", "0"], "--hospitals"),
    (["--dropout_rate", "1"], "--dropout_rate"),
    (["--partitions", "20", "--hospitals", "10"], "--partitions"),
    (["--fraction", "0"], "fraction"),
    (["--min_clients", "11", "--hospitals", "10"], "--min_clients"),
    (["--secure_aggregation", "--min_clients", "1"], "min_clients >= 2"),
    (["--strategy_param", "mu"], "NAME=NUMBER"),
])
def test_bad_arguments_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_out_dir_is_never_someone_elses(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not made by fl_sim"):
        prepare_out_dir(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_shared_parts_round_robin(tmp_path: Path) -> None:
    assert part_folder(tmp_path, 1, 3).name == "hospital_1"
    assert part_folder(tmp_path, 4, 3).name == "hospital_1"
    assert part_folder(tmp_path, 6, 3).name == "hospital_3"


def test_worker_trains_records_and_drops_like_a_client(tmp_path: Path) -> None:
    """The pool worker, called in-process: an update comes back with the client's
    metrics; a dropout after training still spends privacy; a round over the budget is
    a refusal with the ledger's reason and no spend."""
    task = get_task("breast_cancer")
    task.prepare(tmp_path / "data", 2, None, 0)
    from fl_server.config import ServerConfig

    config = train_config(ServerConfig(local_epochs=1), task, {}).SerializeToString()
    spec = WorkerSpec("breast_cancer", {}, tmp_path / "data", tmp_path / "state", 2,
                      epsilon_budget=1e6, delta=task.hyperparams.delta, allow_no_dp=False,
                      device="cpu", torch_threads=1)
    worker = HospitalWorker(spec)
    assert worker.ready() == "cpu"  # what the pool reports as the workers' device
    state = initial_state(task, 0)
    ok = worker.train("hospital_1", "job", 1, state, config, False)
    assert ok.status == OK and ok.num_examples > 0, ok.reason
    assert set(ok.state) == set(state)
    assert any(not torch.equal(ok.state[k], torch.zeros_like(state[k])) for k in state)
    assert {"train_loss", "epsilon_round", "epsilon_total", "dp_enabled"} <= set(ok.metrics)
    lost = worker.train("hospital_2", "job", 1, state, config, True)
    assert lost.status == DROPPED and not lost.state and lost.epsilon_total > 0
    ledger = PrivacyLedger(tmp_path / "state", "hospital_2", 1e6, spec.delta)
    assert [e.round for e in ledger.entries()] == [1]

    assert worker.train("hospital_1", "job", 2, state, config, False).status == OK
    spent = PrivacyLedger(tmp_path / "state", "hospital_1", 1e6, spec.delta).spent()
    tight = HospitalWorker(replace(spec, epsilon_budget=spent * 1.0001))
    refused = tight.train("hospital_1", "job", 3, state, config, False)
    assert refused.status == REFUSED and "privacy budget exceeded" in refused.reason
    ledger = PrivacyLedger(tmp_path / "state", "hospital_1", spent * 1.0001, spec.delta)
    assert [e.round for e in ledger.entries()] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU")
def test_a_worker_promised_a_gpu_it_cannot_see_refuses_to_start(tmp_path: Path) -> None:
    """A Ray cluster that advertises a GPU its worker cannot use (a wrong driver, a
    hidden device) stops the pool's start with the reason, not every round."""
    spec = WorkerSpec("breast_cancer", {}, tmp_path / "data", tmp_path / "state", 2,
                      epsilon_budget=1.0, delta=1e-5, allow_no_dp=False, device="cuda",
                      torch_threads=1)
    with pytest.raises(ValueError, match="--gpus_per_hospital gave this worker a GPU, but"
                                         " torch sees no CUDA device on"):
        HospitalWorker(spec)
