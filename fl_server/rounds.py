"""The round state machine: select -> distribute -> train -> collect -> aggregate ->
evaluate -> checkpoint, one round after another until the job is done.

The engine runs in its own thread; gRPC handlers call into it (accept_update,
report, current_model) under one condition variable. Nothing about a round is
durable until its checkpoint and row are written together (store.complete_round),
so a server killed at any point restarts at the first round not recorded, with
the model of the last recorded one: no completed round is lost or recorded twice.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_core.allocator import release_free_heap
from fl_core.constants import (
    MAPPED_MODEL_MIN_BYTES,
    NORM_CHUNK_ELEMS,
    PARALLEL_HASH_MIN_BYTES,
    TRIM_HEAP_MIN_MODEL_BYTES,
)
from fl_core.errors import Refusal
from fl_core.gc_policy import collect_round_garbage
from fl_core.logs import log_event
from fl_core.secagg import MASKED_TENSOR, SecAggError
from fl_core.tensor_codec import FAST_DIGEST, build_manifest, iter_chunks
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb
from fl_server.audit import round_completed, round_failed
from fl_server.clients import ClientRegistry
from fl_server.config import ServerConfig
from fl_server.faults import fault_point
from fl_server.final_model import FinalDelivery, participants
from fl_server.metrics import OBSERVED
from fl_server.model_pages import MappedModel
from fl_server.store import (
    CHECKPOINT_MODEL_PREFIX,
    PendingCheckpoint,
    RoundSummary,
    Store,
    StoreError,
    state_sha256,
)
from fl_server.strategies import Strategy, StrategyError
from fl_server.strategies.base import (
    accumulation_dtype,
    tensor_norm,
    update_norm,
    weighted_metrics,
)

log = logging.getLogger("fl_server.rounds")

PHASES = ("idle", "select", "distribute", "train", "collect", "aggregate", "evaluate",
          "checkpoint", "completed", "failed")


class RoundRefusal(Exception):
    """An update or report the current round cannot take; `code` names the gRPC status,
    `reason` the machine-readable Refusal sent with it."""

    def __init__(self, code: str, message: str, reason: Refusal | str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = str(reason)


_OTHER_MANIFESTS = threading.Lock()


@dataclass
class ModelVersion:
    """The global model as served to clients: one copy, shared by every download.

    `manifest` is hashed with FAST_DIGEST; a hospital that did not declare it at Join
    (a client from before) gets a SHA-256 manifest of the same model, made the first
    time one is asked for and kept with the version (`manifest_for`)."""

    version: int
    state: dict[str, torch.Tensor]
    manifest: tpb.TensorManifest
    sha256: str
    # set when `state` is read from the checkpoint file (model_pages.py): readers drop
    # the pages they have passed
    pages: MappedModel | None = None
    others: dict[int, tpb.TensorManifest] = field(default_factory=dict)
    # chunk size -> the plaintext chunks of a model carried in tasks (model_stream.py)
    carried: dict[int, tuple[bytes | memoryview, ...]] = field(default_factory=dict)
    # L2 norm of the floating tensors once measured: the next round's step bound is
    # relative to it, and the pass that measured the step measured it too
    norm: float | None = None

    def measured_norm(self) -> float:
        """`norm`, measured now (one pass over the model) if no pass has measured it."""
        if self.norm is None:
            self.norm = update_norm(self.state, self.release)
        return self.norm

    @property
    def release(self) -> Callable[[str], None] | None:
        """What a reader calls with each tensor's name once past it (None: in memory)."""
        return self.pages.release if self.pages is not None else None

    def plain_chunks(self, manifest: tpb.TensorManifest) -> tuple[bytes | memoryview, ...]:
        """The model's plaintext chunks under `manifest` (one of this model's, in any
        digest: they cut alike), cut once per version. Every selected hospital is sent
        the same plaintext, sealed under its own key; cutting it again for each one
        (the manifest's checks, the join of a chunk that straddles tensors) was a third
        or more of sealing a carried model (issue 16 item 2). The chunks are views of
        the version's tensors, which never change; two threads cutting at once cut
        the same."""
        chunks = self.carried.get(manifest.chunk_size)
        if chunks is None:
            chunks = tuple(iter_chunks(self.state, manifest))
            self.carried[manifest.chunk_size] = chunks
        return chunks

    def manifest_for(self, digest: int) -> tpb.TensorManifest:
        """The model's manifest hashed with `digest` (tensors.proto Digest)."""
        if digest == self.manifest.digest:
            return self.manifest
        with _OTHER_MANIFESTS:
            other = self.others.get(digest)
            if other is None:
                other = build_manifest(self.state, self.manifest.chunk_size, digest=digest)
                if self.pages is not None:  # hashing read every page of the model
                    self.pages.release_all()
                self.others[digest] = other
            return other


