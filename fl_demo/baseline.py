"""What each hospital would get alone: the same training, on its own data only.

The comparison is only fair if nothing but the federation differs, so each local
model:
- starts from the same initial weights as the federation's global model (the
  server seeds torch with its --seed before building the model; so do we);
- trains with the very `TrainConfig` the server sends its clients (built by the
  server's own `train_config`), so the same epochs per round, batch size, learning
  rate, clipping bound and noise multiplier;
- runs the same private trainer the client daemon runs (`train_round`, Opacus
  DP-SGD), once per federation round, continuing from its own previous weights;
- is scored by the task's `evaluate` on the same held-out test set the server
  scores the global model on.
- plans its privacy the same way: with a job budget, the same budget planner over
  the same rounds, on a ledger of its own (a temporary folder).
So each hospital spends about the same epsilon alone as it does in the federation;
the only thing it lacks is the other hospitals' updates.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fl_client.local_training import load_state_strict, train_round
from fl_client.privacy_ledger import PrivacyLedger
from fl_models.base import Task
from fl_proto import coordinator_pb2 as cpb
from fl_server.config import ServerConfig
from fl_server.server import train_config

CPU = torch.device("cpu")


@dataclass
class LocalResult:
    hospital: str
    train_examples: int
    metrics: dict[str, float]
    epsilon: float
    seconds: float


def federation_train_config(task: Task, local_epochs: int | None, noise_multiplier: float,
                            learning_rate: float | None = None,
                            epsilon_per_hospital: float | None = None,
                            rounds: int = 0) -> cpb.TrainConfig:
    """The TrainConfig the demo's server sends (same flags, same function), but asking
    for full weights back rather than a delta. ``epsilon_per_hospital``: None for the
    fixed noise multiplier, inf for no DP."""
    budget = epsilon_per_hospital is not None and math.isfinite(epsilon_per_hospital)
    cfg = ServerConfig(model_type=task.name, local_epochs=local_epochs or 0,
                       noise_multiplier=0.0 if budget else noise_multiplier,
                       learning_rate=learning_rate or 0.0, rounds=rounds or 1,
                       epsilon_per_hospital=(epsilon_per_hospital or 0.0) if budget else 0.0,
                       no_dp=epsilon_per_hospital is not None and not budget)
    config = train_config(cfg, task, {})
    config.update_kind = cpb.WEIGHTS
    return config


def initial_state(task: Task, seed: int) -> dict[str, torch.Tensor]:
    """The global model's round-0 weights, built exactly as the server builds them."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}


def train_local_only(task: Task, hospital: str, data_path: Path, test_set: TensorDataset,
                     config: cpb.TrainConfig, rounds: int, seed: int,
                     epsilon_budget: float = 1e6,
                     device: torch.device = CPU) -> LocalResult:
    """`rounds` private local rounds on one hospital's data, then the held-out metrics."""
    started = time.perf_counter()
    train_set = task.load_split(data_path, "train")
    state = initial_state(task, seed)
    private = config.privacy.enabled
    delta = config.privacy.delta or task.hyperparams.delta
    with tempfile.TemporaryDirectory(prefix="fl-local-only-") as folder:
        ledger = PrivacyLedger(Path(folder), hospital, epsilon_budget, delta)
        for round_no in range(1, rounds + 1):
            result = train_round(task, state, train_set, config, device, ledger,
                                 allow_no_dp=not private, job_id="local-only",
                                 round=round_no)
            state = result.state
        epsilon = ledger.spent() if private else math.inf
    model = task.build_model()
    load_state_strict(model, state)
    metrics = {k: float(v) for k, v in task.evaluate(model, test_set).items()}
    return LocalResult(hospital=hospital, train_examples=len(train_set), metrics=metrics,
                       epsilon=epsilon, seconds=time.perf_counter() - started)


def train_all_local(task: Task, data_dir: Path, hospitals: list[str], test_set: TensorDataset,
                    config: cpb.TrainConfig, rounds: int, seed: int,
                    on_done: Callable[[LocalResult], Any] | None = None,
                    epsilon_budget: float = 1e6,
                    device: torch.device = CPU) -> list[LocalResult]:
    """One local-only model per hospital, in order; `on_done` sees each as it finishes.

    Single-threaded, like the client daemons (the launcher gives them
    OMP_NUM_THREADS=1): on a small, busy machine torch's default of one thread per
    core oversubscribes it and a run gets many times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        for name in hospitals:
            result = train_local_only(task, name, data_dir / name, test_set, config, rounds,
                                      seed, epsilon_budget, device)
            results.append(result)
            if on_done is not None:
                on_done(result)
    finally:
        torch.set_num_threads(threads)
    return results
