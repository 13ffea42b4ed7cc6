"""The studies a hospital's daemon serves, and its consent policy for each (issue 15).

One daemon, several studies: the site's TOML config lists, per model type, where the
data is and what the hospital agrees to for a job of that type:

    [studies.breast_cancer]
    data_path = "/data/wdbc"
    accept_strategies = ["fedavg", "fedprox"]   # default: any
    max_epsilon_per_job = 3.0                   # default: only the total budget limits
    require_secure_aggregation = true           # default: false
    allowed_jobs = ["job-2026-ecg", "9f2c...e1"] # job ids or job-file SHA-256s; default: any

(`--model_type` and `--data_path` with the `--accept_strategy`, `--max_epsilon_per_job`,
`--require_secure_aggregation` and `--allowed_job` flags make the one-study case.)

`check_job` judges a task against its study's policy before the task's model is
fetched or any of the study's data is used, and before anything is charged to the
ledger; a refusal names the rule, goes back to the server as the task's REFUSED
reason (shown in Status), and costs nothing. The total epsilon budget stays the
ledger's (one ledger per hospital, all studies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_client.task_policy import TaskRefused
from fl_proto import coordinator_pb2 as cpb

POLICY_KEYS = ("data_path", "accept_strategies", "max_epsilon_per_job",
               "require_secure_aggregation", "allowed_jobs")


class StudyConfigError(ValueError):
    """A `[studies.X]` table is malformed; the message names the key."""


@dataclass(frozen=True)
class JobPolicy:
    """What this hospital agrees to for a job of one study."""

    accept_strategies: tuple[str, ...] = ()
    max_epsilon_per_job: float = 0.0  # 0: no per-job limit (the total budget still holds)
    require_secure_aggregation: bool = False
    allowed_jobs: tuple[str, ...] = ()  # job ids or job-file SHA-256s; empty: any job


@dataclass
class Study:
    """One model type this daemon trains: its data and policy (data loaded at start, so a
    wrong path is a start-up error, not a failure in the middle of a job)."""

    model_type: str
    data_path: Path
    policy: JobPolicy
    task: Any = None
    train_set: Any = None
    test_set: Any = None
    reference: dict[str, Any] = field(default_factory=dict)


def parse_studies(table: Any, where: str) -> dict[str, tuple[Path, JobPolicy]]:
    """`[studies.<model_type>]` tables into (data path, policy) per model type."""
    if not isinstance(table, Mapping) or not table:
        raise StudyConfigError(f"{where}: studies must be tables [studies.<model_type>]")
    out: dict[str, tuple[Path, JobPolicy]] = {}
    for model_type, body in table.items():
        at = f"{where}: [studies.{model_type}]"
        if not isinstance(body, Mapping):
            raise StudyConfigError(f"{at} must be a table")
        unknown = sorted(set(body) - set(POLICY_KEYS))
        if unknown:
            raise StudyConfigError(f"{at} has unknown keys: {', '.join(unknown)} (known:"
                                   f" {', '.join(POLICY_KEYS)})")
        if not isinstance(body.get("data_path"), str):
            raise StudyConfigError(f"{at} needs data_path = \"folder\"")
        out[str(model_type)] = (Path(body["data_path"]), policy_from(body, at))
    return out


def policy_from(body: Mapping[str, Any], at: str) -> JobPolicy:
    def strings(key: str) -> tuple[str, ...]:
        value = body.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise StudyConfigError(f"{at}: {key} must be a list of names")
        return tuple(value)

    cap = body.get("max_epsilon_per_job", 0.0)
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not math.isfinite(cap) \
            or cap < 0:
        raise StudyConfigError(f"{at}: max_epsilon_per_job must be a number >= 0")
    secure = body.get("require_secure_aggregation", False)
    if not isinstance(secure, bool):
        raise StudyConfigError(f"{at}: require_secure_aggregation must be true or false")
    return JobPolicy(strings("accept_strategies"), float(cap), secure, strings("allowed_jobs"))


def job_epsilon(config: cpb.TrainConfig, num_examples: int,
                epsilon_of: Any) -> float | None:
    """The epsilon the whole job will cost this hospital with the configuration it will
    train with (its own overrides applied), or None when the task does not say enough
    (no round count). A planned job states it (epsilon_per_job); a per-round target
    composes to at most rounds x target; a fixed noise is composed by the ledger's
    accountant over the job's rounds."""
    p = config.privacy
    if not p.enabled:
        return 0.0
    rounds = config.job_rounds or p.total_rounds
    if p.epsilon_per_job > 0:
        return float(p.epsilon_per_job)
    if not rounds:
        return None
    if p.target_epsilon > 0:
        return float(p.target_epsilon) * rounds
    if p.noise_multiplier > 0 and num_examples > 0:
        q = min(1.0, max(1, config.batch_size) / num_examples)
        steps = max(1, round(max(1, config.local_epochs) / q))
        return float(epsilon_of([(p.noise_multiplier, q, steps * rounds)]))
    return None


def check_job(task: cpb.Task, config: cpb.TrainConfig, policy: JobPolicy,
              spent_on_job: float, num_examples: int, epsilon_of: Any) -> None:
    """Raise TaskRefused when this hospital's policy does not allow the task's job."""
    job = f"job {task.job_id}"
    if policy.allowed_jobs and task.job_id not in policy.allowed_jobs \
            and config.job_sha256 not in policy.allowed_jobs:
        raise TaskRefused(f"task refused: {job} (job file sha256"
                          f" {config.job_sha256[:16] or 'not given'}) is not in this hospital's"
                          " allowed_jobs")
    if policy.accept_strategies and config.strategy not in policy.accept_strategies:
        raise TaskRefused(f"task refused: {job} aggregates with"
                          f" {config.strategy or 'an undeclared strategy'!s}; this hospital"
                          f" accepts {', '.join(policy.accept_strategies)}")
    secure = config.secure_aggregation or task.HasField("secagg")
    if policy.require_secure_aggregation and not secure:
        raise TaskRefused(f"task refused: {job} is not securely aggregated and this hospital"
                          " requires secure aggregation")
    cap = policy.max_epsilon_per_job
    if cap > 0 and task.kind == cpb.TRAIN:
        planned = job_epsilon(config, num_examples, epsilon_of)
        if planned is None:
            raise TaskRefused(f"task refused: {job} does not say what it will cost (no round"
                              f" count); this hospital spends at most {cap:g} per job")
        if planned > cap * (1 + 1e-6):
            raise TaskRefused(f"task refused: {job} would cost epsilon {planned:.3g}, over this"
                              f" hospital's limit of {cap:g} per job")
        if spent_on_job >= cap:
            raise TaskRefused(f"task refused: this hospital has spent epsilon"
                              f" {spent_on_job:.3g} on {job}, its limit per job is {cap:g}")


def flag_policy(accept: Sequence[str] | None, cap: float, secure: bool,
                allowed: Sequence[str] | None) -> JobPolicy:
    """The one-study policy from the daemon's flags."""
    return JobPolicy(tuple(accept or ()), float(cap), bool(secure), tuple(allowed or ()))
