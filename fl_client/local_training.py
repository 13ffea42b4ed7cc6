"""One round of local training at a hospital, differentially private by default.

Why it is shaped this way:
- DP is the default and the only path unless the operator passed an explicit flag:
  a server asking for ``privacy.enabled = false`` is refused with ``PrivacyRequired``.
- The budget is checked *before* any data is touched: the round's noise multiplier,
  sample rate and step count are all known once Opacus has wrapped the model, so the
  ledger can say whether the round fits, and a refused round costs nothing.
- Every round that took steps is recorded in the ledger, even one that fails half
  way: the spend happened whether or not an update ever leaves the hospital.
- The update has exactly the global model's names, dtypes and shapes (taken from
  the unwrapped module, so no Opacus ``_module.`` prefixes), because the server
  checks the stream's manifest against its global model.
- DP noise and Poisson sampling never use ``config.seed``: whoever knows the noise
  seed can regenerate the noise and subtract it, and whoever knows which records
  were sampled loses the amplification-by-sampling the accountant assumes. Both
  come from the OS CSPRNG unless a caller passes ``private_seed`` (tests and
  benchmarks only, never from the wire). ``config.seed`` seeds torch's global RNG
  (dropout, non-private shuffling) for reproducible experiments.
- FedProx under DP: Opacus computes per-sample gradients from layer activations, so
  a proximal term added to the loss would be silently dropped from the private
  gradient (the optimizer replaces ``p.grad`` with the clipped, noised per-sample
  sum). The term ``mu/2 * ||w - w_global||^2`` does not depend on any patient's
  record, so its gradient ``mu * (w - w_global)`` is added after clipping and
  noising: exact FedProx, free in privacy (post-processing), and not distorted by
  the clipping bound. Without DP it is simply added to the loss.
- A stop (``stop`` set by the daemon's SIGINT/SIGTERM handler) is checked between
  batches: the round is abandoned with ``TrainingStopped``, and under DP the steps
  already taken are recorded once, as an abandoned ledger entry: their noise was drawn
  and the data touched, so they were spent, even though no update leaves the hospital.
- ``secure_mode`` (Opacus's floating-point-attack-resistant noise) needs torchcsprng,
  which is not a dependency; its warning is silenced here and the choice recorded.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fl_client.budget_planner import plan_round
from fl_client.linear_dp import clipped_grad_sum, linear_head, noise_and_account, split_head
from fl_client.privacy_ledger import DEFAULT_ACCOUNTANT, PrivacyLedger, compose_epsilon
from fl_models.base import HyperParams, Task
from fl_models.training import release_device_memory
from fl_proto import coordinator_pb2

# The engine's own accountant only keeps the run's history (the ledger composes it) and
# calibrates a per-round target_epsilon; RDP does the latter in a fraction of PRV's time.
ACCOUNTANT = "rdp"
MAX_PHYSICAL_BATCH_SIZE = 128  # per-sample gradients cost memory x batch; bigger is split
# "hooks" materialises per-sample gradients (Opacus's default, the best tested);
# "ghost" computes only their norms for Linear layers and backpropagates twice: the
# same clipped, noised gradient, 2-6x cheaper for MLPs (see bench/dp_step.py).
# "linear": the clipped sum in closed form for a model whose only trainable layer is
# one final Linear layer (fl_client.linear_dp), Opacus's noise and accountant; "auto"
# (the default) picks it when the model qualifies, else "hooks".
GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "linear")

ProgressFn = Callable[[int, int, int, int, float], None]
"""on_progress(epoch, epochs, step, steps, loss): 1-based; loss is the epoch's running mean."""


class PrivacyRequired(Exception):
    """Asked to train without DP while the operator has not allowed it."""


