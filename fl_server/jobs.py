"""Jobs at runtime: the queue, one job running at a time, and the engine that serves it.

A long-running server daemon outlives any one study. Jobs arrive from the operator's
admin CLI as TOML job files (`fl-admin submit job.toml`), or from the server's own
flags as before; each is settled against its task's defaults once, stored in SQLite as
`queued`, and run in submission order. A restart resumes the job that was running (from
its last checkpoint) and keeps the queue, because both live in the store, not in this
process.

The gRPC services hold an `ActiveEngine`: it forwards to the round engine of the job
being served (or of the last one, whose final model the hospitals may still be
fetching, or an idle stand-in before the first), so no service needs to know that jobs
come and go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from fl_core.constants import EPSILON_WARN_PER_JOB
from fl_core.errors import Refusal
from fl_core.logs import log_event
from fl_proto import coordinator_pb2 as cpb
from fl_server import audit
from fl_server.clients import ClientRegistry
from fl_server.config import (
    JOB_FIELDS,
    ConfigError,
    ServerConfig,
    restore_job,
    settle_job,
    typed_value,
)
from fl_server.final_model import FinalDelivery
from fl_server.rounds import RoundEngine, RoundRefusal
from fl_server.store import FINAL_JOB_STATES, Job, Store, StoreError

log = logging.getLogger("fl_server.jobs")

# Settings a job file may hold: the job's own (JOB_FIELDS) and its name.
JOB_FILE_KEYS = frozenset(JOB_FIELDS) | {"job_id"}
MAX_JOB_FILE_BYTES = 64 * 1024


class JobError(Exception):
    """A job request the server cannot take; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- job files ---------------------------------------------------------------------------
def parse_job_file(text: str, source: str = "job file") -> dict[str, Any]:
    """The settings of a TOML job file, typed like the server's own config; an unknown
    key, a wrong type or a value out of range is an error naming it (a mistyped
    `epsilon_per_hospitl = 1` must not leave the default budget in force)."""
    if len(text.encode()) > MAX_JOB_FILE_BYTES:
        raise ConfigError(f"{source} is over {MAX_JOB_FILE_BYTES // 1024} KiB")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - JOB_FILE_KEYS)
    if unknown:
        raise ConfigError(f"{source} has unknown keys: {', '.join(unknown)} (a job file holds"
                          f" {', '.join(sorted(JOB_FILE_KEYS))})")
    if "model_type" not in data:
        raise ConfigError(f"{source} must name its model_type")
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name == "job_id":
            if not isinstance(value, str):
                raise ConfigError(f"{source}: job_id must be text")
            values[name] = value
        else:
            values[name] = typed_value(name, value, source)
    return values


def job_config(base: ServerConfig, values: dict[str, Any]) -> ServerConfig:
    """A job's config: this process's own settings (address, keys, threads, eval data)
    with the job's settings over the defaults; the server's flags for its own first job
    do not leak into submitted ones."""
    cfg = ServerConfig()
    for name in ("host", "port", "keys_dir", "state_dir", "max_workers", "torch_threads",
                 "eval_data", "secagg_stage_timeout_s"):
        setattr(cfg, name, getattr(base, name))
    for name, value in values.items():
        setattr(cfg, name, value)
    cfg.validate()
    return cfg


def settings_sha256(cfg: ServerConfig) -> str:
    """Identifies a job started from flags (a submitted job uses its file's hash)."""
    return hashlib.sha256(json.dumps(cfg.job_dict(), sort_keys=True).encode()).hexdigest()


def new_job_id() -> str:
    return f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# --- the engine the services talk to --------------------------------------------------
