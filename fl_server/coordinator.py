"""Coordinator service: Join, the pushed task feed, Report and the operator's Status.

Authentication already happened in the interceptor; here the identity on the
context (from the certificate, never from a request field) decides what a caller
may see and do.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc

from fl_core.constants import DOWNLOAD_CHUNK_BYTES, HEARTBEAT_INTERVAL_S, ROLE_CLIENT
from fl_core.errors import Refusal, abort
from fl_core.logs import log_event
from fl_core.sealing import SealError, generate_keypair, session_secret
from fl_core.tensor_codec import EXTRA_DIGESTS, preferred_digest
from fl_models.registry import TASK_NAMES
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from fl_server import audit
from fl_server.aggregator import abort_refusal
from fl_server.auth import identity_of
from fl_server.clients import ClientRegistry, SessionConflict
from fl_server.idle import Idle
from fl_server.jobs import JobError, JobManager, job_info, model_file_bytes
from fl_server.metrics import fill_status
from fl_server.model_stream import with_model
from fl_server.rounds import RoundEngine, RoundRefusal
from fl_server.secagg_round import SecAggServicer
from fl_server.store import Job, Report, RoundRecord, Store, state_sha256
from fl_server.tokens import AuthError, RevocationList, TokenService
from fl_server.validation import MAX_EPSILON, check_join, check_report

log = logging.getLogger("fl_server.coordinator")


class CoordinatorService(SecAggServicer, cpb_grpc.CoordinatorServicer):
    def __init__(self, engine: RoundEngine, registry: ClientRegistry, store: Store,
                 tokens: TokenService, heartbeat_s: float = HEARTBEAT_INTERVAL_S,
                 revocations: RevocationList | None = None,
                 jobs: JobManager | None = None, any_study: bool = False) -> None:
        self.engine = engine
        self.jobs = jobs
        # a server started without a job of its own (--no_job) takes hospitals of any
        # study, for the jobs still to be submitted; one started with its job refuses a
        # hospital none of whose studies a running or queued job trains (a typo'd
        # --model_type must fail at once, not wait forever)
        self.any_study = any_study
        self.registry = registry
        self.store = store
        self.tokens = tokens
        self.heartbeat_s = heartbeat_s
        self.revocations = revocations

    def Join(self, request: cpb.JoinRequest, context: grpc.ServicerContext) -> cpb.JoinReply:
        ident = identity_of(context)
        if ident.role != ROLE_CLIENT:
            abort(context, grpc.StatusCode.PERMISSION_DENIED,
                  f"only hospital (client) certificates can join; this one has role {ident.role}")
        job_types = self._job_model_types()
        studies = {s.model_type: int(s.num_examples) for s in request.studies} or {
            request.model_type: int(request.num_examples)}
        unknown = sorted(set(studies) - set(TASK_NAMES))
        if unknown:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"unknown model type(s) {', '.join(repr(t[:64]) for t in unknown)}; this"
                  f" server knows {', '.join(TASK_NAMES)}", "BAD_VALUE", "model_type")
        if not self.any_study and job_types and not set(studies) & set(job_types):
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"this server trains {', '.join(repr(t) for t in job_types)}; the client"
                  f" has {', '.join(repr(t) for t in sorted(studies))} data")
        problem = check_join(request)
        if problem:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem, "BAD_VALUE")
        private_key, public_bytes = generate_keypair()
        session_id = _new_session_id()
        try:
            secret = session_secret(private_key, bytes(request.x25519_public_key), session_id)
        except SealError as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"key agreement failed: {exc}",
                  exc.code)
        budget = request.epsilon_budget
        if not (math.isfinite(budget) and 0.0 <= budget <= MAX_EPSILON):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"epsilon_budget {budget!r} is not in [0, {MAX_EPSILON:g}]",
                  Refusal.BAD_VALUE, "epsilon_budget")
        try:
            self.registry.new_session(ident.client_id, secret, int(request.num_examples),
                                      session_id=session_id,
                                      previous_session_id=request.previous_session_id,
                                      replace=request.replace_session, epsilon_budget=budget,
                                      studies=studies, digest=preferred_digest(request.digests))
        except SessionConflict as exc:
            log_event(log, "join_refused", logging.WARNING, client=ident.client_id,
                      peer=context.peer(), live_peer=exc.peer, reason="identity already live")
            abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc), Refusal.SESSION_ACTIVE)
        if request.replace_session:
            log_event(log, "session_replaced", logging.WARNING, client=ident.client_id,
                      peer=context.peer())
        token, expires = self.tokens.issue(ident.client_id, ident.role, ident.cert_sha256,
                                           session_id)
        self.store.upsert_client(ident.client_id, num_examples=int(request.num_examples))
        log_event(log, "client_joined", client=ident.client_id, session=session_id[:8],
                  examples=request.num_examples,
                  studies=",".join(f"{k}:{v}" for k, v in sorted(studies.items())))
        audit.joined(ident.client_id, session_id, int(request.num_examples), ident.cert_sha256)
        return cpb.JoinReply(session_id=session_id, token=token, token_expires_unix=expires,
                             server_x25519_public_key=public_bytes, job_id=self.engine.job_id,
                             model_type=self.engine.cfg.model_type, client_id=ident.client_id,
                             job_model_types=job_types, digests=EXTRA_DIGESTS)

    def _job_model_types(self) -> list[str]:
        """The running job's model type first, then the queued jobs' (no repeats)."""
        found = [self.engine.cfg.model_type] if self.engine.job_id else []
        if self.jobs is not None:
            found += [j.model_type for j in self.jobs.queue()]
        return list(dict.fromkeys(t for t in found if t))

    def Tasks(self, request: cpb.TaskStreamRequest,
              context: grpc.ServicerContext) -> Iterator[cpb.Task | Idle]:
        ident = identity_of(context)
        if request.session_id != ident.session_id:
            # A session id is the token's; a stream opened naming another session (a
            # stale one, or someone else's) is a client bug or a probe, never served.
            abort(context, grpc.StatusCode.PERMISSION_DENIED,
                  f"task stream refused: session_id {request.session_id[:64]!r} is not the"
                  " session of this call's token (send the session_id Join returned with it)",
                  "SESSION_MISMATCH", "session_id")
        log_event(log, "task_stream_open", client=ident.client_id)
        # Wake the stream the moment the call ends (client gone, cancelled), so the
        # client stops counting as connected at once, not at the stream's next poll:
        # a round starting in between would select it and wait its deadline for it.
        client_id = ident.client_id
        context.add_callback(lambda: self.registry.wake_client(client_id))
        revocations = self.revocations

        def still_allowed() -> bool:
            """The call is alive and its certificate not revoked since it began: the
            interceptor checks each call once, at its start, and this call may last
            for days; a revoked hospital's stream ends within a second (the server
            wakes every stream when the revocation list changes: watch_revocations)."""
            if not context.is_active():
                return False
            try:
                return revocations is None or not revocations.is_revoked(ident.serial)
            except AuthError:
                return False  # an unusable revocation list fails closed

        try:
            for item in self.registry.task_stream(ident.client_id, self.heartbeat_s,
                                                  still_allowed, peer=context.peer()):
                if isinstance(item, cpb.Task) and item.kind in (cpb.TRAIN, cpb.EVALUATE):
                    item = with_model(item, self.engine, client_id,
                                      self.registry.session(client_id, ident.session_id))
                yield item
        finally:
            log_event(log, "task_stream_closed", client=ident.client_id)

    def Report(self, request: cpb.ReportRequest,
               context: grpc.ServicerContext) -> cpb.ReportReply:
        ident = identity_of(context)
        # Everything checked before the engine sees it: a refused report changes nothing
        # (the client is not marked failed, no row is stored).
        problem = check_report(request, self.registry.num_examples(ident.client_id))
        if problem:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"report refused: {problem}",
                  "BAD_VALUE")
        try:
            _, task = self.engine.task_of(ident.client_id, request.task_id)
            if request.kind != task.kind:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"report refused: kind {cpb.TaskKind.Name(request.kind)} is not the"
                      f" task's {cpb.TaskKind.Name(task.kind)}", "BAD_VALUE")
            self.engine.report(ident.client_id, request)
        except RoundRefusal as refusal:
            abort_refusal(context, refusal)
        status = cpb.ReportStatus.Name(request.status)
        self.registry.note_report(ident.client_id, status,
                                  request.epsilon_total if request.dp_enabled else None,
                                  reason=request.reason)
        self.store.record_report(Report(
            job_id=request.job_id, round=request.round, client_id=ident.client_id,
            task_id=request.task_id, kind=cpb.TaskKind.Name(request.kind), status=status,
            reason=request.reason, metrics=dict(request.metrics),
            num_examples=int(request.num_examples), epsilon_round=request.epsilon_round,
            epsilon_total=request.epsilon_total))
        log_event(log, "report", client=ident.client_id, round=request.round,
                  kind=cpb.TaskKind.Name(request.kind), status=status,
                  reason=request.reason[:200], epsilon_total=f"{request.epsilon_total:.3f}")
        return cpb.ReportReply(accepted=True)

    def Status(self, request: cpb.StatusRequest,
               context: grpc.ServicerContext) -> cpb.StatusReply:
        ident = identity_of(context)
        audit.admin_call(ident.client_id, "Status", ident.cert_sha256)
        if request.job_id and request.job_id != self.engine.job_id:
            job = self.store.get_job(request.job_id)
            if job is None:
                abort(context, grpc.StatusCode.NOT_FOUND,
                      f"no job {request.job_id[:128]!r} on this server (fl-admin list)",
                      "UNKNOWN_JOB", "job_id")
            reply = build_job_status(job, self.registry, self.store, request.rounds_after)
        else:
            reply = build_status(self.engine, self.registry, self.store, request.rounds_after)
        if self.jobs is not None:
            queue = self.jobs.queue()
            reply.queue.extend(job_info(self.store, j, queue) for j in queue)
        return reply

    # --- jobs at runtime (admin certificate) -----------------------------------------
    def SubmitJob(self, request: cpb.SubmitJobRequest,
                  context: grpc.ServicerContext) -> cpb.JobInfo:
        ident = identity_of(context)
        audit.admin_call(ident.client_id, "SubmitJob", ident.cert_sha256)
        jobs = self._jobs(context)
        try:
            job = jobs.submit(request.job_toml, ident.client_id)
        except JobError as exc:
            abort(context, getattr(grpc.StatusCode, exc.code), str(exc), "BAD_JOB")
        # The job may have started since `submit` returned: the queue first, then the job's
        # state as it is now, so the reply never shows a started job as queued
        queue = jobs.queue()
        job = self.store.get_job(job.job_id) or job
        return job_info(self.store, job, queue)

    def ListJobs(self, request: cpb.ListJobsRequest,
                 context: grpc.ServicerContext) -> cpb.ListJobsReply:
        ident = identity_of(context)
        audit.admin_call(ident.client_id, "ListJobs", ident.cert_sha256)
        queue = self.store.jobs(("queued",))
        return cpb.ListJobsReply(jobs=[job_info(self.store, j, queue)
                                       for j in self.store.jobs()])

    def AbortJob(self, request: cpb.JobRequest, context: grpc.ServicerContext) -> cpb.JobInfo:
        ident = identity_of(context)
        audit.admin_call(ident.client_id, "AbortJob", ident.cert_sha256)
        try:
            job = self._jobs(context).abort(request.job_id, request.reason[:500],
                                            ident.client_id)
        except JobError as exc:
            abort(context, getattr(grpc.StatusCode, exc.code), str(exc), "BAD_JOB", "job_id")
        return job_info(self.store, job)

    def DownloadModel(self, request: cpb.JobRequest,
                      context: grpc.ServicerContext) -> Iterator[cpb.ModelBytes]:
        ident = identity_of(context)
        job = self.store.get_job(request.job_id)
        if job is None:
            abort(context, grpc.StatusCode.NOT_FOUND,
                  f"no job {request.job_id[:128]!r} on this server (fl-admin list)",
                  "UNKNOWN_JOB", "job_id")
        if job.state != "completed":
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"job {job.job_id} is {job.state}: a final model exists once it has"
                  " completed", "JOB_NOT_COMPLETED", "job_id")
        last = self.store.last_completed_round(job.job_id)
        state, _ = self.store.load_checkpoint(job.job_id, last)
        data = model_file_bytes(state)
        sha = state_sha256(state)
        file_sha = hashlib.sha256(data).hexdigest()
        audit.job_event("model_downloaded", job.job_id,
                        f"final model of job {job.job_id} downloaded by {ident.client_id}",
                        by=ident.client_id, model_sha256=sha)
        for offset in range(0, max(1, len(data)), DOWNLOAD_CHUNK_BYTES):
            yield cpb.ModelBytes(data=data[offset:offset + DOWNLOAD_CHUNK_BYTES],
                                 offset=offset, total_bytes=len(data), sha256=sha,
                                 file_sha256=file_sha, round=last)

    def _jobs(self, context: grpc.ServicerContext) -> JobManager:
        if self.jobs is None:
            abort(context, grpc.StatusCode.UNIMPLEMENTED, "this server takes no jobs at runtime")
        assert self.jobs is not None
        return self.jobs


def build_job_status(job: Job, registry: ClientRegistry, store: Store,
                     rounds_after: int = 0) -> cpb.StatusReply:
    """Status of a job that is not the one being served (queued or ended): from the store."""
    reply = cpb.StatusReply(job_id=job.job_id, model_type=job.model_type,
                            strategy=job.strategy, round=store.last_completed_round(job.job_id),
                            total_rounds=job.total_rounds, phase=job.state,
                            job_state=job.state, now_unix_ms=int(time.time() * 1000),
                            model_sha256=store.last_model_sha256(job.job_id))
    _add_clients(reply, registry)
    _add_rounds(reply, store.rounds(job.job_id, rounds_after))
    return reply


def build_status(engine: RoundEngine, registry: ClientRegistry, store: Store,
                 rounds_after: int = 0) -> cpb.StatusReply:
    fields: dict[str, Any] = engine.status_fields()
    reply = cpb.StatusReply(
        job_id=engine.job_id, model_type=engine.cfg.model_type, strategy=engine.cfg.strategy,
        round=fields["round"], total_rounds=engine.cfg.rounds, phase=fields["phase"],
        job_state=fields["job_state"], model_sha256=fields["model_sha256"])
    _add_clients(reply, registry)
    rows = store.rounds(engine.job_id, rounds_after)
    _add_rounds(reply, rows)
    fill_status(reply, engine, rows)
    return reply


def _add_clients(reply: cpb.StatusReply, registry: ClientRegistry) -> None:
    connected = set(registry.connected())
    for entry in sorted(registry.entries(), key=lambda e: e.client_id):
        reply.clients.add(client_id=entry.client_id, connected=entry.client_id in connected,
                          last_seen_unix_ms=int(entry.last_seen * 1000),
                          num_examples=entry.num_examples, epsilon_total=entry.epsilon_total,
                          last_report_status=entry.last_status,
                          last_report_reason=entry.last_reason,
                          epsilon_budget=entry.epsilon_budget,
                          epsilon_budget_left=(max(0.0, entry.epsilon_budget
                                                   - entry.epsilon_total)
                                               if entry.epsilon_budget else 0.0))


def _add_rounds(reply: cpb.StatusReply, rows: list[RoundRecord]) -> None:
    for row in rows:
        summary = reply.rounds.add(
            round=row.round, state=row.state, selected=row.selected, reported=row.reported,
            failed=row.failed, seconds=row.seconds, model_sha256=row.model_sha256 or "",
            wait_seconds=float(row.metrics.get("wait_seconds", 0.0)))
        summary.secure = bool(row.metrics.get("secure", 0))  # SecAgg+: the server saw the sum
        summary.secagg_dropped = int(row.metrics.get("secagg_dropped", 0))
        summary.secagg_threshold = int(row.metrics.get("secagg_threshold", 0))
        for key, value in row.metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                summary.metrics[key] = float(value)


def _new_session_id() -> str:
    return uuid.uuid4().hex
