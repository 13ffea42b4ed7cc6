"""One pool worker: trains virtual hospitals one after another, as their client would.

A worker is a Ray actor (see `fl_sim.cluster`) holding the task and nothing per
hospital: each call loads that hospital's training split from its folder, opens its
privacy ledger in the simulation's state folder, and runs the client daemon's own
round (its task policy `fl_client.task_policy.training_config` with the daemon's
default flags, `fl_client.local_training.train_round`, the metrics of
`fl_client.client.update_metrics`), so memory stays one model and one hospital's
data whatever the number of hospitals. What a client would tell the server by a
Report (budget refused, privacy required, a training crash) comes back as a status
with the same reason.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl_proto import coordinator_pb2 as cpb

# What became of one hospital's task (the round records it under the hospital's name).
OK = "ok"
REFUSED = "refused"  # budget exceeded or DP required, as the client reports REFUSED
FAILED = "failed"  # training raised, as the client reports FAILED
DROPPED = "dropped"  # an injected dropout after training: the update never arrived


@dataclass
class HospitalResult:
    """One hospital's answer to one training task."""

    hospital: str
    status: str
    reason: str = ""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon_total: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class WorkerSpec:
    """How every worker of the pool is built (the same for all)."""

    model_type: str
    task_options: dict[str, Any]
    data_dir: Path
    state_dir: Path
    parts: int
    epsilon_budget: float
    delta: float
    allow_no_dp: bool
    device: str
    torch_threads: int


def part_folder(data_dir: Path, hospital_index: int, parts: int) -> Path:
    """The data folder of hospital number `hospital_index` (1-based): its own part, or
    with fewer parts than hospitals part ((index - 1) mod parts) + 1."""
    from fl_models.partition import hospital_dir

    return hospital_dir(data_dir, (hospital_index - 1) % parts + 1)


def hospital_index(name: str) -> int:
    """hospital_12 -> 12."""
    return int(name.rsplit("_", 1)[1])


class HospitalWorker:
    """Trains whichever hospital it is handed; holds no state between calls."""

    def __init__(self, spec: WorkerSpec) -> None:
        # The trainer's imports (Opacus) happen here, while the pool starts, so the
        # first round's timings are training, not importing.
        import fl_client.client  # noqa: F401
        import fl_client.local_training  # noqa: F401
        from fl_models.registry import get_task
        from fl_models.training import device_name, training_device

        torch.set_num_threads(max(1, spec.torch_threads))
        self.spec = spec
        self.task = get_task(spec.model_type, **spec.task_options)
        # a GPU the worker was promised but cannot see fails the pool's start, clearly,
        # instead of every hospital's round
        try:
            self.device = training_device(spec.device)
        except ValueError:
            raise ValueError(f"--gpus_per_hospital gave this worker a GPU, but torch sees no"
                             f" CUDA device on {socket.gethostname()}") from None
        self.device_name = device_name(self.device)

    def ready(self) -> str:
        """Returns once the worker has started (its imports done): the device it trains
        on, as logs name it (`fl_models.training.device_name`)."""
        return self.device_name

    def train(self, hospital: str, job_id: str, round_no: int,
              global_state: Mapping[str, torch.Tensor], config_bytes: bytes,
              drop_after_training: bool, secure: bool = False) -> HospitalResult:
        """Train `hospital` for one round, exactly as its client daemon would (with
        `secure`, its ledger entry says the update leaves securely aggregated; the
        masking itself happens where the round's keys are, see `fl_sim.secure`)."""
        from fl_client.client import update_metrics
        from fl_client.local_training import PrivacyRequired, train_round
        from fl_client.privacy_ledger import BudgetExceeded, PrivacyLedger
        from fl_client.task_policy import (
            LocalPolicy,
            TaskRefused,
            check_global_model,
            training_config,
        )

        started = time.perf_counter()
        spec = self.spec
        ledger = PrivacyLedger(spec.state_dir, hospital, spec.epsilon_budget, spec.delta)
        # A hospital started with the client daemon's default flags: the server's
        # config, checked, at the ledger's delta (fl_client.task_policy).
        policy = LocalPolicy(delta=ledger.delta, allow_no_dp=spec.allow_no_dp)
        try:
            config = training_config(cpb.TrainConfig.FromString(config_bytes), policy,
                                     self.task.hyperparams.max_grad_norm)
            check_global_model(global_state)
            folder = part_folder(spec.data_dir, hospital_index(hospital), spec.parts)
            dataset = self.task.load_split(folder, "train")
            result = train_round(self.task, global_state, dataset, config, self.device, ledger,
                                 spec.allow_no_dp, job_id=job_id, round=round_no)
        except (BudgetExceeded, PrivacyRequired, TaskRefused) as exc:
            return HospitalResult(hospital, REFUSED, str(exc), epsilon_total=ledger.spent(),
                                  seconds=time.perf_counter() - started)
        except Exception as exc:  # a client reports a crash as FAILED and keeps serving
            return HospitalResult(hospital, FAILED, f"{type(exc).__name__}: {exc}",
                                  epsilon_total=ledger.spent(),
                                  seconds=time.perf_counter() - started)
        epsilon_total = ledger.spent()
        metrics = update_metrics(result, epsilon_total)
        if secure:
            ledger.mark_secure(job_id, round_no)
        if drop_after_training:
            return HospitalResult(hospital, DROPPED, "injected dropout: trained (privacy"
                                  " spent), but the update never reached the server",
                                  num_examples=result.num_examples, metrics=metrics,
                                  epsilon_total=epsilon_total,
                                  seconds=time.perf_counter() - started)
        return HospitalResult(hospital, OK, state=result.state, num_examples=result.num_examples,
                              metrics=metrics, epsilon_total=epsilon_total,
                              seconds=time.perf_counter() - started)
