"""The hospital's client daemon:

    python -m fl_client.client --client_id hospital_1 --server_url HOST:PORT \
        --data_path /path/to/local/data --model_type pneumonia

Joins over mTLS with the hospital's own key, keeps the task stream open, and for
each pushed task fetches the sealed global model, trains it locally with Opacus
(or evaluates it) and streams the update back sealed. It reconnects by itself
(exponential backoff with jitter) and so survives a server restart; its privacy
ledger survives its own.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from fl_client.config import add_config_flag, parse_args
from fl_client.connection import ServerConnection, TransferError, backoff_delays
from fl_client.identity import load_client_tls
from fl_client.metrics import add_metrics_flags, watch_client
from fl_client.model_store import has_model, model_sha256, save_final_model
from fl_client.privacy_ledger import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
)
from fl_client.progress import Progress
from fl_client.secagg_client import SecureRound
from fl_client.site_data import class_counts, describe
from fl_client.studies import JobPolicy, Study, check_job, flag_policy
from fl_client.task_policy import (
    EvaluationPolicy,
    LocalPolicy,
    TaskRefused,
    check_global_model,
    model_id,
    noisy_accuracy,
    round_metrics,
    training_config,
)
from fl_core.constants import (
    EPSILON_WARN_PER_JOB,
    JOB_IDLE_POLL_S,
    RECONNECT_BASE_S,
    RECONNECT_MAX_S,
    SESSION_CONFLICT_ATTEMPTS,
    SESSION_CONFLICT_RETRY_S,
    TRAINING_DEVICES,
)
from fl_core.logs import add_log_file_flags, log_event, setup_logging_from_args
from fl_core.secagg import SecAggError
from fl_core.statelock import StateLock, StateLockError
from fl_core.tensor_codec import digest_name
from fl_core.tls import parse_server_url, target
from fl_core.tls_diagnosis import Cause, TrustFailures, client_tls_files, explain
from fl_models.training import device_name, training_device
from fl_proto import coordinator_pb2 as cpb

log = logging.getLogger("fl_client.client")

DEFAULT_EPSILON_BUDGET = 10.0
STOPPED_REASON = "stopped by the operator"
ABORTED_REASON = "the job was stopped by the server (aborted by its operator)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-client",
        description="Federated learning client daemon for one hospital: trains the shared"
                    " model on local data with differential privacy; only sealed model"
                    " updates and metrics leave the site.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--client_id", required=True,
                   help="this hospital's name; must equal the CN of its certificate")
    p.add_argument("--server_url", required=True,
                   help="server address: host:port, grpcs://host:port or https://host[:port]"
                        " (always TLS)")
    p.add_argument("--data_path", type=Path, default=None,
                   help="folder with this hospital's data in a format the task loads (or"
                        " [studies.<model_type>] tables in --config for several studies)")
    p.add_argument("--model_type", default=None,
                   help="breast_cancer, ecg, glaucoma, pneumonia or symptom (or"
                        " [studies.<model_type>] tables in --config)")
    p.add_argument("--keys_dir", type=Path, default=Path("keys"),
                   help="folder with <client_id>.key, <client_id>.crt and ca.crt")
    p.add_argument("--state_dir", type=Path, default=None,
                   help="folder for the privacy ledger (default: client_state/<client_id>)")
    p.add_argument("--device", default="cpu", choices=TRAINING_DEVICES,
                   help="where to train; auto picks cuda when available")
    p.add_argument("--target_epsilon", type=float, default=0.0,
                   help="epsilon per round; overrides the server's setting when set")
    p.add_argument("--noise_multiplier", type=float, default=0.0,
                   help="DP noise multiplier; overrides the server's setting when set")
    p.add_argument("--delta", type=float, default=0.0,
                   help="DP delta this hospital accounts at (0: the task's default); it is"
                        " used whatever delta the server asks for")
    p.add_argument("--max_grad_norm", type=float, default=0.0,
                   help="per-sample clipping bound (0: the server's)")
    p.add_argument("--epsilon_budget", type=float, default=DEFAULT_EPSILON_BUDGET,
                   help="total epsilon this hospital will ever spend; tasks that would"
                        " exceed it are refused")
    p.add_argument("--accountant", default=DEFAULT_ACCOUNTANT, choices=sorted(ACCOUNTANTS),
                   help="how the privacy ledger composes epsilon: prv (Opacus's PRV"
                        " accountant, the tightest) or rdp (Renyi DP, looser, the classic"
                        " figure); each entry records which, and a change re-reads the whole"
                        " history with the new one")
    p.add_argument("--eval_noise_multiplier", type=float, default=0.0,
                   help="answer evaluations with accuracy only, plus Gaussian noise of this"
                        " multiplier (charged to the privacy ledger); 0: exact metrics,"
                        " rounded")
    p.add_argument("--allow_no_dp", action="store_true",
                   help="permit training WITHOUT differential privacy when the server asks")
    p.add_argument("--server_name", default=None,
                   help="name to check in the server certificate when it differs from the"
                        " URL's host")
    p.add_argument("--replace_session", action="store_true",
                   help="take over from another daemon connected with this identity (by"
                        " default a second daemon is refused and exits)")
    p.add_argument("--keep_running", action="store_true",
                   help="stay connected after the job ends, waiting for the next one")
    # the one-study job policy (a [studies.X] table in --config holds the same keys)
    p.add_argument("--accept_strategy", action="append", default=None, metavar="NAME",
                   help="take part only in jobs aggregated with this strategy (repeatable;"
                        " default: any)")
    p.add_argument("--max_epsilon_per_job", type=float, default=0.0,
                   help="refuse a job that would cost this hospital more epsilon than this"
                        " (0: only --epsilon_budget limits)")
    p.add_argument("--require_secure_aggregation", action="store_true",
                   help="refuse a job whose rounds are not securely aggregated")
    p.add_argument("--allowed_job", action="append", default=None, metavar="ID_OR_SHA256",
                   help="take part only in these jobs (job ids or job-file SHA-256s;"
                        " repeatable; default: any)")
    p.add_argument("--max_reconnect_s", type=float, default=0.0,
                   help="give up after this many seconds without a server (0: never)")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    add_metrics_flags(p)
    add_log_file_flags(p)
    add_config_flag(p)
    return p


def study_settings(args: argparse.Namespace) -> dict[str, tuple[Path, JobPolicy]]:
    """The studies to serve: the config's [studies.X] tables, or the one study of
    --model_type/--data_path with the policy flags."""
    studies: dict[str, tuple[Path, JobPolicy]] = dict(getattr(args, "studies", None) or {})
    if args.model_type or args.data_path:
        if not (args.model_type and args.data_path):
            raise ValueError("--model_type and --data_path go together (or list"
                             " [studies.<model_type>] tables in --config)")
        studies[args.model_type] = (args.data_path, flag_policy(
            args.accept_strategy, args.max_epsilon_per_job, args.require_secure_aggregation,
            args.allowed_job))
    if not studies:
        raise ValueError("no study to serve: give --model_type and --data_path, or"
                         " [studies.<model_type>] tables with data_path in --config")
    return studies


class ClientDaemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client_id: str = args.client_id
        settings = study_settings(args)
        self.device = training_device(args.device)
        self.device_name = device_name(self.device)
        state_dir = args.state_dir or Path("client_state") / self.client_id
        # One daemon per state folder (two would charge the privacy ledger twice),
        # checked first so a second daemon fails before it reads any data.
        self.state_lock = StateLock(state_dir, "fl-client").acquire()
        self.state_dir = state_dir
        self.studies = {mt: load_study(mt, path, policy) for mt, (path, policy)
                        in settings.items()}
        first = next(iter(self.studies.values()))
        # the first study's, for callers that know one study (tests)
        self.train_set, self.reference = first.train_set, first.reference
        host, port = parse_server_url(args.server_url)
        ca, cert, key = load_client_tls(args.keys_dir, self.client_id)
        self.tls = (ca, cert, key)  # secure aggregation signs key adverts with this key
        self.conn = ServerConnection(target(host, port), ca, cert, key, self.client_id,
                                     first.model_type, len(first.train_set),
                                     server_name=args.server_name,
                                     replace_session=args.replace_session,
                                     epsilon_budget=args.epsilon_budget)
        self.conn.studies = {mt: len(st.train_set) for mt, st in self.studies.items()}
        self.trust = TrustFailures(host, port, client_tls_files(args.keys_dir, self.client_id),
                                   args.server_name)
        self.session_conflicts = 0
        self.ended_jobs: set[str] = set()
        if args.epsilon_budget > EPSILON_WARN_PER_JOB:
            log_event(log, "privacy_warning", logging.WARNING,
                      epsilon_budget=args.epsilon_budget,
                      note=f"a budget above {EPSILON_WARN_PER_JOB:g} gives this hospital's"
                           " patients little privacy")
        # one ledger for every study: the budget is the hospital's, whatever the study
        self.ledger = PrivacyLedger(state_dir, self.client_id, args.epsilon_budget,
                                    args.delta or min(st.task.hyperparams.delta
                                                      for st in self.studies.values()),
                                    accountant=args.accountant)
        self.policy = LocalPolicy(delta=self.ledger.delta, target_epsilon=args.target_epsilon,
                                  noise_multiplier=args.noise_multiplier,
                                  max_grad_norm=args.max_grad_norm,
                                  allow_no_dp=args.allow_no_dp)
        self.evaluations = EvaluationPolicy()
        self.stop = threading.Event()
        # set by a stop request, or by the STOP of the job whose task is running (an
        # operator's abort): training checks it between batches
        self.task_stop = threading.Event()
        self.working_on = ""  # the job of the task being handled
        self.watch = watch_client(self)
        self._call: Any = None
        self.tasks_done = 0

    # main loop ----------------------------------------------------------------------
    def run(self) -> int:
        delays = backoff_delays(RECONNECT_BASE_S, RECONNECT_MAX_S)
        offline_since: float | None = None
        while not self.stop.is_set():
            try:
                self.conn.connect()
                self.conn.join()
                offline_since = None
                self.trust.reset()
                self.session_conflicts = 0
                delays = backoff_delays(RECONNECT_BASE_S, RECONNECT_MAX_S)
                log_event(log, "connected", client=self.client_id, server=self.conn.target,
                          epsilon_spent=f"{self.ledger.spent():.3f}",
                          epsilon_budget=self.args.epsilon_budget,
                          studies=",".join(self.studies), device=self.device_name,
                          server_jobs=",".join(self.conn.job_model_types) or "none")
                if self._nothing_to_serve():
                    return 3
                if self._serve_tasks():
                    return 0
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details()
                if self.stop.is_set():
                    break
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    self.session_conflicts += 1
                    if self.session_conflicts >= SESSION_CONFLICT_ATTEMPTS:
                        print(f"fl-client: error: {details}", file=sys.stderr)
                        return 6
                    log_event(log, "identity_in_use", attempt=self.session_conflicts,
                              of=SESSION_CONFLICT_ATTEMPTS, details=(details or "")[:300])
                    self.stop.wait(SESSION_CONFLICT_RETRY_S)
                    continue
                if code in (grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.FAILED_PRECONDITION) or (
                        code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (details or "")):
                    print(f"fl-client: error: the server refused this client: {code.name}:"
                          f" {details}{self._refusal_fix(details)}", file=sys.stderr)
                    return 3
                if code == grpc.StatusCode.UNAVAILABLE and self._untrusted(details):
                    return 5
                log_event(log, "disconnected", code=code.name, details=(details or "")[:200])
            except TransferError as exc:
                log_event(log, "transfer_failed", reason=str(exc)[:300])
            if self._idle_after_job():
                continue
            offline_since = offline_since or time.monotonic()
            if self.args.max_reconnect_s and \
                    time.monotonic() - offline_since > self.args.max_reconnect_s:
                print(f"fl-client: error: no server at {self.conn.target} for"
                      f" {self.args.max_reconnect_s:.0f}s; giving up", file=sys.stderr)
                return 4
            delay = next(delays)
            log_event(log, "reconnecting", in_s=f"{delay:.2f}")
            self.stop.wait(delay)
        log_event(log, "stopped", client=self.client_id, tasks_done=self.tasks_done)
        return 0

    def _nothing_to_serve(self) -> bool:
        """A daemon started for one job (no --keep_running) whose server runs and queues
        only other studies would wait forever: the same error a typo in --model_type
        always gave. A daemon kept running waits for a job it serves instead."""
        server_types = set(self.conn.job_model_types)
        if self.args.keep_running or not server_types or server_types & set(self.studies):
            return False
        print(f"fl-client: error: the server refused this client: FAILED_PRECONDITION: this"
              f" server trains {', '.join(repr(t) for t in self.conn.job_model_types)}; the"
              f" client has {', '.join(repr(t) for t in self.studies)} data (or run with"
              " --keep_running to wait for a job it serves)", file=sys.stderr)
        return True

    def _idle_after_job(self) -> bool:
        """With --keep_running, after a job ended the server ends each task stream with the
        same STOP: wait JOB_IDLE_POLL_S before asking again instead of re-joining at
        once (a loop of joins, each one audited), and do not count it as an outage."""
        if not (self.args.keep_running and self.ended_jobs):
            return False
        log_event(log, "waiting_for_next_job", in_s=f"{JOB_IDLE_POLL_S:g}",
                  ended=",".join(sorted(self.ended_jobs)))
        self.stop.wait(JOB_IDLE_POLL_S)
        return True

    def _untrusted(self, details: str | None) -> bool:
        """True once a trust failure (not an outage) has repeated TRUST_FAILURE_ATTEMPTS
        times: the message names the cause and the file to fix."""
        found = self.trust.check(details)
        if found is None:
            return False
        log_event(log, "tls_failure", logging.WARNING, cause=found.cause.name,
                  attempt=self.trust.count,
                  of=self.trust.attempts, detail=found.line())
        if not self.trust.exhausted:
            return False
        print(f"fl-client: error: TLS to {self.conn.target} failed {self.trust.count} times:"
              f" {found.line()}", file=sys.stderr)
        return True

    def _refusal_fix(self, details: str | None) -> str:
        if "revoked" not in (details or ""):
            return ""
        fix = explain(Cause.CLIENT_CERT_REVOKED, self.trust.files, self.conn.target,
                      self.trust.host, None).fix
        return f"; fix: {fix}"

    def _read_tasks(self, call: Any, inbox: queue.Queue[Any]) -> None:
        """The task stream's reader thread: it hands tasks to the daemon's loop, and a
        STOP of the job being worked on stops that work between batches at once (an
        operator's abort), rather than after the round it would otherwise finish."""
        try:
            for task in call:
                if task.kind == cpb.HEARTBEAT:
                    continue
                if task.kind == cpb.STOP and task.job_id and task.job_id == self.working_on:
                    self.task_stop.set()
                inbox.put(task)
            inbox.put(None)
        except Exception as exc:  # noqa: BLE001 - the daemon's loop raises it (RpcError: reconnect)
            inbox.put(exc)

    def _serve_tasks(self) -> bool:
        """Handle pushed tasks until the stream ends; True when the job is over."""
        call = self.conn.tasks()
        self._call = call
        inbox: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read_tasks, args=(call, inbox), name="task-stream",
                         daemon=True).start()
        try:
            while True:
                task = inbox.get()
                if self.stop.is_set():
                    return True
                if task is None:
                    break
                if isinstance(task, BaseException):
                    raise task
                if task.kind == cpb.STOP:
                    if task.job_id in self.ended_jobs or (
                            task.model_type and task.model_type not in self.studies):
                        continue  # told again, or about a study this hospital does not serve
                    self._receive_final_model(task)
                    log_event(log, "job_finished", job=task.job_id,
                              state=task.job_state or "ended", reason=task.reason[:300],
                              epsilon_spent=f"{self.ledger.spent():.3f}")
                    if not self.args.keep_running:
                        return True
                    self.ended_jobs.add(task.job_id)
                    continue
                self.ended_jobs.discard(task.job_id)
                self._handle(task)
        finally:
            self._call = None
            call.cancel()
        if self.stop.is_set():
            return True
        raise TransferError("task stream closed by the server")

    def _study_for(self, task: cpb.Task) -> Study:
        """The study a task is for, judged against its policy (TaskRefused says why)."""
        study = self.studies.get(task.model_type) if task.model_type else \
            next(iter(self.studies.values()))
        if study is None:
            raise TaskRefused(f"task refused: this hospital has no {task.model_type} data (it"
                              f" serves {', '.join(self.studies)})")
        config = training_config(task.config, self.policy,
                                 study.task.hyperparams.max_grad_norm)
        check_job(task, config, study.policy,
                  self.ledger.epsilon(self.ledger.history(task.job_id)),
                  len(study.train_set), self.ledger.epsilon)
        return study

    def _handle(self, task: cpb.Task) -> None:
        kind = cpb.TaskKind.Name(task.kind)
        log_event(log, "task", kind=kind, job=task.job_id, round=task.round,
                  model_type=task.model_type, task=task.task_id[:8])
        self.working_on = task.job_id
        self.task_stop.clear()
        if self.stop.is_set():
            self.task_stop.set()
        try:
            try:
                study = self._study_for(task)
            except TaskRefused as exc:  # before any of the study's data is used
                log_event(log, "task_refused", kind=kind, job=task.job_id, round=task.round,
                          reason=str(exc))
                self._report(task, cpb.REFUSED, reason=str(exc))
                return
            if task.kind == cpb.TRAIN:
                self._train(task, study)
            elif task.kind == cpb.EVALUATE:
                self._evaluate(task, study)
            self.tasks_done += 1
        except TransferError as exc:
            log_event(log, "task_failed", kind=kind, round=task.round, reason=str(exc)[:300])
            self.watch.refused_by_server(task, str(exc))
            self._report(task, cpb.FAILED, reason=str(exc)[:1000])
        except LedgerError:
            raise
        except Exception as exc:  # training crash: tell the server, keep serving
            log.exception("task %s failed", kind)
            self._report(task, cpb.FAILED, reason=f"{type(exc).__name__}: {exc}"[:1000])
        finally:
            self.working_on = ""
            self.watch.task_done(task)

    # tasks --------------------------------------------------------------------------
    def _fetch(self, task: cpb.Task, study: Study) -> dict[str, torch.Tensor]:
        self.watch.phase("download")
        bar = Progress("download", task.model_manifest.chunk_count, " chunks")
        try:
            return self.conn.fetch_model(task, study.reference,
                                         on_progress=lambda d, t: bar.update(d))
        finally:
            bar.close()

    def _train(self, task: cpb.Task, study: Study) -> None:
        from fl_client.local_training import PrivacyRequired, TrainingStopped, train_round

        secure: SecureRound | None = None
        try:
            config = training_config(task.config, self.policy,
                                     study.task.hyperparams.max_grad_norm)
            if task.HasField("secagg"):
                # the key stages run while the model downloads (both wait on the network);
                # keys and shares are checked before training, so a substituted key costs
                # no privacy budget
                secure = SecureRound(self.conn, self.client_id, task, *self.tls)
                global_state = secure.setup_while(lambda: self._fetch(task, study))
            else:
                global_state = self._fetch(task, study)
            check_global_model(global_state)
        except TaskRefused as exc:
            log_event(log, "task_refused", round=task.round, reason=str(exc))
            self._report(task, cpb.REFUSED, reason=str(exc))
            return
        except SecAggError as exc:
            log_event(log, "secagg_refused", logging.WARNING, round=task.round,
                      reason=str(exc))
            self._report(task, cpb.FAILED, reason=f"secure aggregation: {exc}"[:1000])
            return
        warning = self.evaluations.trained(task.job_id, task.round,
                                           model_id(task.model_manifest))
        if warning:
            log_event(log, "evaluations_stopped", logging.WARNING, job=task.job_id,
                      reason=warning)
        epochs = max(1, config.local_epochs)
        self.watch.phase("train")
        bar = Progress("train", epochs, " epochs")

        def on_progress(epoch: int, total: int, step: int, steps: int, loss: float) -> None:
            bar.update(epoch if step >= steps else epoch - 1, f"loss={loss:.4f}")

        try:
            result = train_round(study.task, global_state, study.train_set, config,
                                 self.device, self.ledger, self.args.allow_no_dp,
                                 on_progress=on_progress, job_id=task.job_id, round=task.round,
                                 stop=self.task_stop)
        except TrainingStopped as exc:
            # abandoned: the steps taken are in the ledger once (abandoned=True)
            reason = STOPPED_REASON if self.stop.is_set() else ABORTED_REASON
            log_event(log, "round_abandoned", job=task.job_id, round=task.round,
                      steps=exc.steps, reason=reason,
                      epsilon_total=f"{self.ledger.spent():.3f}")
            self._report(task, cpb.FAILED, reason=reason)
            return
        except BudgetExceeded as exc:
            log_event(log, "task_refused", round=task.round, reason=str(exc))
            self._report(task, cpb.REFUSED, reason=str(exc))
            return
        except PrivacyRequired as exc:
            log_event(log, "task_refused", round=task.round, reason=str(exc))
            self._report(task, cpb.REFUSED, reason=str(exc))
            return
        finally:
            bar.close()
        metrics = update_metrics(result, self.ledger.spent())
        self.watch.phase("upload")
        up = Progress("upload", 1, " chunks")

        def upload_progress(done: int, total: int) -> None:
            up.total = total
            up.update(done)

        state = result.state
        if secure is not None:  # the ledger entry says how this run's update leaves
            self.ledger.mark_secure(task.job_id, task.round)
        try:
            if secure is not None:  # the server gets only the masked, quantized delta
                state = secure.masked_state(result.state, global_state,
                                            result.update_kind == cpb.DELTA, result.num_examples)
            receipt = self.conn.submit_update(task, state, result.num_examples, metrics,
                                              on_progress=upload_progress, stop=self.stop)
        finally:
            up.close()
        if secure is not None:
            try:
                log_event(log, "secagg_revealed", round=task.round, dropped=secure.finish())
            except SecAggError as exc:
                log_event(log, "secagg_refused", logging.WARNING, round=task.round,
                          reason=str(exc))
        log_event(log, "update_sent", round=task.round, bytes=receipt.bytes_received,
                  epsilon_round=f"{result.epsilon_round:.3f}",
                  epsilon_total=f"{self.ledger.spent():.3f}", dp=result.dp_enabled)
        self.watch.update_sent(task, receipt, result)
        # No separate OK report: the update's header carried the metrics and epsilon,
        # and the round may already have closed by the time a report would arrive.

    def _receive_final_model(self, task: cpb.Task) -> None:
        """A completed job's STOP carries its final model when this hospital trained it:
        fetch it over the sealed path, check it against the announced manifest, and
        store it with its card (fl_client/model_store.py). A failure is logged, never
        fatal: the job is over either way."""
        from fl_client.local_training import evaluate_state

        if not task.HasField("model_manifest") or not task.model_manifest.chunk_count:
            return
        study = self.studies.get(task.model_type) if task.model_type else \
            next(iter(self.studies.values()))
        if study is None:
            return
        sha = bytes(task.model_manifest.sha256).hex()
        if has_model(self.state_dir, task.job_id, sha):
            return  # a STOP seen again after a reconnect
        try:
            state = self._fetch(task, study)
            check_global_model(state)
            digest = int(task.model_manifest.digest)
            if model_sha256(state, digest) != sha:
                raise TransferError("the final model does not match its announced"
                                    f" {digest_name(digest)}")
            metrics = evaluate_state(study.task, state, study.test_set, self.device)
            path = save_final_model(self.state_dir, task.job_id, task.round,
                                    study.model_type, state, self.ledger,
                                    {k: float(v) for k, v in metrics.items() if _is_number(v)},
                                    strategy=task.strategy,
                                    server_metrics=dict(task.final_metrics),
                                    wire_digest=(digest, sha))
        except (TransferError, TaskRefused, ValueError, OSError) as exc:
            log_event(log, "final_model_failed", logging.WARNING, job=task.job_id,
                      reason=str(exc)[:300])
            return
        log_event(log, "final_model_saved", job=task.job_id, round=task.round,
                  path=str(path), digest=f"{digest_name(digest)}:{sha}")

    def _evaluate(self, task: cpb.Task, study: Study) -> None:
        """Evaluate the job's global model, under the hospital's evaluation policy
        (fl_client/task_policy.py): refused with the reason, never answered exactly
        for a model the job did not distribute or on too small a test split."""
        from fl_client.local_training import evaluate_state

        examples = len(study.test_set)
        sigma = self.args.eval_noise_multiplier
        try:
            self.evaluations.admit(task.job_id, task.round, model_id(task.model_manifest),
                                   examples)
            state = self._fetch(task, study)
            check_global_model(state)
            if sigma > 0:
                self.ledger.ensure_budget(sigma, 1.0, 1)
        except (TaskRefused, BudgetExceeded) as exc:
            log_event(log, "task_refused", kind="EVALUATE", round=task.round, reason=str(exc))
            self._report(task, cpb.REFUSED, reason=str(exc))
            return
        self.watch.phase("evaluate")
        metrics = evaluate_state(study.task, state, study.test_set, self.device)
        metrics = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if sigma > 0:
            # Only accuracy has a known sensitivity (1/examples): the others are dropped.
            self.ledger.record(task.job_id, task.round, sigma, 1.0, 1)
            metrics = {"accuracy": noisy_accuracy(metrics.get("accuracy", 0.0), examples,
                                                  sigma)}
        metrics = round_metrics(metrics)
        shown: dict[str, Any] = {k: f"{v:.4f}" for k, v in metrics.items()}
        log_event(log, "evaluated", round=task.round, **shown)
        self._report(task, cpb.OK, metrics=metrics, num_examples=examples)

    def _report(self, task: cpb.Task, status: cpb.ReportStatus, reason: str = "",
                metrics: dict[str, float] | None = None, num_examples: int = 0,
                epsilon_round: float = 0.0, epsilon_total: float | None = None,
                dp_enabled: bool = False, delta: float = 0.0) -> None:
        request = cpb.ReportRequest(
            task_id=task.task_id, job_id=task.job_id, round=task.round, kind=task.kind,
            status=status, reason=reason, metrics=metrics or {}, num_examples=num_examples,
            epsilon_round=epsilon_round,
            epsilon_total=self.ledger.spent() if epsilon_total is None else epsilon_total,
            delta=delta, dp_enabled=dp_enabled)
        self.watch.report(request)
        try:
            self.conn.report(request)
        except grpc.RpcError as exc:
            log_event(log, "report_not_delivered", code=exc.code().name,
                      details=(exc.details() or "")[:200])

    def request_stop(self) -> None:
        self.stop.set()
        self.task_stop.set()
        call = self._call
        if call is not None:
            call.cancel()