class TrainingStopped(Exception):
    """The operator stopped the daemon (``stop`` was set) part way through a round.

    Checked between batches, so a stop takes effect within one batch's time. The round
    is abandoned: no update is produced; under DP the steps already taken were spent
    and are recorded once, as an abandoned ledger entry (``steps`` says how many).
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        super().__init__(f"stopped by the operator after {steps} steps")


class StopFlag(Protocol):
    """What the trainer needs of a ``threading.Event``."""

    def is_set(self) -> bool: ...


@dataclass
class TrainResult:
    """What a round produced; ``state`` is what goes back to the server.

    ``epsilon_round`` is the accountant's epsilon at ``delta`` for this round's steps
    alone. Without DP it is 0.0 with ``dp_enabled=False``: there is no finite
    epsilon, and readers must look at ``dp_enabled`` rather than the number.
    """

    state: dict[str, Tensor]
    num_examples: int
    metrics: dict[str, float]
    dp_enabled: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_round: float
    delta: float
    seconds: float
    update_kind: int = coordinator_pb2.WEIGHTS
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RoundSettings:
    """The task's defaults with the server's non-zero overrides applied."""

    hyperparams: HyperParams
    proximal_mu: float
    update_kind: int
    dp_enabled: bool
    noise_multiplier: float  # 0.0 when target_epsilon drives the noise
    target_epsilon: float  # per round; 0.0 when noise_multiplier is given
    delta: float
    max_grad_norm: float
    epsilon_per_job: float = 0.0  # > 0: the noise is planned for the job (budget_planner)
    total_rounds: int = 0


def resolve_settings(task: Task, config: coordinator_pb2.TrainConfig) -> RoundSettings:
    """Merge the task's defaults with the config (zero means "use the default").

    Noise: planned for the whole job when the config has an epsilon per job (then
    the trainer asks the budget planner once the sample rate is known); else the
    config's target epsilon, else its noise multiplier, else the task's noise
    multiplier, else the task's target epsilon.
    """
    hp = task.hyperparams
    hp = replace(
        hp,
        local_epochs=config.local_epochs or hp.local_epochs,
        batch_size=config.batch_size or hp.batch_size,
        learning_rate=config.learning_rate or hp.learning_rate,
    )
    # per-strategy settings travel in the map; the old field serves older servers
    mu = float(config.strategy_settings.get("proximal_mu", config.proximal_mu))
    if mu < 0 or not math.isfinite(mu):
        raise ValueError(f"proximal_mu must be finite and >= 0, got {mu}")
    kind = config.update_kind or coordinator_pb2.WEIGHTS
    if kind not in (coordinator_pb2.WEIGHTS, coordinator_pb2.DELTA):
        raise ValueError(f"unknown update kind {kind}")
    p = config.privacy
    noise, target = 0.0, 0.0
    per_job = float(p.epsilon_per_job)
    if not (math.isfinite(per_job) and per_job >= 0):
        raise ValueError(f"epsilon_per_job must be finite and >= 0, got {per_job}")
    if per_job > 0:
        if p.total_rounds < 1:
            raise ValueError("epsilon_per_job needs total_rounds (the job's rounds) >= 1")
        # A server planning the job sends no noise; one here is the hospital's own
        # (task_policy), a floor the plan may raise but never lower (_planned).
        noise = max(0.0, float(p.noise_multiplier))
    elif p.target_epsilon > 0:
        target = p.target_epsilon
    elif p.noise_multiplier > 0:
        noise = p.noise_multiplier
    elif hp.noise_multiplier > 0:
        noise = hp.noise_multiplier
    else:
        target = hp.target_epsilon
    delta = p.delta or hp.delta
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return RoundSettings(
        hyperparams=hp,
        proximal_mu=mu,
        update_kind=kind,
        dp_enabled=p.enabled,
        noise_multiplier=noise,
        target_epsilon=target,
        delta=delta,
        max_grad_norm=p.max_grad_norm or hp.max_grad_norm,
        epsilon_per_job=per_job,
        total_rounds=int(p.total_rounds),
    )


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load ``state`` only if names, shapes and dtypes all match the model's own.

    ``load_state_dict(strict=True)`` would silently cast dtypes, and its messages
    do not say which side is wrong; the server's model and ours must agree exactly.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}")
    for name, mine in own.items():
        theirs = state.get(name)
        if theirs is None:
            continue
        if tuple(theirs.shape) != tuple(mine.shape):
            problems.append(f"{name}: shape {tuple(theirs.shape)} != model {tuple(mine.shape)}")
        elif theirs.dtype != mine.dtype:
            problems.append(f"{name}: dtype {theirs.dtype} != model {mine.dtype}")
    if problems:
        raise ValueError(
            "global model does not match this task's network: " + "; ".join(problems[:8])
        )
    model.load_state_dict(dict(state), strict=True)


def train_round(
    task: Task,
    global_state: Mapping[str, Tensor],
    dataset: TensorDataset,
    config: coordinator_pb2.TrainConfig,
    device: torch.device,
    ledger: PrivacyLedger | None,
    allow_no_dp: bool,
    *,
    job_id: str = "",
    round: int = 0,
    on_progress: ProgressFn | None = None,
    max_physical_batch_size: int = MAX_PHYSICAL_BATCH_SIZE,
    private_seed: int | None = None,
    grad_sample_mode: str = "auto",
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train the global model on local data for one round; see the module docstring.

    ``stop``: checked between batches; once set, ``TrainingStopped`` is raised (the
    steps taken recorded once in the ledger, marked abandoned).

    Raises ``PrivacyRequired`` (DP off without ``allow_no_dp``), ``BudgetExceeded``
    (from the ledger, before training), ``ValueError`` (model/state mismatch, empty
    data, a model Opacus cannot train without changing its parameters).
    """
    started = time.perf_counter()
    settings = resolve_settings(task, config)
    if not settings.dp_enabled and not allow_no_dp:
        raise PrivacyRequired(
            "the server asked for training without differential privacy; refusing. An "
            "operator who accepts that must start the client with its explicit no-DP flag"
        )
    if len(dataset) == 0:
        raise ValueError("the local training set is empty")
    if max_physical_batch_size < 1:
        raise ValueError("max_physical_batch_size must be >= 1")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
    if config.seed:
        torch.manual_seed(config.seed)

    notes: list[str] = []
    model = task.build_model()
    load_state_strict(model, global_state)
    if settings.dp_enabled:
        model = _make_opacus_compatible(model, global_state, notes)
    model.to(device).train()
    if settings.dp_enabled and grad_sample_mode in ("auto", "linear"):
        grad_sample_mode = _linear_or_hooks(model, task, grad_sample_mode)
    global_params = {
        name: global_state[name].to(device).detach().clone()
        for name, _ in model.named_parameters()
    }

    try:
        if settings.dp_enabled:
            run = _train_private(
                model, global_params, dataset, settings, device, ledger, job_id, round,
                on_progress, max_physical_batch_size, private_seed, grad_sample_mode, stop,
            )
        else:
            if ledger is not None:
                # Recorded before training: once started, the data has been used without DP.
                per_epoch = math.ceil(len(dataset) / settings.hyperparams.batch_size)
                ledger.record(job_id, round, 0.0, 1.0 / per_epoch,
                              settings.hyperparams.local_epochs * per_epoch, dp_enabled=False)
            run = _train_plain(model, global_params, dataset, settings, device, on_progress,
                               stop)
    finally:
        model.to("cpu")
        global_params.clear()
        release_device_memory(device)
    state = _update_from(model, global_state, settings.update_kind)
    metrics = dict(run.metrics)
    if notes:
        metrics["module_fixed"] = 1.0
    return TrainResult(
        state=state,
        num_examples=len(dataset),
        metrics=metrics,
        dp_enabled=settings.dp_enabled,
        noise_multiplier=run.noise_multiplier,
        sample_rate=run.sample_rate,
        steps=run.steps,
        epsilon_round=run.epsilon_round,
        delta=settings.delta,
        seconds=time.perf_counter() - started,
        update_kind=settings.update_kind,
        notes=notes,
    )


