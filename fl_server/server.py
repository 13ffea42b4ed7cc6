"""The server daemon: `python -m fl_server.server --host 0.0.0.0 --port 5000`.

Wires the durable store, the round engine and the two gRPC services behind the
authentication interceptor, serves health and reflection, and turns SIGTERM into a
clean stop. Every operator mistake found at start (bad flag, missing key, corrupt
state) is one clear line on stderr and exit code 2, never a bare traceback and
never a silently reset job.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fl_core.constants import (
    CONCURRENT_RPCS_PER_WORKER,
    DEFAULT_EPSILON_PER_HOSPITAL,
    EPSILON_WARN_PER_JOB,
    FINAL_MODEL_GRACE_S,
    MAX_TASK_STREAMS,
    METRICS_HOST,
    REVOCATION_POLL_S,
    SERVER_METRICS_PORT,
)
from fl_core.gc_policy import settle_after_startup
from fl_core.logs import add_log_file_flags, log_event, setup_logging_from_args
from fl_core.site_checks import bind_problem
from fl_core.statelock import StateLock, StateLockError
from fl_core.tls import SERVER_OPTIONS, server_credentials
from fl_proto import aggregator_pb2, coordinator_pb2
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from fl_server.aggregator import AggregatorService
from fl_server.aggregator import add_to_server as add_aggregator_to_server
from fl_server.audit import RefusalObserver
from fl_server.auth import AuthInterceptor
from fl_server.clients import ClientRegistry
from fl_server.config import (
    ConfigError,
    ServerConfig,
    collect_values,
    config_from,
    parse_strategy_params,
    restore_job,
    settle_job,
)
from fl_server.coordinator import CoordinatorService
from fl_server.jobs import JobManager, initial_state
from fl_server.keyfiles import load_server_tls
from fl_server.limits import CallLimitInterceptor, log_limits
from fl_server.metrics import observe
from fl_server.rounds import RoundEngine
from fl_server.secagg_round import SecAggSettings, SecureAggregation
from fl_server.serving import AioServer
from fl_server.store import Job, Store
from fl_server.strategies import STRATEGY_NAMES, StrategyError, make_strategy
from fl_server.tokens import RevocationList, TokenService

log = logging.getLogger("fl_server.server")

COORDINATOR = "fl.v1.Coordinator"
AGGREGATOR = "fl.v1.Aggregator"
PUBLIC_METHODS = frozenset({
    f"/{COORDINATOR}/Join",
    f"/{COORDINATOR}/Status",  # these four and DownloadModel also in ADMIN_METHODS
    f"/{COORDINATOR}/SubmitJob",
    f"/{COORDINATOR}/ListJobs",
    f"/{COORDINATOR}/AbortJob",
    f"/{COORDINATOR}/DownloadModel",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
# Admin certificate, no session token: the operator's calls.
ADMIN_METHODS = frozenset(f"/{COORDINATOR}/{m}" for m in (
    "Status", "SubmitJob", "ListJobs", "AbortJob", "DownloadModel"))


class StartupError(Exception):
    """Something an operator must fix before the server can start."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-server",
        description="Federated learning server daemon: coordinates training rounds over"
                    " mutual-TLS gRPC and aggregates the hospitals' sealed updates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServerConfig()
    p.add_argument("--config", help="TOML file with any of the options below (flags win)")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=d.port,
                   help="port to listen on; 0 picks a free one (see --ready_file)")
    p.add_argument("--keys_dir", type=Path, default=d.keys_dir,
                   help="folder from `python -m fl_server.security --generate-keys`")
    p.add_argument("--state_dir", type=Path, default=d.state_dir,
                   help="folder for the SQLite state, checkpoints and upload spools")
    p.add_argument("--model_type", default=d.model_type,
                   help="task to train: breast_cancer, ecg, glaucoma, pneumonia, symptom")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds in the job")
    p.add_argument("--strategy", default=d.strategy, choices=sorted(STRATEGY_NAMES),
                   help="aggregation strategy")
    p.add_argument("--strategy_param", action="append", default=[], metavar="NAME=VALUE",
                   help="strategy parameter, repeatable (e.g. mu=0.01 for fedprox,"
                        " beta=0.1 for trimmed_mean)")
    p.add_argument("--fraction", type=float, default=d.fraction,
                   help="fraction of connected clients selected each round")
    p.add_argument("--min_clients", type=int, default=d.min_clients,
                   help="fewest clients a round starts with (and selects)")
    p.add_argument("--quorum", type=float, default=d.quorum,
                   help="fraction of selected clients whose updates close a round")
    p.add_argument("--round_deadline_s", type=float, default=d.round_deadline_s,
                   help="seconds a round waits for updates before closing on quorum")
    p.add_argument("--wait_for_clients_s", type=float, default=d.wait_for_clients_s,
                   help="seconds a round waits for min_clients to connect")
    p.add_argument("--max_round_attempts", type=int, default=d.max_round_attempts,
                   help="tries per round before the job is marked failed")
    p.add_argument("--update_norm_factor", type=float, default=d.update_norm_factor,
                   help="an update whose norm is above this many times the median of the"
                        " round's other updates spoils the attempt, which is retried without"
                        " it (0: off)")
    p.add_argument("--local_epochs", type=int, default=d.local_epochs,
                   help="local epochs sent to clients (0: the task's default)")
    p.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="batch size sent to clients (0: the task's default)")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate,
                   help="learning rate sent to clients (0: the task's default)")
    p.add_argument("--no_dp", action="store_true",
                   help="ask clients to train WITHOUT differential privacy (they must also"
                        " allow it)")
    p.add_argument("--noise_multiplier", type=float, default=d.noise_multiplier,
                   help="DP noise multiplier (0: the task's default)")
    p.add_argument("--target_epsilon", type=float, default=d.target_epsilon,
                   help="DP epsilon per round; overrides the noise multiplier when set")
    p.add_argument("--epsilon_per_hospital", type=float, default=d.epsilon_per_hospital,
                   help="each hospital's epsilon for the whole job: every hospital plans its"
                        " own noise so that after the last round it is at or under this"
                        f" (0: {DEFAULT_EPSILON_PER_HOSPITAL:g}, unless --noise_multiplier or"
                        " --target_epsilon fixes the noise instead)")
    p.add_argument("--delta", type=float, default=d.delta, help="DP delta (0: task default)")
    p.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm,
                   help="DP per-sample gradient clipping bound (0: task default)")
    p.add_argument("--eval_data", type=Path, default=None,
                   help="held-out data the server evaluates each new global model on")
    p.add_argument("--no_fed_eval", dest="fed_eval", action="store_false",
                   help="skip asking clients to evaluate each new global model")
    p.add_argument("--eval_deadline_s", type=float, default=d.eval_deadline_s,
                   help="seconds to wait for clients' evaluations")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for model init and selection")
    p.add_argument("--secure_aggregation", action="store_true",
                   help="SecAgg+: hospitals mask their updates so the server learns only"
                        " their sum (FedAvg-family strategies only)")
    p.add_argument("--secagg_threshold", type=float, default=d.secagg_threshold,
                   help="shares needed to rebuild a hospital's secrets: floor(this x"
                        " holders) + 1, holders = its neighbours + itself (>= 0.5)")
    p.add_argument("--secagg_bits", type=int, default=d.secagg_bits,
                   help="fixed-point bits of a quantized update (scale 2^(bits-1) / clip)")
    p.add_argument("--secagg_clip", type=float, default=d.secagg_clip,
                   help="each coordinate of an update is clipped to [-clip, clip]")
    p.add_argument("--secagg_stage_timeout_s", type=float, default=d.secagg_stage_timeout_s,
                   help="how long the key, share and unmask stages wait for hospitals")
    p.add_argument("--max_workers", type=int, default=d.max_workers,
                   help="threads that run calls while they have work (uploads and downloads"
                        " in flight, quick calls); an idle connected hospital's task stream"
                        " holds none (grpc.aio), so this need not grow with the hospitals")
    p.add_argument("--torch_threads", type=int, default=d.torch_threads,
                   help="threads torch may use for aggregation; 1 avoids contention with the"
                        " gRPC threads (8 x 100 MB FedAvg: 0.33 s with 1 thread, 0.95 s with 2"
                        " on a 2-core machine)")
    p.add_argument("--new_job", action="store_true",
                   help="start a new job even if the state dir holds an unfinished one")
    p.add_argument("--no_job", action="store_true",
                   help="start without a job of its own (the job flags are then unused):"
                        " jobs come from `fl-admin submit JOB.toml` and run one at a time;"
                        " a job left running by a previous start is resumed first")
    p.add_argument("--exit_when_done", action="store_true",
                   help="exit once the job has finished and none is queued (default: keep"
                        " serving, waiting for submitted jobs)")
    p.add_argument("--final_model_grace_s", type=float, default=FINAL_MODEL_GRACE_S,
                   help="with --exit_when_done: at most this long for the hospitals still"
                        " connected to download the final model before exiting")
    p.add_argument("--ready_file", type=Path,
                   help="write {\"port\": N, \"pid\": P} here once serving")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    add_log_file_flags(p)
    p.add_argument("--metrics_port", type=int, default=SERVER_METRICS_PORT,
                   help="Prometheus /metrics port (0: off; a busy default port only warns)")
    p.add_argument("--metrics_host", default=METRICS_HOST,
                   help="address the metrics endpoint listens on")
    return p


