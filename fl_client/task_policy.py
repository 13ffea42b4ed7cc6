"""The hospital's task policy: what it accepts from the server, in one place.

The server chooses the training configuration, but the hospital decides what it
will run on its patients' data. Everything a TRAIN task carries that bears on
privacy or on the sanity of what comes back is judged here, before any data is
touched and before anything is charged to the privacy ledger:

- the hospital's own privacy flags override the server's (noise, per-round epsilon,
  clipping norm);
- the delta is the hospital's own: its ledger accounts at that delta, so a task
  asking for a larger one (0.5 would make any epsilon meaningless) is run at the
  hospital's delta instead, and a delta that is not a probability is refused;
- the clipping norm, learning rate, noise multiplier, per-round epsilon, proximal
  term, epochs and batch size must be finite and in range;
- the global model it is sent must be finite (a NaN model trains to NaN and its
  epsilon would be charged for nothing).

A refusal raises `TaskRefused` with the reason; the daemon reports it to the server
as REFUSED and charges nothing.

Evaluation is under the hospital's control too (`EvaluationPolicy`): it evaluates
only models the job distributed as its global model, a bounded number of times per
job, on a test split large enough, and it rounds (and optionally noises) what it
reports. See docs/SECURITY.md for what this does and does not stop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fl_core.constants import (
    EVAL_MAX_PER_JOB,
    EVAL_MIN_TEST_EXAMPLES,
    MAX_LOCAL_BATCH_SIZE,
    MAX_LOCAL_EPOCHS,
    METRIC_DECIMALS,
)
from fl_core.tensor_codec import digest_name
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb


class TaskRefused(Exception):
    """The hospital will not run this task; the message says why (sent to the server)."""


@dataclass(frozen=True)
class LocalPolicy:
    """The hospital operator's own settings (0 = take the server's)."""

    delta: float
    target_epsilon: float = 0.0
    noise_multiplier: float = 0.0
    max_grad_norm: float = 0.0
    allow_no_dp: bool = False


def _finite_nonnegative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise TaskRefused(f"task refused: {name} {value!r} is not a finite number >= 0")


def training_config(task_config: cpb.TrainConfig, policy: LocalPolicy,
                    default_max_grad_norm: float) -> cpb.TrainConfig:
    """The configuration this hospital will train with: the server's, checked, with
    the hospital's own privacy settings applied (they win). Raises TaskRefused.

    `default_max_grad_norm` is the task's default clipping norm, used when neither
    side sets one (so the effective norm is always checked, not only a sent one).
    """
    config = cpb.TrainConfig()
    config.CopyFrom(task_config)
    p = config.privacy
    # the server's numbers first: a malformed value is a broken (or hostile) server
    for name, value in (("learning_rate", config.learning_rate),
                        ("proximal_mu", config.proximal_mu),
                        ("noise_multiplier", p.noise_multiplier),
                        ("target_epsilon", p.target_epsilon),
                        ("max_grad_norm", p.max_grad_norm),
                        ("delta", p.delta)):
        _finite_nonnegative(name, value)
    for name, value in config.strategy_settings.items():
        if not math.isfinite(value):
            raise TaskRefused(f"task refused: strategy setting {name} {value!r} is not finite")
    if p.delta >= 1:
        raise TaskRefused(f"task refused: delta {p.delta!r} is not a probability below 1")
    if config.local_epochs > MAX_LOCAL_EPOCHS:
        raise TaskRefused(f"task refused: {config.local_epochs} local epochs (at most"
                          f" {MAX_LOCAL_EPOCHS})")
    if config.batch_size > MAX_LOCAL_BATCH_SIZE:
        raise TaskRefused(f"task refused: batch size {config.batch_size} (at most"
                          f" {MAX_LOCAL_BATCH_SIZE})")
    if config.update_kind not in (cpb.UPDATE_KIND_UNSPECIFIED, cpb.WEIGHTS, cpb.DELTA):
        raise TaskRefused(f"task refused: unknown update kind {config.update_kind}")
    if not p.enabled and not policy.allow_no_dp:
        raise TaskRefused("task refused: the server asked for training without differential"
                          " privacy; start the client with --allow_no_dp to permit it")
    # then the hospital's own settings, which win
    if policy.target_epsilon:
        p.target_epsilon = policy.target_epsilon
    if policy.noise_multiplier:
        p.noise_multiplier = policy.noise_multiplier
        if not policy.target_epsilon:
            p.target_epsilon = 0.0
    if policy.max_grad_norm:
        p.max_grad_norm = policy.max_grad_norm
    # the ledger accounts at the hospital's delta; the round must be calibrated at it
    p.delta = policy.delta
    if p.enabled:
        clip = p.max_grad_norm or default_max_grad_norm
        if not math.isfinite(clip) or clip <= 0:
            raise TaskRefused(f"task refused: clipping norm {clip!r} is not a finite"
                              " number > 0 (DP needs a bound on each example's gradient)")
    return config


def check_global_model(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a global model holding NaN or Inf before any data touches it."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TaskRefused(f"task refused: the global model's tensor {name!r} holds NaN"
                              " or Inf")


def round_metrics(metrics: Mapping[str, float], decimals: int = METRIC_DECIMALS
                  ) -> dict[str, float]:
    """Task metrics rounded to `decimals` places before they leave the hospital (they
    are computed outside DP; exact values leak more than any reader needs). Privacy
    accounting numbers (epsilon_*, dp_enabled) are not data-dependent and stay exact."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith("epsilon") or key in ("dp_enabled", "module_fixed"):
            out[key] = float(value)
        else:
            out[key] = round(float(value), decimals)
    return out