def evaluate_state(
    task: Task, state: Mapping[str, Tensor], dataset: TensorDataset, device: torch.device
) -> dict[str, float]:
    """The task's metrics of ``state`` (for EVALUATE tasks and local reporting)."""
    model = task.build_model()
    load_state_strict(model, state)
    model.to(device)
    try:
        return task.evaluate(model, dataset)
    finally:
        model.to("cpu")
        release_device_memory(device)


# --- internals ---------------------------------------------------------------------


@dataclass
class _Run:
    metrics: dict[str, float]
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_round: float


class _EpochStats:
    """Running loss/accuracy of one epoch (empty Poisson batches count for nothing)."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0

    def add(self, logits: Tensor, targets: Tensor, loss: Any) -> None:
        n = int(targets.shape[0])
        if n:
            self.loss_sum += float(loss.detach()) * n
            self.correct += int((logits.detach().argmax(dim=1) == targets).sum())
            self.seen += n

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else math.nan


def _make_opacus_compatible(
    model: nn.Module, global_state: Mapping[str, Tensor], notes: list[str]
) -> nn.Module:
    """Validate for Opacus; fix only if needed, and only if the parameters survive.

    A fix that renames or reshapes parameters (e.g. BatchNorm -> GroupNorm drops
    running statistics) would produce an update the server cannot aggregate, so that
    is an error pointing at the model definition rather than a silent change.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    fixed: nn.Module = ModuleValidator.fix(model)
    own = fixed.state_dict()
    same = set(own) == set(global_state) and all(
        tuple(own[k].shape) == tuple(global_state[k].shape) for k in own
    )
    if not same:
        raise ValueError(
            f"{type(model).__name__} is not Opacus-compatible ({errors[0]}) and fixing it "
            "changes its parameters, so its update would not match the global model; "
            "build the task's network Opacus-compatible (e.g. GroupNorm, not BatchNorm)"
        )
    load_state_strict(fixed, global_state)
    notes.append(f"ModuleValidator.fix applied: {'; '.join(str(e) for e in errors)}")
    return fixed


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence Opacus warnings this module has already decided about (see docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # Opacus's hooks fire on the first layer, whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        # make_private_with_epsilon's noise search probes very large sigmas, whose
        # optimal RDP order sits at the edge of the grid; the bound stays valid.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _add_proximal_grad(
    model: nn.Module, global_params: Mapping[str, Tensor], mu: float
) -> None:
    """p.grad += mu * (w - w_global): the gradient of (mu/2)||w - w_global||^2."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(p - global_params[name], alpha=mu)


def _linear_or_hooks(model: nn.Module, task: Task, mode: str) -> str:
    """"linear" when the model's only trainable layer is one final Linear layer;
    "auto" falls back to "hooks"."""
    if linear_head(model, task.input_shape) is not None:
        return "linear"
    if mode == "linear":
        raise ValueError(f"grad_sample_mode 'linear' needs a model whose only trainable "
                         f"layer is one final Linear layer; {task.name}'s network is not")
    return "hooks"


def _train_private(
    model: nn.Module,
    global_params: Mapping[str, Tensor],
    dataset: TensorDataset,
    settings: RoundSettings,
    device: torch.device,
    ledger: PrivacyLedger | None,
    job_id: str,
    round: int,
    on_progress: ProgressFn | None,
    max_physical_batch_size: int,
    private_seed: int | None,
    grad_sample_mode: str,
    stop: StopFlag | None = None,
) -> _Run:
    hp = settings.hyperparams
    seed = private_seed if private_seed is not None else secrets.randbits(63)
    sampling_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed ^ 0x5EED)
    loader = DataLoader(dataset, batch_size=hp.batch_size, generator=sampling_gen)
    if settings.epsilon_per_job > 0:
        settings = _planned(settings, ledger, job_id, round, len(loader))
    optimizer = hp.make_optimizer(model.parameters())
    criterion: Callable[[Tensor, Tensor], Any] = nn.CrossEntropyLoss()
    # train_round chose "linear" only for a model linear_head accepted
    head = split_head(model) if grad_sample_mode == "linear" else None
    with _quiet_opacus():
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        common = {
            "module": model,
            "optimizer": optimizer,
            "data_loader": loader,
            "criterion": criterion,
            "max_grad_norm": settings.max_grad_norm,
            "poisson_sampling": True,
            "noise_generator": noise_gen,
            # the closed form still needs ghost mode's optimizer (noise, scale, account)
            "grad_sample_mode": "ghost" if grad_sample_mode == "linear" else grad_sample_mode,
        }
        if settings.target_epsilon > 0:
            wrapped = engine.make_private_with_epsilon(
                target_epsilon=settings.target_epsilon,
                target_delta=settings.delta,
                epochs=hp.local_epochs,
                **common,
            )
        else:
            wrapped = engine.make_private(noise_multiplier=settings.noise_multiplier, **common)
    if head is not None:
        # clipped_grad_sum fills p.grad with the clipped sum; ghost mode's optimizer
        # noises, scales and accounts it. Opacus's hooks would only cost time.
        dp_model, dp_opt, _, dp_loader = wrapped
        dp_model.remove_hooks()
    elif grad_sample_mode == "ghost":
        # The wrapped criterion's loss.backward() runs both passes (norms, then the
        # reweighted loss); everything after it is the same as with hooks.
        dp_model, dp_opt, criterion, dp_loader = wrapped
    else:
        dp_model, dp_opt, dp_loader = wrapped
    assert isinstance(dp_opt, DPOptimizer)
    noise_multiplier = float(dp_opt.noise_multiplier)
    sample_rate = 1.0 / len(loader)
    steps_per_epoch = len(dp_loader)
    planned_steps = hp.local_epochs * steps_per_epoch
    if ledger is not None:
        ledger.ensure_budget(noise_multiplier, sample_rate, planned_steps)

    stats = _EpochStats()
    stopped = False
    try:
        with _quiet_opacus():
            for epoch in range(1, hp.local_epochs + 1):
                stats = _EpochStats()
                step = 0
                # The closed form holds no per-sample gradients: no physical split.
                with (nullcontext(dp_loader) if head is not None else BatchMemoryManager(
                    data_loader=dp_loader,
                    max_physical_batch_size=max_physical_batch_size,
                    optimizer=dp_opt,
                )) as physical:
                    for inputs, targets in physical:
                        if stop is not None and stop.is_set():
                            stopped = True
                            raise TrainingStopped(_steps_of(engine))
                        inputs, targets = inputs.to(device), targets.to(device)
                        if head is not None:
                            logits, loss = clipped_grad_sum(head, inputs, targets, criterion,
                                                            settings.max_grad_norm)
                        else:
                            logits = dp_model(inputs)
                            loss = criterion(logits, targets)
                            loss.backward()
                        stats.add(logits, targets, loss)
                        # pre_step clips, noises and accounts; False = logical batch
                        # not finished (BatchMemoryManager split it).
                        if (noise_and_account(dp_opt) if head is not None
                                else dp_opt.pre_step()):
                            if settings.proximal_mu > 0:
                                _add_proximal_grad(model, global_params, settings.proximal_mu)
                            dp_opt.original_optimizer.step()
                            step += 1
                            if on_progress is not None:
                                on_progress(epoch, hp.local_epochs, step, steps_per_epoch,
                                            stats.loss)
                        dp_opt.zero_grad(set_to_none=True)
    finally:
        # Whatever happened, steps taken were spent: account them.
        history = [(float(nm), float(q), int(n)) for nm, q, n in engine.accountant.history]
        steps = sum(n for _, _, n in history)
        if ledger is not None and steps > 0:
            ledger.record(job_id, round, noise_multiplier, sample_rate, steps,
                          abandoned=stopped)
    return _Run(
        metrics={"train_loss": stats.loss, "train_accuracy": stats.accuracy},
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        epsilon_round=compose_epsilon(history, settings.delta,
                                      ledger.accountant if ledger else DEFAULT_ACCOUNTANT),
    )


def _steps_of(engine: PrivacyEngine) -> int:
    """DP steps the engine's accountant has seen (what the ledger will be charged)."""
    return sum(int(n) for _, _, n in engine.accountant.history)