def _explicit(argv: list[str]) -> set[str]:
    """Names of the options typed on the command line (so a TOML file's value stands
    unless the operator overrides it)."""
    names = set()
    for item in argv:
        if item.startswith("--"):
            name = item[2:].split("=", 1)[0]
            names.add({"no_fed_eval": "fed_eval"}.get(name, name))
    return names


def train_config(cfg: ServerConfig, task: Any, strategy_cfg: dict[str, float],
                 job: Job | None = None) -> cpb.TrainConfig:
    """The training task's settings, from the job's settled config.

    A job's config is settled against the task's defaults when it is created; the
    `or hp.*` fallbacks only serve jobs stored before that was so. The noise
    multiplier drives the noise unless the operator asked for an epsilon per round.
    """
    hp = task.hyperparams
    planned = cfg.epsilon_per_hospital > 0
    privacy = cpb.PrivacyConfig(
        enabled=not cfg.no_dp,
        noise_multiplier=cfg.noise_multiplier or (0.0 if cfg.target_epsilon or planned else
                                                  hp.noise_multiplier),
        epsilon_per_job=cfg.epsilon_per_hospital, total_rounds=cfg.rounds if planned else 0,
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta or hp.delta,
        max_grad_norm=cfg.max_grad_norm or hp.max_grad_norm)
    config = cpb.TrainConfig(
        local_epochs=cfg.local_epochs or hp.local_epochs,
        batch_size=cfg.batch_size or hp.batch_size,
        learning_rate=cfg.learning_rate or hp.learning_rate,
        proximal_mu=float(strategy_cfg.get("proximal_mu", 0.0)),  # for clients before 0.2
        update_kind=cpb.DELTA, privacy=privacy)
    for name, value in strategy_cfg.items():
        config.strategy_settings[name] = float(value)
    config.strategy = cfg.strategy
    config.job_rounds = cfg.rounds
    config.secure_aggregation = cfg.secure_aggregation
    if job is not None:
        config.job_sha256 = job.job_sha256
    return config