class IdleEngine:
    """Stands in before the first job: every call that needs a round is refused with
    the reason, and Status says the server is idle."""

    def __init__(self, cfg: ServerConfig, registry: ClientRegistry, final: FinalDelivery,
                 on_round_closed: list[Any]) -> None:
        self.cfg = replace(cfg, model_type="", strategy="", rounds=0)
        self.registry = registry
        self.final = final
        self.on_round_closed = on_round_closed
        self.job_id = ""
        self.job_state = "idle"
        self.round = 0
        self.phase = "idle"
        self.current = None
        self.model = None
        self.strategy = None
        self.secure = None
        self.stop_event = threading.Event()
        self.done_event = threading.Event()

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise RoundRefusal("FAILED_PRECONDITION", "no job is running on this server",
                           Refusal.NO_ROUND)

    task_of = check_update_allowed = current_model = accept_update = report = _refuse

    def status_fields(self) -> dict[str, Any]:
        return {"round": 0, "phase": "idle", "job_state": "idle", "last_metrics": {},
                "model_sha256": ""}

    def shutdown(self) -> None:
        self.stop_event.set()


class ActiveEngine:
    """Forwards every attribute, read or written, to the engine of the job being served
    (see the module docstring): services built once keep working across jobs."""

    def __init__(self, jobs: JobManager) -> None:
        object.__setattr__(self, "_jobs", jobs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jobs.engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._jobs.engine, name, value)


@dataclass
class _Running:
    job: Job
    engine: RoundEngine
    abort_reason: str = ""


EngineFactory = Callable[[ServerConfig, Job, bool], RoundEngine]