def _planned(settings: RoundSettings, ledger: PrivacyLedger | None, job_id: str,
             round: int, batches: int) -> RoundSettings:
    """The settings with this round's noise from the job's budget plan.

    Opacus samples each batch at rate ``1 / batches`` and takes ``batches`` steps per
    epoch (Poisson sampling), so both are known before any data is touched. A noise
    multiplier the hospital set itself wins when it is the larger (more privacy, and
    the job still ends under its budget); a smaller one cannot undercut the plan."""
    if ledger is None:
        raise ValueError("planning the job's privacy budget needs the hospital's ledger")
    plan = plan_round(ledger, job_id, 1.0 / batches, settings.hyperparams.local_epochs * batches,
                      max(1, settings.total_rounds - round + 1), settings.epsilon_per_job)
    return replace(settings, noise_multiplier=max(plan.noise_multiplier,
                                                  settings.noise_multiplier),
                   target_epsilon=0.0)


def _train_plain(
    model: nn.Module,
    global_params: Mapping[str, Tensor],
    dataset: TensorDataset,
    settings: RoundSettings,
    device: torch.device,
    on_progress: ProgressFn | None,
    stop: StopFlag | None = None,
) -> _Run:
    hp = settings.hyperparams
    loader = DataLoader(dataset, batch_size=hp.batch_size, shuffle=True)
    optimizer = hp.make_optimizer(model.parameters())
    criterion = nn.CrossEntropyLoss()
    mu = settings.proximal_mu
    stats = _EpochStats()
    steps = 0
    for epoch in range(1, hp.local_epochs + 1):
        stats = _EpochStats()
        for step, (inputs, targets) in enumerate(loader, start=1):
            if stop is not None and stop.is_set():
                raise TrainingStopped(steps)
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss = criterion(logits, targets)
            stats.add(logits, targets, loss)
            if mu > 0:
                prox = sum(
                    ((p - global_params[n]) ** 2).sum() for n, p in model.named_parameters()
                )
                loss = loss + (mu / 2) * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if on_progress is not None:
                on_progress(epoch, hp.local_epochs, step, len(loader), stats.loss)
    return _Run(
        metrics={"train_loss": stats.loss, "train_accuracy": stats.accuracy},
        noise_multiplier=0.0,
        sample_rate=1.0 / len(loader),
        steps=steps,
        epsilon_round=0.0,
    )


def _update_from(
    model: nn.Module, global_state: Mapping[str, Tensor], kind: int
) -> dict[str, Tensor]:
    """The tensors to send, in the global state's order, names, dtypes and shapes.

    DELTA is trained minus global for floating tensors; integer/bool buffers are sent
    as trained values (a difference of counters or masks means nothing, and the
    server keeps the global value for non-floating tensors anyway).
    """
    trained = model.state_dict()
    out: dict[str, Tensor] = {}
    for name, ref in global_state.items():
        value = trained[name].detach().to("cpu", dtype=ref.dtype)
        if kind == coordinator_pb2.DELTA and ref.is_floating_point():
            value = value - ref.to("cpu")
        out[name] = value.clone().contiguous()
    return out
