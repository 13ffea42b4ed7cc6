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
from fl_client.privacy_ledger import BudgetExceeded, LedgerError, PrivacyLedger
from fl_client.progress import Progress
from fl_client.secagg_client import SecureRound
from fl_client.site_data import class_counts, describe
from fl_client.task_policy import (
    EvaluationPolicy,
    LocalPolicy,
    TaskRefused,
    check_global_model,
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
)
from fl_core.logs import add_log_file_flags, log_event, setup_logging_from_args
from fl_core.secagg import SecAggError
from fl_core.statelock import StateLock, StateLockError
from fl_core.tls import parse_server_url, target
from fl_core.tls_diagnosis import Cause, TrustFailures, client_tls_files, explain
from fl_proto import coordinator_pb2 as cpb

log = logging.getLogger("fl_client.client")

DEFAULT_EPSILON_BUDGET = 10.0
STOPPED_REASON = "stopped by the operator"


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
    p.add_argument("--data_path", type=Path, required=True,
                   help="folder with this hospital's data in a format the task loads")
    p.add_argument("--model_type", required=True,
                   help="breast_cancer, ecg, glaucoma, pneumonia or symptom")
    p.add_argument("--keys_dir", type=Path, default=Path("keys"),
                   help="folder with <client_id>.key, <client_id>.crt and ca.crt")
    p.add_argument("--state_dir", type=Path, default=None,
                   help="folder for the privacy ledger (default: client_state/<client_id>)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
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
    p.add_argument("--max_reconnect_s", type=float, default=0.0,
                   help="give up after this many seconds without a server (0: never)")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    add_metrics_flags(p)
    add_log_file_flags(p)
    add_config_flag(p)
    return p


class ClientDaemon:
    def __init__(self, args: argparse.Namespace) -> None:
        from fl_models.registry import get_task

        self.args = args
        self.client_id: str = args.client_id
        state_dir = args.state_dir or Path("client_state") / self.client_id
        # One daemon per state folder (two would charge the privacy ledger twice),
        # checked first so a second daemon fails before it reads any data.
        self.state_lock = StateLock(state_dir, "fl-client").acquire()
        self.state_dir = state_dir
        self.task = get_task(args.model_type)
        self.device = _device(args.device)
        self.train_set = self.task.load_split(args.data_path, "train")
        try:
            self.test_set = self.task.load_split(args.data_path, "test")
        except Exception as exc:  # a site without a local test split still trains
            log.warning("no local test split in %s (%s): evaluation tasks will use the"
                        " training data", args.data_path, exc)
            self.test_set = self.train_set
        for split, data in (("train", self.train_set), ("test", self.test_set)):
            counts = class_counts(data, self.task.class_names)
            log_event(log, "data_loaded", split=split, path=str(args.data_path),
                      examples=len(data), classes=describe(counts))
        host, port = parse_server_url(args.server_url)
        ca, cert, key = load_client_tls(args.keys_dir, self.client_id)
        self.tls = (ca, cert, key)  # secure aggregation signs key adverts with this key
        self.conn = ServerConnection(target(host, port), ca, cert, key, self.client_id,
                                     args.model_type, len(self.train_set),
                                     server_name=args.server_name,
                                     replace_session=args.replace_session,
                                     epsilon_budget=args.epsilon_budget)
        self.trust = TrustFailures(host, port, client_tls_files(args.keys_dir, self.client_id),
                                   args.server_name)
        self.session_conflicts = 0
        self.ended_jobs: set[str] = set()
        torch.manual_seed(0)
        self.reference = self.task.build_model().state_dict()
        if args.epsilon_budget > EPSILON_WARN_PER_JOB:
            log_event(log, "privacy_warning", logging.WARNING,
                      epsilon_budget=args.epsilon_budget,
                      note=f"a budget above {EPSILON_WARN_PER_JOB:g} gives this hospital's"
                           " patients little privacy")
        self.ledger = PrivacyLedger(state_dir, self.client_id, args.epsilon_budget,
                                    args.delta or self.task.hyperparams.delta)
        self.policy = LocalPolicy(delta=self.ledger.delta, target_epsilon=args.target_epsilon,
                                  noise_multiplier=args.noise_multiplier,
                                  max_grad_norm=args.max_grad_norm,
                                  allow_no_dp=args.allow_no_dp)
        self.evaluations = EvaluationPolicy()
        self.stop = threading.Event()
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
                          epsilon_budget=self.args.epsilon_budget)
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

    def _serve_tasks(self) -> bool:
        """Handle pushed tasks until the stream ends; True when the job is over."""
        call = self.conn.tasks()
        self._call = call
        try:
            for task in call:
                if self.stop.is_set():
                    return True
                if task.kind == cpb.HEARTBEAT:
                    continue
                if task.kind == cpb.STOP:
                    if task.job_id in self.ended_jobs:
                        continue  # told again on a new stream: nothing new to do
                    self._receive_final_model(task)
                    log_event(log, "job_finished", job=task.job_id,
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

    def _handle(self, task: cpb.Task) -> None:
        kind = cpb.TaskKind.Name(task.kind)
        log_event(log, "task", kind=kind, job=task.job_id, round=task.round,
                  task=task.task_id[:8])
        try:
            if task.kind == cpb.TRAIN:
                self._train(task)
            elif task.kind == cpb.EVALUATE:
                self._evaluate(task)
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
            self.watch.task_done(task)

    # tasks --------------------------------------------------------------------------
    def _fetch(self, task: cpb.Task) -> dict[str, torch.Tensor]:
        self.watch.phase("download")
        bar = Progress("download", task.model_manifest.chunk_count, " chunks")
        try:
            return self.conn.fetch_model(task, self.reference,
                                         on_progress=lambda d, t: bar.update(d))
        finally:
            bar.close()

    def _train(self, task: cpb.Task) -> None:
        from fl_client.local_training import PrivacyRequired, TrainingStopped, train_round

        try:
            config = training_config(task.config, self.policy,
                                     self.task.hyperparams.max_grad_norm)
            global_state = self._fetch(task)
            check_global_model(global_state)
        except TaskRefused as exc:
            log_event(log, "task_refused", round=task.round, reason=str(exc))
            self._report(task, cpb.REFUSED, reason=str(exc))
            return
        warning = self.evaluations.trained(task.job_id, task.round,
                                           task.model_manifest.sha256.hex())
        if warning:
            log_event(log, "evaluations_stopped", logging.WARNING, job=task.job_id,
                      reason=warning)
        secure: SecureRound | None = None
        if task.HasField("secagg"):
            # keys and shares before training: a substituted key costs no privacy budget
            try:
                secure = SecureRound(self.conn, self.client_id, task, *self.tls)
                secure.setup()
            except SecAggError as exc:
                log_event(log, "secagg_refused", logging.WARNING, round=task.round,
                          reason=str(exc))
                self._report(task, cpb.FAILED, reason=f"secure aggregation: {exc}"[:1000])
                return
        epochs = max(1, config.local_epochs)
        self.watch.phase("train")
        bar = Progress("train", epochs, " epochs")

        def on_progress(epoch: int, total: int, step: int, steps: int, loss: float) -> None:
            bar.update(epoch if step >= steps else epoch - 1, f"loss={loss:.4f}")

        try:
            result = train_round(self.task, global_state, self.train_set, config, self.device,
                                 self.ledger, self.args.allow_no_dp, on_progress=on_progress,
                                 job_id=task.job_id, round=task.round, stop=self.stop)
        except TrainingStopped as exc:
            # abandoned: the steps taken are in the ledger once (abandoned=True)
            log_event(log, "round_abandoned", round=task.round, steps=exc.steps,
                      epsilon_total=f"{self.ledger.spent():.3f}")
            self._report(task, cpb.FAILED, reason=STOPPED_REASON)
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
        sha = bytes(task.model_manifest.sha256).hex()
        if has_model(self.state_dir, task.job_id, sha):
            return  # a STOP seen again after a reconnect
        try:
            state = self._fetch(task)
            check_global_model(state)
            if model_sha256(state) != sha:
                raise TransferError("the final model does not match its announced SHA-256")
            metrics = evaluate_state(self.task, state, self.test_set, self.device)
            path = save_final_model(self.state_dir, task.job_id, task.round,
                                    self.args.model_type, state, self.ledger,
                                    {k: float(v) for k, v in metrics.items() if _is_number(v)})
        except (TransferError, TaskRefused, ValueError, OSError) as exc:
            log_event(log, "final_model_failed", logging.WARNING, job=task.job_id,
                      reason=str(exc)[:300])
            return
        log_event(log, "final_model_saved", job=task.job_id, round=task.round,
                  path=str(path), sha256=sha)

    def _evaluate(self, task: cpb.Task) -> None:
        """Evaluate the job's global model, under the hospital's evaluation policy
        (fl_client/task_policy.py): refused with the reason, never answered exactly
        for a model the job did not distribute or on too small a test split."""
        from fl_client.local_training import evaluate_state

        examples = len(self.test_set)
        sigma = self.args.eval_noise_multiplier
        try:
            self.evaluations.admit(task.job_id, task.round, task.model_manifest.sha256.hex(),
                                   examples)
            state = self._fetch(task)
            check_global_model(state)
            if sigma > 0:
                self.ledger.ensure_budget(sigma, 1.0, 1)
        except (TaskRefused, BudgetExceeded) as exc:
            log_event(log, "task_refused", kind="EVALUATE", round=task.round, reason=str(exc))
            self._report(task, cpb.REFUSED, reason=str(exc))
            return
        self.watch.phase("evaluate")
        metrics = evaluate_state(self.task, state, self.test_set, self.device)
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
        call = self._call
        if call is not None:
            call.cancel()


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


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