@dataclass
class _JobEvaluations:
    trained: set[str] = field(default_factory=set)  # global models fetched for TRAIN
    unconfirmed: tuple[int, str] | None = None  # (round, model) evaluated after a TRAIN
    trained_since_eval: bool = False
    count: int = 0
    distrust: str = ""


def model_id(manifest: tpb.TensorManifest) -> str:
    """How the policy names a global model: its announced digest, with the algorithm
    (tensors.proto Digest), since one model has a different digest in each."""
    return f"{digest_name(manifest.digest)}:{bytes(manifest.sha256).hex()}"


def _algorithm(model: str) -> str:
    return model.rpartition(":")[0]


class EvaluationPolicy:
    """Which EVALUATE tasks the hospital answers.

    A model is evaluated only if it is the job's global model: one this hospital
    fetched for a TRAIN task of the job, or the one model evaluated after its latest
    TRAIN (round r's new aggregate, which round r+1's TRAIN task must then distribute;
    if it brings another model, the server evaluated something it never distributed
    and this hospital stops evaluating for that job). A hospital not selected for
    round r+1 cannot check, and lets it pass; nor can one whose server named the two
    models with different digest algorithms (`model_id`: a server of another version
    after a restart mid-job). At most `max_per_job` evaluations per
    job, and none on a test split smaller than `min_examples`.
    """

    def __init__(self, max_per_job: int = EVAL_MAX_PER_JOB,
                 min_examples: int = EVAL_MIN_TEST_EXAMPLES) -> None:
        self.max_per_job = max_per_job
        self.min_examples = min_examples
        self._jobs: dict[str, _JobEvaluations] = {}

    def _job(self, job_id: str) -> _JobEvaluations:
        return self._jobs.setdefault(job_id, _JobEvaluations())

    def trained(self, job_id: str, round_no: int, model: str) -> str | None:
        """Note a global model fetched for TRAIN; returns a warning when it shows the
        server evaluated a model it did not then distribute."""
        job = self._job(job_id)
        job.trained.add(model)
        job.trained_since_eval = True
        warning = None
        if job.unconfirmed is not None and job.unconfirmed[0] + 1 == round_no \
                and _algorithm(job.unconfirmed[1]) == _algorithm(model) \
                and job.unconfirmed[1] != model:
            job.distrust = (f"the server had this hospital evaluate model"
                            f" {job.unconfirmed[1][:24]} in round {job.unconfirmed[0]} and"
                            f" then distributed {model[:24]} for round {round_no}")
            warning = job.distrust
        job.unconfirmed = None
        return warning

    def admit(self, job_id: str, round_no: int, model: str, test_examples: int) -> None:
        """Raise TaskRefused unless this evaluation may run (and count it)."""
        job = self._job(job_id)
        if job.distrust:
            raise TaskRefused(f"evaluation refused: no more evaluations for job {job_id}:"
                              f" {job.distrust}")
        if test_examples < self.min_examples:
            raise TaskRefused(f"evaluation refused: the test split has {test_examples}"
                              f" examples, fewer than {self.min_examples}: metrics withheld")
        if job.count >= self.max_per_job:
            raise TaskRefused(f"evaluation refused: {job.count} evaluations already made for"
                              f" job {job_id} (at most {self.max_per_job})")
        if model not in job.trained:
            if not job.trained_since_eval:
                raise TaskRefused("evaluation refused: the model is not one this job has"
                                  " distributed as its global model")
            job.unconfirmed = (round_no, model)  # round r+1's TRAIN must bring it
            job.trained_since_eval = False
        job.count += 1


def noisy_accuracy(accuracy: float, examples: int, noise_multiplier: float,
                   generator: torch.Generator | None = None) -> float:
    """Accuracy with Gaussian noise of std noise_multiplier / examples: one patient
    changes an accuracy over `examples` records by at most 1/examples, so this is
    the Gaussian mechanism at that noise multiplier (one step at sample rate 1 for
    the ledger's RDP accountant). Clipped to [0, 1] afterwards (post-processing)."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64))
    return min(1.0, max(0.0, accuracy + noise * noise_multiplier / examples))
