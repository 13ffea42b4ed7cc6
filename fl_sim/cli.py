"""`python -m fl_sim`: a federation of N virtual hospitals, simulated on Ray.

    python -m fl_sim --model_type breast_cancer --hospitals 100 --rounds 3 \
        [--strategy fedavg] [--alpha 0.5] [--epsilon_per_hospital 3] \
        [--dropout_rate 0.1] [--secure_aggregation] [--ray_address HOST:6379]

Steps: partition the data with the task's own `prepare` (one folder per hospital
and a held-out test set, as `python -m fl_models.prepare` writes them), start or
join Ray, run the rounds (see `fl_sim.engine`) and write report.json, report.png
and the final global model (global_model.safetensors) into --out. Each hospital's
privacy ledger is kept in --out/state, as its client daemon would keep it.
With --secure_aggregation every round is SecAgg+ with the daemons' own code (see
`fl_sim.secure`; key adverts are signed but not checked against a CA: a simulation
has no network adversary).

Exit codes: 0 done, 1 the simulated job failed (a round never reached its quorum),
2 bad arguments or data, 3 Ray missing or could not be started or joined. Every
failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from fl_demo.settings import FALLBACK_PROFILE, PROFILES
from fl_server.config import ConfigError, ServerConfig, parse_strategy_params
from fl_sim.cluster import RayUnavailable, SimError
from fl_sim.settings import SimSettings

MARKER = ".fl_sim"  # only a folder holding this (or an empty one) is ever deleted


def build_parser() -> argparse.ArgumentParser:
    from fl_models.registry import TASK_NAMES
    from fl_server.strategies import STRATEGY_NAMES

    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="python -m fl_sim",
        description="Simulate a federation of many virtual hospitals on Ray, with the"
                    " daemons' own trainer (Opacus DP-SGD), privacy ledgers, strategies"
                    " and round rules; updates pass through Ray's object store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_type", default="breast_cancer", choices=TASK_NAMES)
    p.add_argument("--hospitals", type=int, default=10, help="virtual hospitals")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strategy", default=d.strategy, choices=sorted(STRATEGY_NAMES))
    p.add_argument("--strategy_param", action="append", default=[], metavar="NAME=VALUE",
                   help="strategy parameter, repeatable (as the server takes it)")
    p.add_argument("--out", type=Path, default=Path("sim_out"),
                   help="output folder, deleted and recreated each run")
    data = p.add_argument_group("data")
    data.add_argument("--alpha", type=float,
                      help="Dirichlet label skew across hospitals (omit for IID)")
    data.add_argument("--partitions", type=int, default=0,
                      help="split the data into this many parts (0: one per hospital); with"
                           " fewer parts than hospitals, hospital k trains on part"
                           " ((k-1) mod parts)+1 (for scaling studies beyond the data's size)")
    data.add_argument("--samples", type=int,
                      help="examples to generate (synthetic tasks; default: the demo's)")
    data.add_argument("--data_dir", type=Path,
                      help="an already prepared folder (hospital_1..P and test, as"
                           " fl_models.prepare writes it) instead of preparing one")
    rounds = p.add_argument_group("round rules (as the server's flags)")
    rounds.add_argument("--seed", type=int, default=d.seed,
                        help="data split, model init, selection and task seeds")
    rounds.add_argument("--fraction", type=float, default=d.fraction)
    rounds.add_argument("--min_clients", type=int,
                        help="default: 1, or 2 with --secure_aggregation (as the server needs)")
    rounds.add_argument("--quorum", type=float, default=d.quorum)
    rounds.add_argument("--max_round_attempts", type=int, default=d.max_round_attempts)
    rounds.add_argument("--dropout_rate", type=float, default=0.0,
                        help="chance that a selected hospital drops out of a round (half"
                             " before training, half after it with the update lost)")
    rounds.add_argument("--local_epochs", type=int, help="default: the demo's for the model")
    rounds.add_argument("--batch_size", type=int, default=0, help="0: the task's")
    rounds.add_argument("--learning_rate", type=float,
                        help="default: the demo's for the model, else the task's")
    privacy = p.add_argument_group("privacy")
    privacy.add_argument("--no_dp", action="store_true",
                         help="train WITHOUT differential privacy (the hospitals allow it)")
    privacy.add_argument("--noise_multiplier", type=float, default=0.0,
                         help="a fixed DP noise multiplier instead of a planned budget")
    privacy.add_argument("--target_epsilon", type=float, default=0.0,
                         help="epsilon per round; overrides the noise multiplier")
    privacy.add_argument("--delta", type=float, default=0.0, help="0: the task's")
    privacy.add_argument("--max_grad_norm", type=float, default=0.0, help="0: the task's")
    privacy.add_argument("--epsilon_per_hospital", type=float,
                         help="each hospital's epsilon for the whole job: it plans its own"
                              " noise to spend at most this over --rounds, as the server's"
                              " flag asks (default: the demo's for the model, unless"
                              " --noise_multiplier or --target_epsilon fixes the noise)")
    privacy.add_argument("--epsilon_budget", type=float,
                         help="each hospital's lifetime epsilon budget: its ledger refuses"
                              " rounds beyond it (default: the demo's for the model)")
    secure = p.add_argument_group(
        "secure aggregation",
        "SecAgg+ with the daemons' own code (fl_core.secagg, the client's masking, the"
        " server's fold and unmasking): each hospital's delta is clipped, weighted,"
        " quantized and masked (pairwise masks over the SecAgg+ neighbour graph plus a"
        " self-mask, their seeds Shamir-shared t-of-(k+1)); the masked inputs are summed"
        " mod 2^32 and unmasked with the survivors' shares, so the strategy sees only the"
        " sum. Key adverts are signed but not checked against a CA (a simulation has no"
        " network and no server in the middle to substitute keys). FedAvg-family"
        " strategies only, as on the server.")
    secure.add_argument("--secure_aggregation", action="store_true",
                        help="securely aggregate every round (see above)")
    secure.add_argument("--secagg_threshold", type=float, default=d.secagg_threshold,
                        help="shares needed to rebuild a hospital's secrets: floor(this x"
                             " holders) + 1, holders = its neighbours + itself (>= 0.5)")
    secure.add_argument("--secagg_bits", type=int, default=d.secagg_bits,
                        help="fixed-point bits of a quantized update (scale 2^(bits-1) / clip)")
    secure.add_argument("--secagg_clip", type=float, default=d.secagg_clip,
                        help="each coordinate of an update is clipped to [-clip, clip];"
                             " the sum's error per coordinate is below"
                             " hospitals x clip / 2^(bits-1) (in weighted units)")
    ray = p.add_argument_group("Ray")
    ray.add_argument("--ray_address",
                     help="join this Ray cluster (HOST:PORT of `ray start --head`, or auto);"
                          " default: start Ray embedded on this machine")
    ray.add_argument("--num_cpus", type=int, default=0,
                     help="CPUs of embedded Ray (0: the machine's)")
    ray.add_argument("--cpus_per_hospital", type=float, default=1.0,
                     help="CPUs each pool worker reserves (its torch threads)")
    ray.add_argument("--gpus_per_hospital", type=float, default=0.0,
                     help="GPU each pool worker reserves, a fraction shares one (trains on"
                          " cuda when set)")
    ray.add_argument("--workers", type=int, default=0,
                     help="pool size (0: as many as the cluster's resources fit)")
    ray.add_argument("--ray_connect_timeout_s", type=float, default=60.0)
    ray.add_argument("--ray_logs", action="store_true",
                     help="show the Ray workers' own logs")
    p.add_argument("--progress_s", type=float, default=2.0,
                   help="seconds between progress lines within a round")
    p.add_argument("--no_plot", action="store_true", help="skip report.png")
    return p


def parse_args(argv: Sequence[str] | None = None) -> SimSettings:
    a = build_parser().parse_args(argv)
    # Unset knobs take the demo's quick per-model profile (fl_demo.settings), so a first
    # run learns within a few rounds and stays within each hospital's budget.
    profile = PROFILES.get(a.model_type, FALLBACK_PROFILE)
    fixed_noise = bool(a.noise_multiplier or a.target_epsilon or a.no_dp)
    per_job = _given(a.epsilon_per_hospital, 0.0 if fixed_noise
                     else profile.epsilon_per_hospital)
    try:
        params = parse_strategy_params(a.strategy_param)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    server = ServerConfig(
        model_type=a.model_type, rounds=a.rounds, strategy=a.strategy, strategy_params=params,
        fraction=a.fraction, min_clients=_given(a.min_clients,
                                                2 if a.secure_aggregation else 1),
        quorum=a.quorum,
        max_round_attempts=a.max_round_attempts,
        local_epochs=_given(a.local_epochs, profile.local_epochs or 0),  # 0: the task's
        batch_size=a.batch_size,
        learning_rate=_given(a.learning_rate, profile.learning_rate or 0.0),
        no_dp=a.no_dp, noise_multiplier=a.noise_multiplier, epsilon_per_hospital=per_job,
        target_epsilon=a.target_epsilon, delta=a.delta,
        max_grad_norm=a.max_grad_norm, seed=a.seed, fed_eval=False,
        secure_aggregation=a.secure_aggregation, secagg_threshold=a.secagg_threshold,
        secagg_bits=a.secagg_bits, secagg_clip=a.secagg_clip)
    settings = SimSettings(
        server=server, hospitals=a.hospitals, out=a.out, data_dir=a.data_dir, alpha=a.alpha,
        partitions=a.partitions, samples=_given(a.samples, profile.samples),
        epsilon_budget=_given(a.epsilon_budget, profile.epsilon_budget),
        dropout_rate=a.dropout_rate,
        ray_address=a.ray_address,
        num_cpus=a.num_cpus, cpus_per_hospital=a.cpus_per_hospital,
        gpus_per_hospital=a.gpus_per_hospital, workers=a.workers,
        ray_connect_timeout_s=a.ray_connect_timeout_s, progress_s=a.progress_s,
        plot=not a.no_plot, ray_logs=a.ray_logs)
    settings.validate()  # the server's checks: a strategy it refuses under SecAgg+ too
    if settings.secure_aggregation:
        _check_secure(settings)
    return settings


def _check_secure(settings: SimSettings) -> None:
    """The server's own secure-aggregation refusals (e.g. dp_fedavg's adaptive clip),
    before Ray starts."""
    from fl_server.strategies import make_strategy
    from fl_sim.secure import SimIdentity, secure_policy

    cfg = settings.server
    secure_policy(cfg, make_strategy(cfg.strategy, **cfg.strategy_params), SimIdentity.make(),
                  settings.out)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def prepare_out_dir(out: Path) -> None:
    """Delete and recreate --out, but only a folder the simulation made (or an empty one):
    the demo's rule, with the demo's helper."""
    from fl_demo.demo import recreate_marked_dir

    recreate_marked_dir(out, MARKER, "fl_sim", "python -m fl_sim", ValueError)


def _task(settings: SimSettings) -> Any:
    from fl_models.registry import get_task

    options = {"samples": settings.samples} if settings.samples else {}
    return get_task(settings.server.model_type, **options), options


def _data(task: Any, settings: SimSettings, say: Callable[[str], None]) -> Path:
    if settings.data_dir is not None:
        data_dir = settings.data_dir.resolve()
        for index in (1, settings.parts):
            if not (data_dir / f"hospital_{index}").is_dir():
                raise ValueError(f"--data_dir {data_dir} has no hospital_{index} folder (it"
                                 f" needs hospital_1..{settings.parts})")
        say(f"data: {data_dir} ({settings.parts} parts)")
        return data_dir
    data_dir = settings.out / "data"
    try:
        task.prepare(data_dir, settings.parts, settings.alpha, settings.server.seed)
    except ValueError as exc:
        hint = " (--partitions lets hospitals share parts)" if settings.parts > 1 else ""
        raise ValueError(f"cannot partition {task.name}: {exc}{hint}") from None
    skew = f"Dirichlet alpha={settings.alpha}" if settings.alpha is not None else "IID"
    say(f"data: {task.name} split into {settings.parts} parts ({skew}, seed"
        f" {settings.server.seed}) + a held-out test set in {data_dir}")
    return data_dir


def run(settings: SimSettings, stream: TextIO = sys.stdout,
        started: float | None = None) -> dict[str, Any]:
    """The whole simulation; returns the report (also written to --out).

    Ray comes first, so a cluster that is not there costs seconds, not a data split."""
    from fl_sim.cluster import ray_session

    started = time.monotonic() if started is None else started
    phases: dict[str, float] = {}

    def say(text: str) -> None:
        stream.write(text + "\n")
        stream.flush()

    settings = replace(settings, out=settings.out.resolve())
    prepare_out_dir(settings.out)
    mark = time.monotonic()
    with ray_session(settings) as ray:
        phases["ray_start"] = time.monotonic() - mark
        report = _simulate(ray, settings, say, started, phases)
    return report


def _simulate(ray: Any, settings: SimSettings, say: Callable[[str], None], started: float,
              phases: dict[str, float]) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from fl_demo.baseline import initial_state
    from fl_demo.report import write_json
    from fl_server.config import settle_job
    from fl_server.rounds import select_clients
    from fl_server.server import train_config
    from fl_server.strategies import make_strategy
    from fl_sim import report as sim_report
    from fl_sim.cluster import pool_size, start_pool
    from fl_sim.engine import Progress, SecureSetup, Simulation
    from fl_sim.secure import SimIdentity, secure_policy
    from fl_sim.worker import WorkerSpec

    cfg = settings.server
    out = settings.out
    mark = time.monotonic()
    task, options = _task(settings)
    data_dir = _data(task, settings, say)
    data = sim_report.describe(task, data_dir, settings)
    phases["data"] = time.monotonic() - mark
    settle_job(cfg, task.hyperparams)  # the task's defaults and the privacy mode, as a job
    strategy = make_strategy(cfg.strategy, **cfg.strategy_params)
    config = train_config(cfg, task, strategy.client_config())
    torch.set_num_threads(cfg.torch_threads)
    initial = initial_state(task, cfg.seed)
    test_dir = data_dir / "test"
    eval_set = task.load_split(test_dir, "test") if test_dir.is_dir() else None
    job_id = f"sim-{cfg.model_type}-seed{cfg.seed}"
    spec = WorkerSpec(model_type=cfg.model_type, task_options=options, data_dir=data_dir,
                      state_dir=out / "state", parts=settings.parts,
                      epsilon_budget=settings.epsilon_budget,
                      delta=cfg.delta or task.hyperparams.delta, allow_no_dp=cfg.no_dp,
                      device="cuda" if settings.gpus_per_hospital else "cpu",
                      torch_threads=max(1, int(settings.cpus_per_hospital)))
    # the largest round's size (the selection's count is the same every round)
    most = len(select_clients(settings.hospital_names, cfg.min_clients, cfg.fraction,
                              cfg.seed, job_id, 1, 1))
    resources = {k: float(v) for k, v in ray.cluster_resources().items()
                 if k in ("CPU", "GPU", "memory", "object_store_memory")}
    size = pool_size(settings, resources, most)
    where = settings.ray_address or "embedded"
    gpus = f", {resources['GPU']:g} GPU(s)" if resources.get("GPU") else ""
    gpu_each = f" + {settings.gpus_per_hospital:g} GPU" if settings.gpus_per_hospital else ""
    say(f"ray: {where}, {resources.get('CPU', 0):g} CPU(s){gpus}; pool of {size}"
        f" worker(s) x {settings.cpus_per_hospital:g} CPU{gpu_each} for"
        f" {settings.hospitals} hospitals")
    mark = time.monotonic()
    actors, devices = start_pool(ray, settings, spec, size)
    phases["pool_start"] = time.monotonic() - mark
    worker_devices = sorted(set(devices))
    say(f"workers train on {', '.join(worker_devices)}")
    say(f"job {job_id}: {cfg.rounds} rounds x {config.local_epochs} local epochs,"
        f" {cfg.strategy}, {sim_report.privacy_text(config)}, fraction {cfg.fraction:g},"
        f" quorum {cfg.quorum:g},"
        f" dropouts {settings.dropout_rate:g}"
        + (f", secure aggregation ({cfg.secagg_bits} bits, clip {cfg.secagg_clip:g})"
           if cfg.secure_aggregation else ""))
    secure = None
    if cfg.secure_aggregation:
        identity = SimIdentity.make()
        examples = {name: int(data["hospitals"][name]["train"])
                    for name in settings.hospital_names}
        secure = SecureSetup(secure_policy(cfg, strategy, identity, out / "state"), identity,
                             examples)
    spool_dir = out / "state" / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True)
    simulation = Simulation(ray, actors, cfg, strategy, task, config, settings.hospital_names,
                            job_id, settings.dropout_rate, eval_set,
                            Progress(say, cfg.rounds, settings.progress_s), spool_dir, secure)
    mark = time.monotonic()
    outcome = simulation.run(initial)
    phases["rounds"] = time.monotonic() - mark
    mark = time.monotonic()
    save_file({k: v.contiguous() for k, v in outcome.state.items()},
              str(out / "global_model.safetensors"))
    info = {"job_id": job_id, "engine": "ray", "ray_address": settings.ray_address,
            "cluster_resources": resources, "workers": size,
            "workers_at_end": len(simulation.actors),
            "cpus_per_hospital": settings.cpus_per_hospital,
            "gpus_per_hospital": settings.gpus_per_hospital,
            "worker_devices": worker_devices,
            "state_dir": str(out / "state"), "data_dir": str(data_dir),
            "hospital_rounds": sum(len(a.selected) for a in outcome.attempts),
            "phase_seconds": phases,
            "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1)}
    report = sim_report.build(settings, task, config, data, outcome, info, started)
    if settings.plot and report["rounds"]:
        sim_report.draw(report, out / "report.png")
    phases["report"] = time.monotonic() - mark
    report["simulation"]["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
    report["wall_seconds"] = round(time.monotonic() - started, 2)
    write_json(report, out / "report.json")
    if outcome.completed:
        last = report["final"]["global"]
        eps = [v for v in report["epsilon"].values() if v is not None]
        say(f"done in {report['wall_seconds']:.1f} s: global accuracy"
            f" {last.get('accuracy', float('nan')):.3f}; epsilon per hospital max"
            f" {max(eps, default=0.0):.2f} (lifetime budget {settings.epsilon_budget:g});"
            f" {out / 'report.json'}")
    return report


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    started = time.monotonic()
    stream = stream or sys.stdout
    try:
        settings = parse_args(argv)
    except (ValueError, ConfigError) as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(settings, stream, started)
    except RayUnavailable as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 3
    except SimError as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fl-sim: interrupted; Ray has been shut down", file=sys.stderr)
        return 130
    if report["status"] != "ok":
        print(f"fl-sim: error: the simulated job failed: {report.get('error', '')}",
              file=sys.stderr)
        return 1
    return 0