class ServerApp:
    """Everything one server process runs; `start()` then `wait()`."""

    def __init__(self, cfg: ServerConfig, new_job: bool = False,
                 given: set[str] | None = None, no_job: bool = False) -> None:
        """Order matters: the state folder is locked and the port bound before any job
        row is written, so a second server on the same port or folder changes nothing.
        `given` names the options the operator set (flags or TOML): on a running job
        any of them that differs from the job's stored value refuses the start."""
        self.cfg = cfg
        self.given = set(given or ())
        self.no_job = no_job
        self._stopping = threading.Event()
        torch.set_num_threads(cfg.torch_threads)
        try:
            self.tls = load_server_tls(cfg.keys_dir)
            self.tokens = TokenService(cfg.keys_dir)
            self.revocations = RevocationList(cfg.keys_dir)
        except Exception as exc:  # each names the file it could not use
            raise StartupError(f"keys in {cfg.keys_dir}: {exc}") from exc
        try:
            self.state_lock = StateLock(cfg.state_dir, "fl-server").acquire()
        except StateLockError as exc:
            raise StartupError(str(exc)) from exc
        try:
            self.server, self.port, self.address = self._bind()
            self.store = Store(cfg.state_dir)
            self._build(new_job)
        except BaseException:
            if getattr(self, "server", None) is not None:
                self.server.stop(None)
            self.state_lock.release()
            raise

    def _build(self, new_job: bool) -> None:
        """The job manager, and the job this process starts with: the running one a
        restart resumes, else (unless --no_job) a new one from the flags."""
        cfg = self.cfg
        self.registry = ClientRegistry()
        self.jobs = JobManager(cfg, self.store, self.registry, self._engine_for)
        self.engine: Any = self.jobs.active
        running = self.store.running_job()
        try:
            if running is not None and not new_job:
                # with --no_job the job flags are unused: they cannot conflict with the job
                restore_job(cfg, running.config, set() if self.no_job else self.given,
                            running.job_id)
                self.jobs.start_with(running, resuming=True)
            elif not self.no_job:
                if running is not None:
                    log_event(log, "previous_job", job=running.job_id, state=running.state,
                              note="left running: --new_job starts a new job")
                self._check_job(cfg)
                settle_job(cfg, self._task(cfg).hyperparams)
                self.jobs.start_with(self.jobs.create_from_flags(cfg), resuming=False)
        except ConfigError as exc:
            raise StartupError(str(exc)) from exc
        self.health = health.HealthServicer()
        self.aggregator: AggregatorService | None = None  # made by start()

    @staticmethod
    def _task(cfg: ServerConfig) -> Any:
        from fl_models.registry import get_task

        try:
            return get_task(cfg.model_type)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc

    def _check_job(self, cfg: ServerConfig) -> None:
        try:
            make_strategy(cfg.strategy, **cfg.strategy_params)
        except StrategyError as exc:
            raise StartupError(str(exc)) from exc

    def _engine_for(self, cfg: ServerConfig, job: Job, resuming: bool) -> RoundEngine:
        """A job's round engine: its task, strategy (with its server state when
        resuming), global model and secure aggregation, all from the stored job."""
        task = self._task(cfg)
        try:
            strategy = make_strategy(cfg.strategy, **cfg.strategy_params)
        except StrategyError as exc:
            raise StartupError(str(exc)) from exc
        if resuming:
            last = self.store.last_completed_round(job.job_id)
            state, strategy_state = self.store.load_checkpoint(job.job_id, last)
            if strategy_state:
                try:
                    strategy.import_state(strategy_state)
                except StrategyError as exc:
                    raise StartupError(f"job {job.job_id} round {last}: {exc}") from exc
            log_event(log, "job_resumed", job=job.job_id, completed_rounds=last,
                      total_rounds=cfg.rounds, strategy=cfg.strategy)
        else:
            last = 0
            state = initial_state(task, cfg.seed)
            self.store.save_initial_model(job.job_id, state)
            if cfg.epsilon_per_hospital > EPSILON_WARN_PER_JOB or (
                    cfg.target_epsilon * cfg.rounds > EPSILON_WARN_PER_JOB):
                log_event(log, "privacy_warning", logging.WARNING, job=job.job_id,
                          epsilon_per_hospital=cfg.epsilon_per_hospital or
                          f"{cfg.target_epsilon:g} per round x {cfg.rounds} rounds",
                          note=f"above {EPSILON_WARN_PER_JOB:g} for one job gives little"
                               " privacy")
            log_event(log, "job_created", job=job.job_id, model_type=cfg.model_type,
                      rounds=cfg.rounds, strategy=cfg.strategy,
                      settings=json.dumps(cfg.job_dict(), sort_keys=True))
        eval_dataset = None
        if cfg.eval_data is not None:
            try:
                eval_dataset = task.load_split(cfg.eval_data, "test")
            except Exception as exc:
                if cfg.model_type == self.cfg.model_type and not self.no_job:
                    raise StartupError(f"--eval_data {cfg.eval_data}: {exc}") from exc
                log_event(log, "eval_data_skipped", logging.WARNING, job=job.job_id,
                          reason=f"--eval_data {cfg.eval_data} is not {cfg.model_type} data:"
                                 f" {exc}"[:300])
        engine = RoundEngine(cfg, self.store, self.registry, strategy, task, job.job_id,
                             train_config(cfg, task, strategy.client_config(), job),
                             eval_dataset)
        engine.set_model(last, state)
        engine.read_model_from_checkpoint()
        if cfg.secure_aggregation:
            engine.secure = SecureAggregation(
                SecAggSettings(cfg.secagg_threshold, cfg.secagg_bits, cfg.secagg_clip,
                               cfg.secagg_stage_timeout_s),
                strategy, self.tls[2], cfg.keys_dir / "crl.pem")
        return engine

    def _bind(self) -> tuple[AioServer, int, str]:
        """The gRPC server with its interceptors, bound (not yet serving).

        SO_REUSEPORT is off: with gRPC's default a second server on a busy port starts
        without an error and takes part of the traffic, splitting the hospitals and
        the operator's calls between two jobs at random."""
        cfg = self.cfg
        # after authentication: the limits are per identity (see fl_server/limits.py)
        self.limits = CallLimitInterceptor(cfg.max_workers)
        log_limits(self.limits, cfg.max_workers)
        interceptor = AuthInterceptor(self.tokens, self.revocations,
                                      public_methods=set(PUBLIC_METHODS),
                                      admin_methods=set(ADMIN_METHODS))
        server = AioServer(cfg.max_workers,
                           interceptors=[RefusalObserver(), interceptor, self.limits],
                           options=[*SERVER_OPTIONS, ("grpc.so_reuseport", 0)],
                           maximum_concurrent_rpcs=cfg.max_workers
                           * CONCURRENT_RPCS_PER_WORKER + MAX_TASK_STREAMS)
        cert, key, ca = self.tls
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            port = server.add_secure_port(address, server_credentials(cert, key, ca))
        except RuntimeError:
            port = 0
        if port == 0:
            found = bind_problem(cfg.host, cfg.port)
            why = (f"{found[0]}; {found[1]}" if found else
                   "gRPC could not bind it (GRPC_VERBOSITY=debug shows its reason)")
            raise StartupError(f"cannot listen on {address}: {why}")
        return server, port, address

    def start(self) -> int:
        cfg = self.cfg
        server = self.server
        cpb_grpc.add_CoordinatorServicer_to_server(
            CoordinatorService(self.engine, self.registry, self.store, self.tokens,
                               revocations=self.revocations, jobs=self.jobs,
                               any_study=self.no_job), server)
        self.aggregator = AggregatorService(self.engine, self.registry, cfg.state_dir / "spool")
        add_aggregator_to_server(self.aggregator, server)  # chunks framed directly (issue 16)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
                    aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)  # type: ignore[arg-type]
        for name in ("", COORDINATOR, AGGREGATOR):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        port, address = self.port, self.address
        server.start()
        threading.Thread(target=self.jobs.run, name="jobs", daemon=True).start()
        threading.Thread(target=self._watch_revocations, name="crl-watch", daemon=True).start()
        settle_after_startup()
        for name in ("", COORDINATOR, AGGREGATOR):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.job_id:
            log_event(log, "serving", address=address, port=port, job=self.job_id,
                      model_type=self.engine.cfg.model_type, strategy=self.engine.cfg.strategy,
                      rounds=self.engine.cfg.rounds, queued=len(self.jobs.queue()))
        else:
            log_event(log, "serving", address=address, port=port, job="none",
                      queued=len(self.jobs.queue()),
                      note="waiting for jobs: fl-admin submit JOB.toml")
        return port

    def _watch_revocations(self) -> None:
        """Wake every task stream when the revocation list changes: a stream is
        authenticated once, at its start, and an idle one only looks again when woken,
        so this is what ends a revoked hospital's open stream within a second."""
        generation = self.revocations.generation
        while not self._stopping.wait(REVOCATION_POLL_S):
            if self.revocations.changed_since(generation):
                generation = self.revocations.generation
                self.registry.wake()

    @property
    def job_id(self) -> str:
        """The job being served (or the last one); "" before the first."""
        return str(self.engine.job_id)

    def stop(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        self.jobs.shutdown()
        for name in ("", COORDINATOR, AGGREGATOR):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.registry.close()
        if self.server is not None:
            self.server.stop(grace_s).wait(grace_s + 1)
        self.engine.done_event.wait(timeout=grace_s)
        if self.aggregator is not None:  # the kept spool files (fl_server/spool_pool.py)
            self.aggregator.spools.clear()
        self.store.close()
        self.state_lock.release()


def _write_ready(path: Path, port: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging_from_args("fl_server", args)
    except OSError as exc:
        print(f"fl-server: error: cannot open the log file: {exc}", file=sys.stderr)
        return 2
    try:
        args.strategy_params = parse_strategy_params(args.strategy_param)
        explicit = _explicit(argv)
        if args.strategy_param:
            explicit.add("strategy_params")
        if not (math.isfinite(args.final_model_grace_s) and args.final_model_grace_s >= 0):
            raise ConfigError("--final_model_grace_s must be a finite number of seconds >= 0")
        values = collect_values(args, explicit)
        cfg = config_from(values)
        app = ServerApp(cfg, new_job=args.new_job, given=set(values), no_job=args.no_job)
        observe(app, args.metrics_host, args.metrics_port, "metrics_port" in explicit)
        port = app.start()
    except (ConfigError, StartupError, ValueError, OSError) as exc:
        print(f"fl-server: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # store/checkpoint errors carry their own clear message
        print(f"fl-server: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log_event(log, "signal", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.ready_file:
        _write_ready(args.ready_file, port)
    while not stopping.is_set():
        if args.exit_when_done and app.jobs.idle():
            # the final model's downloads first (bounded), then time to read the STOP task
            give_up = time.monotonic() + args.final_model_grace_s
            while app.jobs.final.awaited(app.registry.connected()) \
                    and not stopping.is_set() and time.monotonic() < give_up:
                stopping.wait(0.2)
            stopping.wait(2.0)
            break
        stopping.wait(0.2)
    app.stop()
    log_event(log, "stopped", job=app.job_id, job_state=app.engine.job_state)
    if args.exit_when_done and app.engine.job_state == "failed":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