class JobManager:
    """The queue and the one running job. `run()` is the jobs thread; `submit` and
    `abort` come from the admin RPCs; `engine` is what the services serve."""

    def __init__(self, base: ServerConfig, store: Store, registry: ClientRegistry,
                 build_engine: EngineFactory) -> None:
        self.base = base
        self.store = store
        self.registry = registry
        self.build_engine = build_engine
        self.final = FinalDelivery()
        self.on_round_closed: list[Any] = []
        self.engine: Any = IdleEngine(base, registry, self.final, self.on_round_closed)
        self.active = ActiveEngine(self)
        self._cv = threading.Condition()
        self._running: _Running | None = None
        self._start_adopted = False  # the job the process started with runs first
        self._stopping = False
        self.jobs_run = 0
        self.done_event = threading.Event()  # set when idle after at least one job

    # --- starting ------------------------------------------------------------------
    def start_with(self, job: Job, resuming: bool) -> RoundEngine:
        """Prepare the job the process starts with (from its flags, or the one a
        restart resumes), so start-up errors come out before the server serves."""
        engine = self._adopt(job, resuming)
        self._start_adopted = True
        return engine

    def create_from_flags(self, cfg: ServerConfig) -> Job:
        job_id = cfg.job_id or new_job_id()
        job = self.store.create_job(job_id, cfg.model_type, cfg.strategy, cfg.job_dict(),
                                    cfg.rounds, job_sha256=settings_sha256(cfg))
        audit.job_event("job_created", job_id, f"job {job_id} created from the server's flags"
                        f" ({cfg.model_type}, {cfg.rounds} rounds, {cfg.strategy})")
        return job

    def _adopt(self, job: Job, resuming: bool) -> RoundEngine:
        cfg = job_config(self.base, {})
        restore_job(cfg, job.config, set(), job.job_id)
        engine = self.build_engine(cfg, job, resuming)
        engine.final = self.final  # one delivery desk: the last job's model stays fetchable
        engine.on_round_closed = self.on_round_closed
        self.final.begin_job(job.job_id, job.model_type, job.strategy, self.store)
        with self._cv:
            self.engine = engine
            self._running = _Running(job, engine)
        return engine

    # --- the jobs thread -----------------------------------------------------------------
    def run(self) -> None:
        """Run jobs one at a time, in submission order, until `shutdown`."""
        while True:
            running = self._next()
            if running is None:
                return
            self._run_one(running)

    def _next(self) -> _Running | None:
        with self._cv:
            while True:
                if self._stopping:
                    return None
                if self._start_adopted:
                    self._start_adopted = False
                    assert self._running is not None
                    return self._running
                job = self.store.next_queued()
                if job is not None:
                    break
                if self.jobs_run:
                    self.done_event.set()
                self._cv.wait(timeout=1.0)
        try:
            self.store.set_job_state(job.job_id, "running")
            job = replace(job, state="running")
            self._adopt(job, resuming=False)
        except Exception as exc:  # noqa: BLE001 - a job that cannot start fails alone
            log_event(log, "job_failed_to_start", logging.ERROR, job=job.job_id,
                      reason=str(exc))
            audit.job_event("job_failed", job.job_id, f"job {job.job_id} could not start: {exc}")
            try:
                self.store.set_job_state(job.job_id, "failed")
            except StoreError:
                log.exception("job %s: its failed state could not be recorded", job.job_id)
                with self._cv:
                    self._stopping = True
            return self._next()
        with self._cv:
            return self._running

    def _run_one(self, running: _Running) -> None:
        job, engine = running.job, running.engine
        self.registry.set_model_type(job.model_type)
        self.done_event.clear()
        log_event(log, "job_started", job=job.job_id, model_type=job.model_type,
                  strategy=job.strategy, rounds=job.total_rounds,
                  queued=len(self.store.jobs(("queued",))))
        audit.job_event("job_started", job.job_id, f"job {job.job_id} started")
        engine.run()
        self.jobs_run += 1
        stored = self.store.get_job(job.job_id)
        if not running.abort_reason and stored is not None and stored.state == "running" \
                and not engine.stop_event.is_set():
            # the engine stopped on a disk error with the job left resumable: running the
            # next job on the same broken disk would only fail it too
            log_event(log, "jobs_paused", logging.ERROR, job=job.job_id,
                      reason=engine.last_failure,
                      note="no further job starts until the server is restarted")
            with self._cv:
                self._stopping = True
            return
        if running.abort_reason:
            self._finish_aborted(running)
        elif engine.job_state in ("completed", "failed"):
            audit.job_event("job_ended", job.job_id,
                            f"job {job.job_id} {engine.job_state} after round {engine.round}")

    def _finish_aborted(self, running: _Running) -> None:
        job, engine = running.job, running.engine
        self.store.set_job_state(job.job_id, "aborted")
        engine.job_state = "aborted"
        engine.phase = "aborted"
        reason = running.abort_reason
        stop = cpb.Task(kind=cpb.STOP, job_id=job.job_id, round=engine.round,
                        model_type=job.model_type, reason=reason, job_state="aborted")

        def stop_task(_cid: str) -> cpb.Task:
            task = cpb.Task()
            task.CopyFrom(stop)
            task.task_id = uuid.uuid4().hex
            return task

        self.registry.broadcast(stop_task)  # hospitals still training it stop between batches
        log_event(log, "job_aborted", job=job.job_id, round=engine.round, reason=reason)
        audit.job_event("job_aborted", job.job_id, f"job {job.job_id} aborted: {reason}")

    # --- admin verbs ---------------------------------------------------------------------
    def submit(self, text: str, by: str) -> Job:
        from fl_models.registry import get_task
        from fl_server.strategies import StrategyError, make_strategy

        digest = hashlib.sha256(text.encode()).hexdigest()
        try:
            values = parse_job_file(text)
            cfg = job_config(self.base, values)
            task = get_task(cfg.model_type)
            make_strategy(cfg.strategy, **cfg.strategy_params)
            settle_job(cfg, task.hyperparams)
        except (ConfigError, StrategyError, ValueError) as exc:
            raise JobError("INVALID_ARGUMENT", f"job file refused: {exc}") from None
        job_id = str(values.get("job_id") or new_job_id())
        try:
            job = self.store.create_job(job_id, cfg.model_type, cfg.strategy, cfg.job_dict(),
                                        cfg.rounds, state="queued", job_sha256=digest)
        except StoreError as exc:
            code = "ALREADY_EXISTS" if "already exists" in str(exc) else "INVALID_ARGUMENT"
            raise JobError(code, f"job file refused: {exc}") from None
        if cfg.epsilon_per_hospital > EPSILON_WARN_PER_JOB:
            log_event(log, "privacy_warning", logging.WARNING, job=job_id,
                      epsilon_per_hospital=cfg.epsilon_per_hospital,
                      note=f"above {EPSILON_WARN_PER_JOB:g} for one job gives little privacy")
        log_event(log, "job_submitted", job=job_id, by=by, model_type=cfg.model_type,
                  rounds=cfg.rounds, strategy=cfg.strategy, job_sha256=digest[:16],
                  settings=json.dumps(cfg.job_dict(), sort_keys=True))
        audit.job_event("job_submitted", job_id, f"job {job_id} submitted by {by}", by=by,
                        job_sha256=digest, settings=cfg.job_dict())
        with self._cv:
            self._cv.notify_all()
        return job

    def abort(self, job_id: str, reason: str, by: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobError("NOT_FOUND", f"no job {job_id!r} on this server (fl-admin list)")
        why = f"aborted by {by}" + (f": {reason}" if reason else "")
        if job.state in FINAL_JOB_STATES:
            raise JobError("FAILED_PRECONDITION", f"job {job_id} has already ended ({job.state})")
        with self._cv:
            running = self._running
            if running is not None and running.job.job_id == job_id \
                    and not running.engine.done_event.is_set():
                running.abort_reason = why
                running.engine.shutdown()
                log_event(log, "job_abort_requested", job=job_id, by=by, reason=reason)
                return replace(job, state="aborting")
        self.store.set_job_state(job_id, "aborted")
        log_event(log, "job_aborted", job=job_id, by=by, reason=reason, was=job.state)
        audit.job_event("job_aborted", job_id, f"job {job_id} ({job.state}) {why}")
        return replace(job, state="aborted")

    # --- views ---------------------------------------------------------------------------
    def queue(self) -> list[Job]:
        return self.store.jobs(("queued",))

    def idle(self) -> bool:
        """No job running and none queued (after at least one ran)."""
        return self.done_event.is_set()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.engine.shutdown()


def job_info(store: Store, job: Job, queue: list[Job] | None = None) -> cpb.JobInfo:
    """A job as the admin CLI lists it."""
    completed = store.last_completed_round(job.job_id)
    sha = store.last_model_sha256(job.job_id)
    # The queue and the job are read one after the other while the job manager runs on:
    # a job may start (or be queued) in between, so a queued job missing from the queue
    # snapshot has no position rather than failing the call.
    position = 0
    if queue is not None and job.state == "queued":
        ids = [j.job_id for j in queue]
        position = 1 + ids.index(job.job_id) if job.job_id in ids else 0
    return cpb.JobInfo(job_id=job.job_id, model_type=job.model_type, strategy=job.strategy,
                       state=job.state, total_rounds=job.total_rounds,
                       completed_rounds=completed, created_unix_ms=int(job.created * 1000),
                       job_sha256=job.job_sha256, model_sha256=sha, queue_position=position,
                       settings_json=json.dumps(job.config, sort_keys=True))


def initial_state(task: Any, seed: int) -> dict[str, torch.Tensor]:
    """A new job's starting model, reproducible from its seed."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}


def model_file_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The model as a safetensors file (what `fl-admin download` writes); the tensors'
    order, which the recorded hash covers, travels in its metadata."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()},
                metadata={"format": "pt", "tensor_order": json.dumps(list(state))})


def read_model_file(path: str) -> dict[str, torch.Tensor]:
    """A downloaded model in its recorded tensor order (see `model_file_bytes`)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        names = json.loads(meta.get("tensor_order", "null")) or list(fh.keys())
        return {name: fh.get_tensor(name) for name in names}