@dataclass
class ReportFigures:
    """What a client's Report after its update adds: the privacy it spent."""

    epsilon_round: float
    epsilon_total: float
    dp_enabled: bool
    metrics: dict[str, float]


@dataclass
class AcceptedUpdate:
    """One client's verified update in a round (the tensors are in the strategy)."""

    num_examples: int
    metrics: dict[str, float]
    report: ReportFigures | None = None
    norm: float = 0.0  # L2 norm of the delta (the sanity bound compares them)


@dataclass
class Evaluation:
    """One client's evaluation of the round's new global model."""

    num_examples: int
    metrics: dict[str, float]


@dataclass
class RoundState:
    job_id: str
    round: int
    attempt: int
    kind: cpb.TaskKind
    selected: list[str]
    tasks: dict[str, cpb.Task]
    deadline: float
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    open: bool = True
    secagg: Any = None  # the round's SecAggRound (fl_server/secagg_round.py) when secure

    def outstanding(self) -> set[str]:
        done = set(self.accepted) | set(self.failed)
        if self.kind == cpb.EVALUATE:
            done |= set(self.evaluations)
        return set(self.selected) - done


class RoundEngine:
    def __init__(self, cfg: ServerConfig, store: Store, registry: ClientRegistry,
                 strategy: Strategy, task: Any, job_id: str, train_config: cpb.TrainConfig,
                 eval_dataset: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.strategy = strategy
        self.task = task
        self.job_id = job_id
        self.train_config = train_config
        self.eval_dataset = eval_dataset
        self.stop_event = threading.Event()
        self.done_event = threading.Event()
        self._cv = threading.Condition()
        self.phase = "idle"
        self.round = 0
        self.model: ModelVersion | None = None
        self.current: RoundState | None = None
        self.last_metrics: dict[str, float] = {}
        self.job_state = "running"
        self.on_round_closed: list[Any] = []  # callbacks(round_state) e.g. spool clean-up
        self.last_failure = ""
        self.secure: Any = None  # SecureAggregation (secagg_round.py) with --secure_aggregation
        self.excluded: dict[str, str] = {}  # this round's spoilers -> why (not reselected)
        self._server_eval: dict[str, float] = {}
        self._rollback: tuple[ModelVersion, dict[str, torch.Tensor]] | None = None
        self.final = FinalDelivery()

    # model --------------------------------------------------------------------
    def set_model(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        plain = {k: v.detach().contiguous() for k, v in state.items()}
        manifest, sha = hash_model(plain)
        model = ModelVersion(version, plain, manifest, sha)
        if manifest.total_bytes >= MAPPED_MODEL_MIN_BYTES:
            # once nothing holds this version (it is served from its checkpoint, and the
            # last download from memory has ended), the strategy may write the next
            # round's sums into its memory instead of faulting in a model's worth anew
            weakref.finalize(model, self.strategy.recycle, plain).atexit = False
        with self._cv:  # hashed outside: task streams read the model under this lock
            self.model = model

    def read_model_from_checkpoint(self) -> None:
        """Serve the current model from its checkpoint file, once written, instead of
        anonymous memory (fl_server/model_pages.py): the memory of a large model goes
        back, the bytes stay on disk and in the page cache. A model below
        MAPPED_MODEL_MIN_BYTES stays in memory; a checkpoint that does not hold the
        model (it cannot, as written; a warning says so) leaves it in memory too."""
        with self._cv:
            model = self.model
        if model is None or model.pages is not None \
                or model.manifest.total_bytes < MAPPED_MODEL_MIN_BYTES:
            return
        try:
            path = self.store.recorded_checkpoint(self.job_id, model.version)
            pages = MappedModel(path, CHECKPOINT_MODEL_PREFIX, model.manifest)
        except (OSError, ValueError, StoreError) as exc:
            log_event(log, "model_kept_in_memory", logging.WARNING, job=self.job_id,
                      round=model.version, reason=str(exc)[:300])
            return
        mapped = ModelVersion(model.version, pages.state, model.manifest, model.sha256, pages,
                              model.others, norm=model.norm)
        with self._cv:
            if self.model is model:
                self.model = mapped

    def current_model(self) -> ModelVersion:
        with self._cv:
            if self.model is None:
                raise RoundRefusal("UNAVAILABLE", "the global model is not loaded yet",
                                   Refusal.MODEL_NOT_READY)
            return self.model

    # gRPC-facing ----------------------------------------------------------------
    def task_of(self, client_id: str, task_id: str) -> tuple[RoundState, cpb.Task]:
        """The open round and task a client's call refers to, or a refusal saying why."""
        with self._cv:
            rs = self.current
            if rs is None or not rs.open:
                raise RoundRefusal("FAILED_PRECONDITION", "no round is open", Refusal.NO_ROUND)
            task = rs.tasks.get(client_id)
            if task is None:
                raise RoundRefusal("PERMISSION_DENIED",
                                   f"client {client_id} was not selected for round {rs.round}",
                                   Refusal.NOT_SELECTED)
            if task.task_id != task_id:
                raise RoundRefusal("FAILED_PRECONDITION",
                                   f"task {task_id!r} is not the open task of round {rs.round}",
                                   Refusal.WRONG_TASK)
            return rs, task

    def check_update_allowed(self, client_id: str, task_id: str, job_id: str,
                             round_no: int) -> RoundState:
        rs, task = self.task_of(client_id, task_id)
        if job_id != rs.job_id or round_no != rs.round:
            raise RoundRefusal("FAILED_PRECONDITION",
                               f"update names job {job_id!r} round {round_no}; the open round"
                               f" is {rs.job_id!r} round {rs.round}", Refusal.WRONG_ROUND)
        if task.kind != cpb.TRAIN:
            raise RoundRefusal("FAILED_PRECONDITION", "the open task is not a training task",
                               Refusal.WRONG_TASK)
        with self._cv:
            if client_id in rs.accepted:
                raise RoundRefusal("ALREADY_EXISTS",
                                   f"client {client_id} already sent its update for round"
                                   f" {rs.round}", Refusal.DUPLICATE_UPDATE)
            if client_id in rs.failed:
                raise RoundRefusal("FAILED_PRECONDITION",
                                   f"client {client_id} was already recorded as failed in round"
                                   f" {rs.round}: {rs.failed[client_id]}",
                                   Refusal.ALREADY_FAILED)
        return rs

    def accept_update(self, client_id: str, task_id: str, job_id: str, round_no: int,
                      delta: Mapping[str, torch.Tensor], num_examples: int,
                      metrics: Mapping[str, float],
                      release: Callable[[str], None] | None = None) -> None:
        """Fold a complete, verified update into the round (all or nothing).

        `release(name)`: called after each pass over the update has read tensor
        `name` (see `Strategy.accept`)."""
        rs = self.check_update_allowed(client_id, task_id, job_id, round_no)
        norm = update_norm(delta, release)
        with self._cv:
            if not rs.open or self.current is not rs:
                raise RoundRefusal("FAILED_PRECONDITION", f"round {rs.round} closed",
                                   Refusal.ROUND_CLOSED)
            if client_id in rs.accepted:
                raise RoundRefusal("ALREADY_EXISTS",
                                   f"client {client_id} already sent its update for round"
                                   f" {rs.round}", Refusal.DUPLICATE_UPDATE)
            if rs.secagg is not None:  # a masked input: folded mod 2^32, unreadable alone
                rs.secagg.fold(client_id, delta[MASKED_TENSOR], num_examples)
            else:
                self.strategy.accept(client_id, delta, num_examples, release)
            rs.accepted[client_id] = AcceptedUpdate(num_examples, dict(metrics), norm=norm)
            self.registry.clear_task(client_id, task_id)
            self._cv.notify_all()

    def report(self, client_id: str, req: cpb.ReportRequest) -> None:
        rs, task = self.task_of(client_id, req.task_id)
        with self._cv:
            if task.kind == cpb.TRAIN:
                if req.status in (cpb.REFUSED, cpb.FAILED) and client_id not in rs.accepted:
                    rs.failed[client_id] = f"{cpb.ReportStatus.Name(req.status)}: {req.reason}"
                    self.registry.clear_task(client_id, req.task_id)
                elif client_id in rs.accepted:
                    rs.accepted[client_id].report = ReportFigures(
                        req.epsilon_round, req.epsilon_total, req.dp_enabled,
                        dict(req.metrics))
            elif task.kind == cpb.EVALUATE:
                if req.status == cpb.OK:
                    rs.evaluations[client_id] = Evaluation(int(req.num_examples),
                                                           dict(req.metrics))
                else:
                    rs.failed[client_id] = f"{cpb.ReportStatus.Name(req.status)}: {req.reason}"
                self.registry.clear_task(client_id, req.task_id)
            self._cv.notify_all()

    # the job loop -----------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run_job()
        except StoreError as exc:
            # The disk failed, not the job (full, read-only, I/O error): nothing of this
            # round was recorded, so the job is left running in the store and a restart
            # resumes it from its last checkpoint. Marking it failed would make that
            # restart start a brand-new job instead.
            log_event(log, "engine_stopped", logging.ERROR, job=self.job_id, round=self.round,
                      reason=str(exc), resumable="yes: fix the disk, then restart the server")
            self.last_failure = str(exc)
            self.job_state = "failed"
            self._set_phase("failed")
        except Exception:
            log.exception("round engine stopped on an unexpected error")
            self.job_state = "failed"
            self._set_phase("failed")
            self.store.set_job_state(self.job_id, "failed")
        finally:
            self.done_event.set()

    def _run_job(self) -> None:
        total = self.cfg.rounds
        start_round = self.store.last_completed_round(self.job_id) + 1
        for round_no in range(start_round, total + 1):
            if self.stop_event.is_set():
                return
            self.round = round_no
            self.excluded = {}  # clients whose update spoiled an attempt of this round
            ok = False
            for attempt in range(1, self.cfg.max_round_attempts + 1):
                if self.stop_event.is_set():
                    return
                ok = self._attempt(round_no, attempt)
                self._release_round_memory()
                if ok:
                    break
            if not ok:
                if self.stop_event.is_set():
                    return
                reason = (f"round failed {self.cfg.max_round_attempts} times; last:"
                          f" {self.last_failure}")
                log_event(log, "job_failed", job=self.job_id, round=round_no, reason=reason)
                self.store.record_failed_round(self.job_id, round_no,
                                               RoundSummary(0, 0, 0, 0.0), reason)
                round_failed(self.job_id, round_no, self.cfg.max_round_attempts, reason,
                             final=True)
                self.job_state = "failed"
                self._set_phase("failed")
                self.store.set_job_state(self.job_id, "failed")
                self._broadcast_stop()
                return
        self.job_state = "completed"
        self._set_phase("completed")
        self.store.set_job_state(self.job_id, "completed")
        log_event(log, "job_finished", job=self.job_id, rounds=total)
        self._broadcast_stop()

    def _attempt(self, round_no: int, attempt: int) -> bool:
        """One attempt of a round. Whatever goes wrong inside it that is not the disk
        (StoreError, which stops the engine resumably) fails this attempt, never the
        job: the model and the strategy's server state are put back as they were."""
        self._rollback = (self.current_model(),
                          {k: v.clone() for k, v in self.strategy.export_state().items()})
        try:
            return self._run_round(round_no, attempt)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - contained: this attempt fails
            if self.store.last_completed_round(self.job_id) >= round_no:
                return True  # recorded before the error: the round stands
            log.exception("round %d attempt %d stopped on an unexpected error", round_no,
                          attempt)
            with self._cv:
                if self.current is not None:
                    self.current.open = False
            self._restore()
            reason = f"internal error: {type(exc).__name__}: {exc}"[:500]
            self.store.record_event("round_attempt_failed",
                                    {"round": round_no, "attempt": attempt, "reason": reason},
                                    job_id=self.job_id)
            round_failed(self.job_id, round_no, attempt, reason)
            self.last_failure = reason
            return False

    def _restore(self) -> None:
        """The global model and the strategy's server state as the attempt found them."""
        if self._rollback is not None:
            model, strategy_state = self._rollback
            with self._cv:
                self.model = model
            self.strategy.import_state(strategy_state)

    def _spoiled(self, rs: RoundState, reason: str, culprits: Sequence[str]) -> bool:
        """Fail this attempt because of these clients' updates; the retry runs without
        them, and the round's record names them in its failures."""
        for cid in culprits:
            self.excluded[cid] = f"update refused: {reason}"
        log_event(log, "round_failed", job=self.job_id, round=rs.round, attempt=rs.attempt,
                  reason=reason, excluded=",".join(culprits))
        self.store.record_event("round_attempt_failed",
                                {"round": rs.round, "attempt": rs.attempt, "reason": reason,
                                 "clients": sorted(rs.accepted), "excluded": list(culprits)},
                                job_id=self.job_id)
        round_failed(self.job_id, rs.round, rs.attempt, reason)
        self.last_failure = reason
        return False

    def _release_round_memory(self) -> None:
        """An attempt's garbage goes with it: young reference cycles, and after a large
        model's round the heaps' free pages (its chunk buffers, freed on many threads),
        which would otherwise stay resident into the next round's peak (issue 16).

        A small model's rounds free their pages too, with the periodic full collection
        (0.7-2 ms every GC_FULL_INTERVAL_S): their many small buffers, freed across
        gRPC's and the engine's threads, leave free pages inside the heaps that nothing
        else hands back (a 10-hospital server's heaps held ~45 MB free)."""
        full = collect_round_garbage()
        with self._cv:
            model = self.model
        if full or (model is not None
                    and model.manifest.total_bytes >= TRIM_HEAP_MIN_MODEL_BYTES):
            release_free_heap()

    def _set_phase(self, phase: str, **fields: Any) -> None:
        with self._cv:
            self.phase = phase
        OBSERVED.phase_changed(phase)
        log_event(log, "phase", job=self.job_id, round=self.round, phase=phase, **fields)

    def _select(self, round_no: int, attempt: int) -> list[str] | None:
        self._set_phase("select")
        available = self.registry.wait_for_connected(
            self.cfg.min_clients, self.cfg.wait_for_clients_s, self.stop_event)
        if self.excluded:
            available = [c for c in available if c not in self.excluded]
        if self.stop_event.is_set():
            return None
        if len(available) < self.cfg.min_clients:
            reason = (f"only {len(available)} client(s) connected after"
                      f" {self.cfg.wait_for_clients_s:.0f}s; need {self.cfg.min_clients}")
            log_event(log, "round_not_started", job=self.job_id, round=round_no,
                      attempt=attempt, reason=reason)
            self.store.record_event("round_not_started",
                                    {"round": round_no, "attempt": attempt, "reason": reason},
                                    job_id=self.job_id)
            return None
        return select_clients(available, self.cfg.min_clients, self.cfg.fraction,
                              self.cfg.seed, self.job_id, round_no, attempt)

    def _open_round(self, round_no: int, attempt: int, kind: cpb.TaskKind,
                    clients: list[str],
                    deadline_s: float) -> RoundState:
        model = self.current_model()
        deadline_ms = int((time.time() + deadline_s) * 1000)
        tasks: dict[str, cpb.Task] = {}
        for cid in clients:
            config = cpb.TrainConfig()
            config.CopyFrom(self.train_config)
            config.seed = task_seed(self.cfg.seed, round_no, attempt, cid)
            tasks[cid] = cpb.Task(
                task_id=uuid.uuid4().hex, kind=kind, job_id=self.job_id, round=round_no,
                model_type=self.cfg.model_type, config=config, deadline_unix_ms=deadline_ms,
                model_manifest=model.manifest_for(self.registry.digest_of(cid)))
        rs = RoundState(self.job_id, round_no, attempt, kind, clients, tasks,
                        time.monotonic() + deadline_s)
        if kind == cpb.TRAIN and self.secure is not None:
            self._make_secure(rs, model)
        with self._cv:
            self.current = rs
        for cid, task in tasks.items():
            self.registry.assign(cid, task)
        return rs

    def _wait_round(self, rs: RoundState) -> None:
        with self._cv:
            while rs.outstanding() and not self.stop_event.is_set():
                remaining = rs.deadline - time.monotonic()
                if remaining <= 0:
                    break
                if rs.secagg is not None:
                    rs.secagg.tick()  # closes a key stage that timed out, drops the silent
                self._cv.wait(timeout=min(remaining, 0.5))
            rs.open = False
        for cid in rs.selected:
            self.registry.clear_task(cid, rs.tasks[cid].task_id)
        for callback in self.on_round_closed:
            callback(rs)

    def _make_secure(self, rs: RoundState, model: ModelVersion) -> None:
        """Opens the round's secure aggregation (fresh session: fresh keys on every
        hospital) and puts its parameters in every task; hospitals that miss a key
        stage are failed at once, so the round does not wait for them."""

        def dropped(cid: str, reason: str) -> None:
            with self._cv:
                if cid not in rs.accepted and cid not in rs.failed:
                    rs.failed[cid] = reason
                    self.registry.clear_task(cid, rs.tasks[cid].task_id)
                self._cv.notify_all()

        rs.secagg = self.secure.open_round(
            rs.job_id, rs.round, rs.selected, model.state,
            {c: self.registry.num_examples(c) for c in rs.selected}, dropped)
        config = rs.secagg.config()
        for task in rs.tasks.values():
            task.secagg.CopyFrom(config)
            task.config.update_kind = cpb.DELTA  # the masked vector is of the delta

    def _unmask(self, rs: RoundState, round_no: int, attempt: int) -> bool:
        """Secure round: survivors reveal their shares, the masks come off (once), and
        the strategy receives the sum; a failure costs this attempt only."""
        rs.secagg.close_collect()
        fault_point("unmask", round_no)  # tests only: off unless FL_FAULT_POINT names it
        try:
            rs.secagg.unmask_into(self.strategy, self.stop_event)
        except (SecAggError, StrategyError) as exc:
            reason = f"secure aggregation failed: {exc}"
            log_event(log, "round_failed", job=self.job_id, round=round_no, attempt=attempt,
                      reason=reason)
            self.store.record_event("round_attempt_failed",
                                    {"round": round_no, "attempt": attempt, "reason": reason,
                                     "clients": sorted(rs.accepted)}, job_id=self.job_id)
            round_failed(self.job_id, round_no, attempt, reason)
            self.last_failure = reason
            return False
        return True

    def _run_round(self, round_no: int, attempt: int) -> bool:
        started = time.monotonic()
        selected = self._select(round_no, attempt)
        # Waiting for hospitals to connect is not the round's own time: shown apart.
        wait_s = time.monotonic() - started
        if not selected:
            self.last_failure = "not enough clients connected"
            return False
        model = self.current_model()
        self.strategy.begin_round(model.state, release=model.release)
        self._set_phase("distribute", attempt=attempt, selected=",".join(selected))
        rs = self._open_round(round_no, attempt, cpb.TRAIN, selected, self.cfg.round_deadline_s)
        self._set_phase("train")
        self._wait_round(rs)
        if self.stop_event.is_set():
            return False
        self._set_phase("collect", accepted=len(rs.accepted), failed=len(rs.failed),
                        silent=len(rs.outstanding()))
        for cid in rs.outstanding():
            rs.failed[cid] = "no update before the round deadline"
        required = quorum_required(self.cfg.quorum, len(selected))
        if len(rs.accepted) < required:
            reason = (f"quorum not reached: {len(rs.accepted)} of {len(selected)} updates,"
                      f" need {required}")
            log_event(log, "round_failed", job=self.job_id, round=round_no, attempt=attempt,
                      reason=reason, failed=";".join(f"{k}={v}" for k, v in rs.failed.items()))
            self.store.record_event("round_attempt_failed",
                                    {"round": round_no, "attempt": attempt, "reason": reason,
                                     "failures": rs.failed}, job_id=self.job_id)
            round_failed(self.job_id, round_no, attempt, reason)
            self.last_failure = reason
            if rs.secagg is not None:
                rs.secagg.abort(reason)
            return False
        norms = {cid: u.norm for cid, u in rs.accepted.items()}
        outliers = norm_outliers(norms, self.cfg.update_norm_factor)
        if outliers:
            return self._spoiled(rs, f"update norm above {self.cfg.update_norm_factor:g} x the"
                                 " median of the round's other updates", outliers)
        self._set_phase("aggregate", updates=len(rs.accepted))
        if rs.secagg is not None and not self._unmask(rs, round_no, attempt):
            return False
        try:
            new_state = self.strategy.finish_round()
        except StrategyError as exc:
            # E.g. finite updates whose sum overflows: one client's well-formed but
            # absurd update must cost this attempt (model unchanged), not the whole job;
            # the largest update is the one left out of the retry.
            return self._spoiled(rs, f"aggregation refused: {exc}", largest(norms))
        fault_point("aggregate", round_no)  # tests only: off unless FL_FAULT_POINT names it
        # the checkpoint is written and flushed while the model is hashed and checked
        new_state = {k: v.detach().contiguous() for k, v in new_state.items()}
        pending = self._write_ahead(round_no, new_state)
        try:
            self.set_model(round_no, new_state)
            problem = self._unusable(new_state)
            if problem:
                self._restore()
                return self._spoiled(rs, f"the new model is not usable: {problem}", largest(norms))
            rs.failed.update(self.excluded)
            metrics = self.strategy.train_metrics(
                [(u.num_examples, u.metrics) for u in rs.accepted.values()])
            metrics.update(self.strategy.round_metrics())
            if rs.secagg is not None:
                metrics.update(rs.secagg.summary())
            self._set_phase("evaluate")
            metrics.update(self._evaluate(round_no, attempt, list(rs.accepted)))
            self._set_phase("checkpoint")
            seconds = time.monotonic() - started - wait_s
            model = self.current_model()
            summary = RoundSummary(
                selected=len(selected), reported=len(rs.accepted), failed=len(rs.failed),
                seconds=seconds,
                metrics={**metrics, "attempt": attempt, "wait_seconds": wait_s,
                         "failures": rs.failed,
                         "clients": {cid: self._client_summary(info)
                                     for cid, info in rs.accepted.items()}})
            self.store.complete_round(self.job_id, round_no, summary, model.state,
                                      self.strategy.export_state(), model_sha256=model.sha256,
                                      pending=pending)
            self.read_model_from_checkpoint()
            round_completed(self.job_id, round_no, seconds, len(selected), len(rs.accepted),
                            rs.failed, model.sha256)
            with self._cv:
                self.last_metrics = metrics
            shown: dict[str, Any] = {k: f"{v:.4g}" for k, v in metrics.items()}
            if rs.failed:
                shown["failures"] = "; ".join(f"{k}: {v}" for k, v in sorted(rs.failed.items()))
            log_event(log, "round_summary", job=self.job_id, round=round_no, selected=len(selected),
                      reported=len(rs.accepted), failed=len(rs.failed), seconds=f"{seconds:.2f}",
                      **shown)
        finally:
            if pending is not None:
                pending.discard()  # a round not recorded: its file goes (no-op once installed)
        return True

    def _write_ahead(self, round_no: int, state: Mapping[str, torch.Tensor]
                     ) -> PendingCheckpoint | None:
        """From PARALLEL_HASH_MIN_BYTES the new model's checkpoint is started on a thread
        now (store.PendingCheckpoint), so its write and fsync overlap the model's hashes
        and checks; below, a thread costs more than the write, done in complete_round."""
        size = sum(t.numel() * t.element_size() for t in state.values())
        if size < PARALLEL_HASH_MIN_BYTES:
            return None
        return self.store.write_ahead(self.job_id, round_no, state, self.strategy.export_state())

    @staticmethod
    def _client_summary(update: AcceptedUpdate) -> dict[str, Any]:
        out: dict[str, Any] = {"num_examples": update.num_examples}
        for key in ("train_loss", "epsilon_round", "epsilon_total"):
            if key in update.metrics:
                out[key] = update.metrics[key]
        if update.report is not None:
            out["epsilon_round"] = update.report.epsilon_round
            out["epsilon_total"] = update.report.epsilon_total
        if "dp_enabled" in update.metrics:
            out["dp_enabled"] = bool(update.metrics["dp_enabled"])
        return out

    def _unusable(self, state: Mapping[str, torch.Tensor]) -> str:
        """Why the new global model cannot be used ("" when it can): the server's own
        evaluation (--eval_data) must run and give a finite loss. A finite model can
        still be absurd (one update of 1e30 with FedAvg): its logits overflow and
        scikit-learn raises on the NaN probabilities."""
        self._server_eval = {}
        factor = self.cfg.update_norm_factor
        if factor > 0 and self._rollback is not None:
            # a round moves the model by a fraction of its size; a step larger than
            # `factor` times the whole model (at least 1) is no training result
            old = self._rollback[0]
            step, size = step_and_size(state, old.state, old.release)
            self.current_model().norm = size  # set_model made it of `state`
            base = max(1.0, old.measured_norm())
            if not math.isfinite(step) or step > factor * base:
                return (f"the round moved the model by {step:.3g}, more than"
                        f" {factor:g} x its norm ({base:.3g})")
        if self.eval_dataset is None:
            return ""
        try:
            model = self.task.build_model()
            model.load_state_dict(state)
            figures = {f"eval_{k}": float(v)
                       for k, v in self.task.evaluate(model, self.eval_dataset).items()}
        except Exception as exc:  # noqa: BLE001 - any failure means the model is unusable
            return f"server evaluation failed: {type(exc).__name__}: {exc}"[:300]
        loss = figures.get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            return f"server evaluation loss is {loss}"
        self._server_eval = figures
        return ""

    def _evaluate(self, round_no: int, attempt: int, clients: list[str]) -> dict[str, float]:
        metrics: dict[str, float] = dict(self._server_eval)
        if self.cfg.fed_eval and clients:
            connected = set(self.registry.connected())
            targets = [c for c in clients if c in connected]
            if targets:
                rs = self._open_round(round_no, attempt, cpb.EVALUATE, targets,
                                      self.cfg.eval_deadline_s)
                self._wait_round(rs)
                # weighted by test examples, per metric: a client may lack one (e.g. no
                # AUROC on a one-class test split) without dragging the others down
                averaged = weighted_metrics(
                    [(e.num_examples, e.metrics) for e in rs.evaluations.values()],
                    equal=False)
                for key, value in averaged.items():
                    metrics[f"fed_{key}"] = value
                metrics["fed_eval_clients"] = float(len(rs.evaluations))
        return metrics

    def _broadcast_stop(self) -> None:
        if self.job_state == "completed":  # its hospitals fetch the final model (final_model.py)
            model = self.current_model()
            self.final.open(self.job_id, model.version, model,
                            lambda cid: model.manifest_for(self.registry.digest_of(cid)),
                            participants(self.store, self.job_id))
        self.registry.broadcast(lambda cid: self.final.stop_task(cid, self.job_id, self.round))

    def shutdown(self) -> None:
        self.stop_event.set()
        with self._cv:
            self._cv.notify_all()

    def status_fields(self) -> dict[str, Any]:
        with self._cv:
            return {"round": self.round, "phase": self.phase, "job_state": self.job_state,
                    "last_metrics": dict(self.last_metrics),
                    "model_sha256": self.model.sha256 if self.model else ""}


# --- a round's arithmetic, as plain functions (the simulator, fl_sim, calls them too) ---
def hash_model(plain: Mapping[str, torch.Tensor]) -> tuple[tpb.TensorManifest, str]:
    """A new model's transfer manifest (FAST_DIGEST) and record hash (SHA-256). From
    PARALLEL_HASH_MIN_BYTES the SHA-256, one sequential hash, runs on a thread of its
    own while the manifest's digests are taken on the hashing pool (both release the
    GIL): on 100 MB the two one after the other were 91-115 ms of the round's critical
    path, together 0.85-0.91 of that on 2 cores (bench.model_hash)."""
    size = sum(t.numel() * t.element_size() for t in plain.values())
    if size < PARALLEL_HASH_MIN_BYTES:
        return build_manifest(plain, digest=FAST_DIGEST), state_sha256(plain)
    with ThreadPoolExecutor(1, thread_name_prefix="model-sha256") as hasher:
        hashed = hasher.submit(state_sha256, plain)
        manifest = build_manifest(plain, digest=FAST_DIGEST)
        return manifest, hashed.result()


def select_clients(available: Sequence[str], min_clients: int, fraction: float, seed: int,
                   job_id: str, round_no: int, attempt: int) -> list[str]:
    """The clients a round trains: ``max(min_clients, ceil(fraction x available))`` of
    them, drawn by an RNG seeded from (seed, job, round, attempt) so a rerun with the
    same seed selects the same clients, and a retried attempt draws afresh."""
    wanted = max(min_clients, math.ceil(fraction * len(available)))
    rng = random.Random(f"{seed}:{job_id}:{round_no}:{attempt}")
    return sorted(rng.sample(list(available), min(wanted, len(available))))


def task_seed(seed: int, round_no: int, attempt: int, client_id: str) -> int:
    """TrainConfig.seed of one client's task: distinct per client, round and attempt,
    reproducible from the job's seed (it seeds init only, never DP noise)."""
    return (seed * 1_000_003 + round_no * 1009 + attempt
            + zlib.crc32(client_id.encode()) % 997) & 0xFFFFFFFF


def step_and_size(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor],
                  release_old: Callable[[str], None] | None = None) -> tuple[float, float]:
    """L2 norms of new - old and of new, over the floating tensors, in one pass.

    The difference is taken NORM_CHUNK_ELEMS elements at a time into one scratch buffer
    in the accumulation dtype: a whole tensor's difference was a fresh 16 MiB mapping
    per tensor, faulted in page by page and handed back, and measuring the new model's
    norm in the same pass spares the next round a pass over it (issue 16 item 3). Each
    chunk's norms are float32 (float64 tensors: float64), summed in float64; a chunk
    that overflows float32 is measured again in float64."""
    step = size = 0.0
    scratch: dict[torch.dtype, torch.Tensor] = {}
    for name, t in new.items():
        if not t.is_floating_point():
            continue
        dtype = accumulation_dtype(t.dtype)
        a, b = t.reshape(-1), old[name].reshape(-1)
        buffer = scratch.get(dtype)
        if buffer is None or buffer.numel() < min(a.numel(), NORM_CHUNK_ELEMS):
            buffer = scratch[dtype] = torch.empty(min(a.numel(), NORM_CHUNK_ELEMS), dtype=dtype)
        for start in range(0, a.numel(), NORM_CHUNK_ELEMS):
            x, y = a[start:start + NORM_CHUNK_ELEMS], b[start:start + NORM_CHUNK_ELEMS]
            diff = buffer[:x.numel()]
            if x.dtype == dtype and y.dtype == dtype:
                torch.sub(x, y, out=diff)
            else:  # narrower sides are subtracted in the accumulation dtype
                diff.copy_(x).sub_(y)
            part = float(torch.linalg.vector_norm(diff))
            if not math.isfinite(part):  # the difference itself overflowed
                part = float(torch.linalg.vector_norm(x.double() - y.double()))
            step += part * part
            part = tensor_norm(x)
            size += part * part
        if release_old is not None:
            release_old(name)
    return math.sqrt(step), math.sqrt(size)


def norm_outliers(norms: Mapping[str, float], factor: float) -> list[str]:
    """Clients whose update norm is above `factor` x the median norm of the round's
    other updates (0 turns the bound off; a round of one update has nothing to compare
    with). Relative, so it needs no knowledge of the model's scale."""
    if factor <= 0 or len(norms) < 2:
        return []
    out = []
    for cid, norm in norms.items():
        others = sorted(v for c, v in norms.items() if c != cid)
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        if median > 0 and (not math.isfinite(norm) or norm > factor * median):
            out.append(cid)
    return sorted(out)


def largest(norms: Mapping[str, float]) -> list[str]:
    """The client with the largest update: the one left out when the aggregate of a
    round is unusable and no update broke the norm bound on its own."""
    return [max(norms, key=lambda c: (norms[c], c))] if norms else []


def quorum_required(quorum: float, selected: int) -> int:
    """Updates a round needs to close: ceil(quorum x selected), at least one."""
    return max(1, math.ceil(quorum * selected))