def load_study(model_type: str, data_path: Path, policy: JobPolicy) -> Study:
    """A study's task, data (both splits) and reference model, loaded at start."""
    from fl_models.registry import get_task

    task = get_task(model_type)
    train_set = task.load_split(data_path, "train")
    try:
        test_set = task.load_split(data_path, "test")
    except Exception as exc:  # a site without a local test split still trains
        log.warning("no local %s test split in %s (%s): evaluation tasks will use the"
                    " training data", model_type, data_path, exc)
        test_set = train_set
    for split, data in (("train", train_set), ("test", test_set)):
        counts = class_counts(data, task.class_names)
        log_event(log, "data_loaded", model_type=model_type, split=split, path=str(data_path),
                  examples=len(data), classes=describe(counts))
    torch.manual_seed(0)
    return Study(model_type, data_path, policy, task, train_set, test_set,
                 task.build_model().state_dict())


def update_metrics(result: Any, epsilon_total: float) -> dict[str, float]:
    """The metrics an update carries (the simulator's virtual hospitals send the same):
    the trainer's own, this round's and the cumulative epsilon, whether DP was on, and
    the training time; undefined values are left out."""
    metrics = dict(result.metrics)
    metrics.update(epsilon_round=result.epsilon_round, epsilon_total=epsilon_total,
                   dp_enabled=1.0 if result.dp_enabled else 0.0, train_seconds=result.seconds)
    return round_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})


def _is_number(value: Any) -> bool:
    """Metrics worth sending: an undefined one (e.g. AUROC on a one-class test split
    is NaN) is left out rather than sent and refused as absurd."""
    return isinstance(value, int | float) and math.isfinite(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        setup_logging_from_args("fl_client", args)
    except OSError as exc:
        print(f"fl-client: error: cannot open the log file: {exc}", file=sys.stderr)
        return 2
    try:
        daemon = ClientDaemon(args)
    except (ValueError, OSError, LedgerError, StateLockError) as exc:
        print(f"fl-client: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"fl-client: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    signalled = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log_event(log, "signal", signal=signal.Signals(signum).name)
        signalled.set()
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 2
    try:
        code = daemon.run()
    except LedgerError as exc:
        print(f"fl-client: error: privacy ledger: {exc}", file=sys.stderr)
    finally:
        daemon.conn.close()
        daemon.state_lock.release()
    if signalled.is_set():
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown once an operator's stop is complete.

    Everything durable is on disk by then (the ledger and audit trail fsync each
    record, the state lock is released), but tearing down torch, Opacus and gRPC
    took 10-15 s on a loaded 2-core machine, well past the second a Ctrl-C should
    take; so the logs are flushed and the process ends here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
