"""`make demo`: a whole federation on this machine, in one command.

    python -m fl_demo [--model_type breast_cancer] [--hospitals 3] [--rounds 5] [--out demo_out]
                      [--epsilon 3] [--sweep_epsilon 1,2,3,8,inf [--seeds 0,1,2]]

Privacy: each hospital gets a budget for the whole job (--epsilon, default 3, or 8
for the image tasks) and plans its own noise to land at or under it after the last
round. --sweep_epsilon runs the whole demo once per budget (and per seed) and plots
the privacy-utility curve (fl_demo/sweep.py).

Five steps, each the way a real deployment does it, only on loopback:
1. keys: a private CA and server certificate; each hospital makes its own key and a
   CSR, which the CA signs (the hospital's key never leaves its folder); an admin
   certificate for the operator's Status calls;
2. data: the task's own partitioner gives each hospital a label-skewed share
   (Dirichlet alpha) and keeps a held-out test set, so federating visibly matters;
3. federation: the server daemon and one client daemon per hospital, as separate
   processes over mutual TLS, training with DP-SGD; a live table is printed from
   the server's Status RPC as each round completes;
4. local-only: each hospital's model trained on its own data alone, same settings;
5. report: report.json, report.png and a closing comparison table.

Every process started is stopped on the way out: on success, on error, on Ctrl-C
(SIGINT) and on SIGTERM/SIGHUP. A failure prints what failed and the tail of that
process's log, and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import numpy as np

from fl_core.constants import TRAINING_DEVICES
from fl_demo.launcher import Federation, LaunchError, make_pki
from fl_demo.live import RoundRow, StatusWatcher, finite
from fl_demo.report import LABELS, plot, print_summary, second_metric, write_json
from fl_demo.settings import FALLBACK_PROFILE, PROFILES, DemoSettings
from fl_demo.table import Table, fmt, short_name
from fl_server.store import DB_NAME

MARKER = ".fl_demo"  # only a folder holding this (or an empty one) is ever deleted
POLL_S = 0.5
CLIENT_EXIT_WAIT_S = 30.0
SERVER_START_TIMEOUT_S = 90.0


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what failed and shows its log."""


class Interrupted(BaseException):
    """A stop signal arrived (Ctrl-C, SIGTERM, SIGHUP). A BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# --- command line --------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from fl_models.registry import TASK_NAMES

    p = argparse.ArgumentParser(
        prog="python -m fl_demo",
        description="Run a whole federation on loopback: keys through the CSR path, a"
                    " server and one client daemon per hospital over mutual TLS, DP"
                    " training rounds with a live table, then the global model beside"
                    " each hospital's local-only model (report.json, report.png).")
    p.add_argument("--model_type", default="breast_cancer", choices=TASK_NAMES,
                   help="the task to federate (default breast_cancer: real Wisconsin data)")
    p.add_argument("--out", type=Path, default=Path("demo_out"),
                   help="demo folder, deleted and recreated each run (default ./demo_out)")
    p.add_argument("--hospitals", type=int, default=3, help="client daemons (default 3)")
    p.add_argument("--rounds", type=int, help="federation rounds (default: per model)")
    p.add_argument("--local_epochs", type=int,
                   help="local epochs per round (default: the task's DP-tuned hyperparams)")
    p.add_argument("--epsilon", "--epsilon_per_hospital", dest="epsilon", type=epsilon_value,
                   help="each hospital's privacy budget for the whole job (delta 1e-5):"
                        " it plans its noise to end at or under it; 'inf' trains without"
                        " DP (default: 3, 8 for the image tasks)")
    p.add_argument("--noise_multiplier", type=float,
                   help="a fixed DP-SGD noise multiplier instead of a planned budget")
    p.add_argument("--sweep_epsilon", type=epsilon_list, metavar="E1,E2,...",
                   help="run the demo once per budget (e.g. 1,2,3,8,inf) and plot the global"
                        " model's accuracy and AUC against epsilon beside each hospital"
                        " alone (report.png, sweep.json)")
    p.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                   help="with --sweep_epsilon: data split and init seeds to average over"
                        " (default: --seed)")
    p.add_argument("--epsilon_budget", type=float,
                   help="each hospital's total epsilon budget (default: per model, 20)")
    skew = p.add_mutually_exclusive_group()
    skew.add_argument("--alpha", type=float, default=0.5,
                      help="Dirichlet label skew across hospitals; smaller is more skewed"
                           " (default 0.5)")
    skew.add_argument("--iid", action="store_true", help="split the data IID instead")
    p.add_argument("--samples", type=int,
                   help="examples to generate (synthetic tasks only; default: per model)")
    p.add_argument("--learning_rate", type=float,
                   help="local learning rate (default: per model, else the task's)")
    p.add_argument("--seed", type=int, default=0, help="data split and model init seed")
    p.add_argument("--strategy", help="server aggregation strategy (default: per model,"
                                      " else fedavg)")
    p.add_argument("--no_secure_aggregation", action="store_true",
                   help="let the server see each hospital's update (by default it sees only"
                        " their sum: SecAgg+)")
    p.add_argument("--no_baseline", action="store_true",
                   help="skip training the local-only models (faster)")
    p.add_argument("--fed_eval", action="store_true",
                   help="also have each hospital score every global model on its own test"
                        " split (the server always scores it on the held-out test set)")
    p.add_argument("--timeout_s", type=float, default=600.0,
                   help="give up if the federation has not finished by then (default 600)")
    p.add_argument("--device", default="cpu", choices=TRAINING_DEVICES,
                   help="where the hospitals train, in their daemons and for the local-only"
                        " models (auto: cuda when available; default cpu)")
    p.add_argument("--server_arg", action="append", default=[], metavar="ARG",
                   help="extra flag passed to the server daemon, repeatable"
                        " (e.g. --server_arg=--quorum --server_arg=1.0)")
    return p


def epsilon_value(text: str) -> float:
    """A positive budget, or inf (no DP)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be positive or inf, got {text!r}")
    return value


def epsilon_list(text: str) -> list[float]:
    values = [epsilon_value(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one epsilon")
    return values


def seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers: {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> DemoSettings:
    return parse_all(argv)[0]


def parse_all(argv: Sequence[str] | None = None
              ) -> tuple[DemoSettings, list[float] | None, list[int] | None]:
    """The run's settings, and the sweep's budgets and seeds when one was asked for."""
    parser = build_parser()
    args = parser.parse_args(argv)
    profile = PROFILES.get(args.model_type, FALLBACK_PROFILE)
    if args.noise_multiplier and args.epsilon:
        raise ValueError("--noise_multiplier and --epsilon are alternatives; give one")
    if args.seeds and not args.sweep_epsilon:
        raise ValueError("--seeds goes with --sweep_epsilon")
    epsilon: float | None = args.epsilon or profile.epsilon_per_hospital
    if args.noise_multiplier:
        epsilon = None  # a fixed noise multiplier, as before budgets were planned
    settings = DemoSettings(
        model_type=args.model_type, out=args.out, hospitals=args.hospitals,
        rounds=args.rounds or profile.rounds,
        local_epochs=args.local_epochs or profile.local_epochs,
        noise_multiplier=args.noise_multiplier or profile.noise_multiplier,
        epsilon_per_hospital=epsilon,
        epsilon_budget=args.epsilon_budget or profile.epsilon_budget,
        alpha=None if args.iid else args.alpha,
        samples=args.samples or profile.samples,
        learning_rate=args.learning_rate or profile.learning_rate, seed=args.seed,
        strategy=args.strategy or profile.strategy,
        secure_aggregation=not args.no_secure_aggregation,
        baseline=not args.no_baseline, fed_eval=args.fed_eval,
        timeout_s=args.timeout_s, device=args.device,
        extra_server_args=(() if args.strategy else profile.strategy_args)
        + tuple(args.server_arg))
    settings.validate()
    return settings, args.sweep_epsilon, args.seeds


# --- the run -------------------------------------------------------------------------
@dataclass
class DemoState:
    """What a run has done so far: enough to clean up and to report a failure."""

    settings: DemoSettings
    started: float = field(default_factory=time.monotonic)
    pids: dict[str, int] = field(default_factory=dict)
    rows: list[RoundRow] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    job_id: str = ""

    def write_pids(self) -> None:
        path = self.settings.out / "pids.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pids, indent=2))
        os.replace(tmp, path)


def run_demo(settings: DemoSettings, stream: TextIO = sys.stdout,
             started: float | None = None) -> dict[str, Any]:
    """Run every step; returns the report (also written to report.json). `started`
    (time.monotonic()) is when the command began, so the wall time counts imports.

    Raises DemoError (or LaunchError) on failure and Interrupted on a stop signal,
    in both cases after every started process has been stopped."""
    from fl_models.registry import get_task

    # Absolute: the daemons run with the demo folder as their working directory.
    settings = replace(settings, out=settings.out.resolve())
    state = DemoState(settings)
    if started is not None:
        state.started = started
    out = settings.out
    say = _printer(stream)
    prepare_out_dir(out)
    try:
        task = get_task(settings.model_type,
                        **({"samples": settings.samples} if settings.samples else {}))
    except TypeError:  # a real-data task takes no sample count
        task = get_task(settings.model_type)
    names = settings.hospital_names
    skew = f"label skew alpha={settings.alpha}" if settings.alpha is not None else "IID split"
    epochs = settings.local_epochs or task.hyperparams.local_epochs
    say(f"fl demo: {settings.model_type}, {settings.hospitals} hospitals, {settings.rounds}"
        f" rounds x {epochs} local epochs, {privacy_text(settings)}, {skew} -> {_show(out)}/")

    with _timed(state, "keys"):
        say("[1/5] keys: CA + server certificate; each hospital's own key + CSR, signed by"
            " the CA; an admin certificate for the operator")
        make_pki(out, names)
    with _timed(state, "data"):
        data_dir = out / "data"
        task.prepare(data_dir, settings.hospitals, settings.alpha, settings.seed)
        data = describe_data(task, data_dir, names)
        say(f"[2/5] data: {_data_line(data)}; held-out test set: {data['test_examples']}")
    for warning in budget_warnings(task, settings, data):
        say(f"      warning: {warning}")
    with _timed(state, "federation"):
        say(f"[3/5] federation: server + {settings.hospitals} client daemons over mutual TLS"
            f" on 127.0.0.1 (logs in {_show(out / 'logs')})")
        fed = Federation(out, names, settings.model_type)
        try:
            run_federation(settings, fed, data_dir, state, stream)
        except BaseException as exc:
            _write_failure(state, exc)
            raise
        finally:
            with _shielded(stream):
                fed.stop_all(grace_s=10.0)
                _record_exit_codes(fed, state)
    local: list[Any] = []
    if settings.baseline:
        with _timed(state, "local_only"):
            say(f"[4/5] local-only models: each hospital alone, {settings.rounds} x"
                f" {epochs} epochs of DP-SGD on its own data")
            local = train_baselines(task, settings, data_dir, stream)
    else:
        say("[4/5] local-only models: skipped (--no_baseline)")
    with _timed(state, "report"):
        report = build_report(settings, task, data, state, local)
        plot(report, out / "report.png")
    report["phase_seconds"] = dict(state.phase_seconds)
    report["wall_seconds"] = round(time.monotonic() - state.started, 2)
    write_json(report, out / "report.json")
    print_summary(report, stream)
    say(f"[5/5] report: {_show(out / 'report.json')}, {_show(out / 'report.png')}"
        f"  (wall time {report['wall_seconds']:.0f} s)")
    return report


def run_federation(settings: DemoSettings, fed: Federation, data_dir: Path, state: DemoState,
                   stream: TextIO) -> None:
    """Start the daemons, print a row per completed round, and check every exit."""
    say = _printer(stream)
    server_args = [
        "--rounds", str(settings.rounds), "--min_clients", str(settings.hospitals),
        "--exit_when_done", "--eval_data", str(data_dir / "test"),
        "--strategy", settings.strategy, "--seed", str(settings.seed),
        "--round_deadline_s", "180", "--wait_for_clients_s", "120"]
    client_args = ["--epsilon_budget", str(settings.epsilon_budget), "--max_reconnect_s", "60",
                   "--device", settings.device]
    if settings.local_epochs:
        server_args += ["--local_epochs", str(settings.local_epochs)]
    if settings.epsilon_per_hospital is None:
        server_args += ["--noise_multiplier", str(settings.noise_multiplier)]
    elif settings.private:
        server_args += ["--epsilon_per_hospital", str(settings.epsilon_per_hospital)]
    else:  # the sweep's epsilon = inf point: the utility without any privacy
        server_args += ["--no_dp"]
        client_args += ["--allow_no_dp"]
    if settings.learning_rate:
        server_args += ["--learning_rate", str(settings.learning_rate)]
    server_args += ["--eval_deadline_s", "60"] if settings.fed_eval else ["--no_fed_eval"]
    if settings.secure_aggregation and settings.hospitals >= 2:
        server_args += ["--secure_aggregation"]
    server_args += settings.extra_server_args
    try:
        fed.start_server(server_args, timeout_s=SERVER_START_TIMEOUT_S)
    finally:
        if fed.server is not None:
            state.pids["server"] = fed.server.pid
            state.write_pids()
    for name in fed.hospitals:
        with _signals_blocked():  # a Ctrl-C now must not lose the new process's handle
            fed.start_client(name, data_dir / name, client_args)
        state.pids[name] = fed.clients[name].pid
        state.write_pids()
    say("      " + ", ".join(f"{k} pid {v}" for k, v in state.pids.items()))
    watcher = StatusWatcher(fed.admin_channel(), fed.hospitals,
                            fed.workdir / "server_state" / DB_NAME)
    table = RoundTable(fed.hospitals, stream)
    deadline = time.monotonic() + settings.timeout_s
    try:
        while True:
            for row in watcher.poll():
                table.add(row)
            assert fed.server is not None
            if fed.server.poll() is not None:
                break
            _check_clients(fed)
            if time.monotonic() > deadline:
                raise DemoError(f"the federation did not finish within {settings.timeout_s:.0f}"
                                f" s (phase {watcher.phase!r}, round {watcher.current_round});"
                                f" server log:\n{fed.tail('server.log')}")
            table.status(watcher)
            time.sleep(POLL_S)
        for row in watcher.catch_up():
            table.add(row)
    finally:
        table.clear_status()
        watcher.close()
    state.rows = table.rows
    state.job_id = watcher.job_id
    code = fed.server.returncode
    if code != 0:
        raise DemoError(f"the server {_exit_text(code)}; its log ends:\n"
                        + fed.tail("server.log"))
    _wait_clients(fed)
    done = [r for r in state.rows if r.state == "completed"]
    if len(done) < settings.rounds:
        raise DemoError(f"the server finished with {len(done)} of {settings.rounds} rounds"
                        " completed; its log ends:\n" + fed.tail("server.log"))


class RoundTable:
    """The live per-round table (and a one-line progress note on a terminal)."""

    def __init__(self, hospitals: list[str], stream: TextIO) -> None:
        self.hospitals = hospitals
        self.stream = stream
        self.rows: list[RoundRow] = []
        self.metric2 = ""
        self.table: Table | None = None
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._status_shown = False
        self._waiting_said = False

    def add(self, row: RoundRow) -> None:
        self.clear_status()
        if self.table is None:
            self.metric2 = second_metric({k[5:]: v for k, v in row.metrics.items()
                                          if k.startswith("eval_")})
            eps = [f"eps {short_name(h)}" for h in self.hospitals]
            self.table = Table(["round", "clients", "train loss", "eval acc",
                                f"eval {LABELS.get(self.metric2, self.metric2)}", *eps,
                                "seconds"], self.stream)
            self.stream.write("\n")
            self.table.header()
        self.rows.append(row)
        if row.state != "completed":
            self.stream.write(f"round {row.round}: {row.state} ({row.reported}/{row.selected}"
                              " updates); the server retries it\n")
            return
        m = row.metrics
        self.table.row([str(row.round), f"{row.reported}/{row.selected}",
                        fmt(m.get("train_loss"), 4), fmt(m.get("eval_accuracy")),
                        fmt(m.get(f"eval_{self.metric2}")),
                        *[fmt(row.epsilon.get(h), 2) for h in self.hospitals],
                        f"{row.seconds:.1f}"])

    def status(self, watcher: StatusWatcher) -> None:
        connected = f"round {watcher.current_round}/{watcher.total_rounds}: {watcher.phase}" \
            if watcher.phase else "waiting for the server's first Status answer"
        if self.tty:
            self.stream.write("\r      " + connected.ljust(70)[:70])
            self.stream.flush()
            self._status_shown = True
        elif not self._waiting_said and not self.rows:
            self.stream.write("      waiting for the hospitals to connect and train round 1\n")
            self.stream.flush()
            self._waiting_said = True

    def clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r" + " " * 76 + "\r")
            self.stream.flush()
            self._status_shown = False


def _check_clients(fed: Federation) -> None:
    """A client daemon that exited with an error ends the demo at once, with its log."""
    for name, proc in fed.clients.items():
        code = proc.poll()
        if code not in (None, 0):
            raise DemoError(f"client {name} {_exit_text(code)}; its log ends:\n"
                            + fed.tail(f"{name}.log"))


def _exit_text(code: int) -> str:
    """Says "exited with code 3", or "was killed by SIGKILL" for Popen's negative codes."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _wait_clients(fed: Federation) -> None:
    """After the job, each client reads its STOP task and exits 0 by itself."""
    deadline = time.monotonic() + CLIENT_EXIT_WAIT_S
    for name, proc in fed.clients.items():
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # still running: stop_all ends it; the job itself is done
            continue
        if code != 0:
            raise DemoError(f"client {name} {_exit_text(code)}; its log ends:\n"
                            + fed.tail(f"{name}.log"))


def _record_exit_codes(fed: Federation, state: DemoState) -> None:
    if fed.server is not None:
        state.exit_codes["server"] = fed.server.poll()
    for name, proc in fed.clients.items():
        state.exit_codes[name] = proc.poll()


def train_baselines(task: Any, settings: DemoSettings, data_dir: Path,
                    stream: TextIO) -> list[Any]:
    from fl_demo.baseline import federation_train_config, train_all_local
    from fl_models.training import training_device

    config = federation_train_config(task, settings.local_epochs, settings.noise_multiplier,
                                     settings.learning_rate, settings.epsilon_per_hospital,
                                     settings.rounds)
    test_set = task.load_split(data_dir / "test", "test")
    metric2 = second_metric(task.evaluate(task.build_model(), test_set))

    def done(result: Any) -> None:
        m = result.metrics
        stream.write(f"      {result.hospital} alone: accuracy {fmt(m.get('accuracy'))},"
                     f" {LABELS.get(metric2, metric2)} {fmt(m.get(metric2))},"
                     f" eps {result.epsilon:.2f} ({result.train_examples} training examples,"
                     f" {result.seconds:.1f} s)\n")
        stream.flush()

    return train_all_local(task, data_dir, settings.hospital_names, test_set, config,
                           settings.rounds, settings.seed, on_done=done,
                           epsilon_budget=settings.epsilon_budget,
                           device=training_device(settings.device))


# --- data and report -----------------------------------------------------------------
def describe_data(task: Any, data_dir: Path, hospitals: list[str]) -> dict[str, Any]:
    """Examples and training labels per hospital: the skew the federation has to bridge."""
    class_names = [str(c) for c in task.class_names]
    out: dict[str, Any] = {"class_names": class_names, "hospitals": {}}
    for name in hospitals:
        train = task.load_split(data_dir / name, "train")
        test = task.load_split(data_dir / name, "test")
        counts = np.bincount(train.tensors[1].numpy(), minlength=len(class_names))
        out["hospitals"][name] = {
            "train": len(train), "test": len(test),
            "train_classes": {c: int(n) for c, n in zip(class_names, counts, strict=False)}}
    out["test_examples"] = len(task.load_split(data_dir / "test", "test"))
    return out


def projected_epsilon(train_examples: int, batch_size: int, epochs: int,
                      noise_multiplier: float, delta: float) -> float:
    """The epsilon a hospital will have spent after `epochs` epochs of DP-SGD, as the
    trainer accounts it (Poisson sampling at rate 1/batches-per-epoch, RDP)."""
    from fl_client.privacy_ledger import rdp_epsilon

    batches = max(1, math.ceil(train_examples / batch_size))
    return rdp_epsilon([(noise_multiplier, 1.0 / batches, batches * epochs)], delta)


def budget_warnings(task: Any, settings: DemoSettings, data: dict[str, Any]) -> list[str]:
    """Say before the run if a hospital's budget cannot cover every round: its client
    will refuse the round that would exceed it, and the round then lacks its quorum.
    Only a fixed noise multiplier can do that: a planned budget never overruns."""
    if settings.epsilon_per_hospital is not None:
        return []
    hp = task.hyperparams
    out = []
    for name, info in data["hospitals"].items():
        eps = projected_epsilon(info["train"], hp.batch_size,
                                settings.rounds * (settings.local_epochs or hp.local_epochs),
                                settings.noise_multiplier, hp.delta)
        if eps > settings.epsilon_budget:
            out.append(f"{name} would spend epsilon {eps:.1f} over {settings.rounds} rounds,"
                       f" more than its budget {settings.epsilon_budget:g}: it will refuse"
                       " a late round (raise --epsilon_budget or --noise_multiplier, or"
                       " lower --rounds)")
    return out


def _data_line(data: dict[str, Any]) -> str:
    parts = []
    for name, info in data["hospitals"].items():
        classes = info["train_classes"]
        if len(classes) <= 3:
            mix = "/".join(f"{n} {c}" for c, n in classes.items())
        else:
            mix = f"{sum(1 for n in classes.values() if n)} of {len(classes)} classes"
        parts.append(f"{name} {info['train']} train ({mix})")
    return "; ".join(parts)


def build_report(settings: DemoSettings, task: Any, data: dict[str, Any], state: DemoState,
                 local: list[Any]) -> dict[str, Any]:
    completed = [r for r in state.rows if r.state == "completed"]
    last = completed[-1] if completed else None
    glob = {k[5:]: v for k, v in (last.metrics if last else {}).items() if k.startswith("eval_")}
    fed_local = {k[4:]: v for k, v in (last.metrics if last else {}).items()
                 if k.startswith("fed_")}
    metric2 = second_metric(glob)
    local_json = {r.hospital: {"metrics": finite(r.metrics),
                               "epsilon": r.epsilon if math.isfinite(r.epsilon) else None,
                               "train_examples": r.train_examples, "seconds": r.seconds}
                  for r in local}
    accuracies = [a for a in (r.metrics.get("accuracy", math.nan) for r in local)
                  if math.isfinite(a)]
    best_local = max(accuracies, default=None)
    settings_json = {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in asdict(settings).items()}
    settings_json.update(hospital_names=settings.hospital_names, dp=settings.private,
                         epsilon_per_hospital=(settings.epsilon_per_hospital
                                               if settings.private else None),
                         privacy=privacy_text(settings),
                         local_epochs=settings.local_epochs or task.hyperparams.local_epochs,
                         delta=task.hyperparams.delta, batch_size=task.hyperparams.batch_size,
                         learning_rate=settings.learning_rate or task.hyperparams.learning_rate,
                         max_grad_norm=task.hyperparams.max_grad_norm)
    return {
        "status": "ok",
        "model_type": settings.model_type,
        "job_id": state.job_id,
        "settings": settings_json,
        "data": data,
        "rounds": [r.as_json() for r in state.rows],
        "epsilon": finite(last.epsilon) if last else {},
        "epsilon_budget": settings.epsilon_budget,
        "final": {"global": finite(glob), "global_on_hospital_tests": finite(fed_local),
                  "local_only": local_json,
                  "local_only_note": "each hospital alone: same initial model, same"
                                     " TrainConfig and DP-SGD (budget, clipping), same"
                                     " rounds x local epochs, its own data only"},
        "comparison": {
            "metric": "accuracy", "second_metric": metric2,
            "global_accuracy": finite({"v": glob.get("accuracy", float("nan"))})["v"],
            "best_local_accuracy": best_local,
            "global_minus_best_local_accuracy": (
                glob["accuracy"] - best_local if best_local is not None and "accuracy" in glob
                else None)},
        "processes": dict(state.pids),
        "exit_codes": dict(state.exit_codes),
        "phase_seconds": dict(state.phase_seconds),
        "wall_seconds": time.monotonic() - state.started,
    }


def _write_failure(state: DemoState, exc: BaseException) -> None:
    """A short report.json even when the run failed, so scripts see what happened."""
    error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    with suppress(OSError):
        write_json({"status": "failed", "error": error, "processes": dict(state.pids),
                    "rounds": [r.as_json() for r in state.rows],
                    "wall_seconds": time.monotonic() - state.started},
                   state.settings.out / "report.json")


# --- plumbing ------------------------------------------------------------------------
def prepare_out_dir(out: Path) -> None:
    """Delete and recreate the demo folder, but only one the demo made (or an empty one)."""
    recreate_marked_dir(out, MARKER, "the demo", "python -m fl_demo", DemoError)


def recreate_marked_dir(out: Path, marker: str, owner: str, program: str,
                        error: type[Exception]) -> None:
    """Delete and recreate a tool's --out folder, but only one that tool made (it holds
    `marker`) or an empty one: a mistyped --out must never wipe someone's files. Shared
    by the demo and the simulator (fl_sim); `error` is the tool's own exception."""
    if out.exists():
        if not out.is_dir():
            raise error(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / marker).exists():
            raise error(f"--out {out} is not empty and was not made by {owner} (no {marker}"
                        " file in it); refusing to delete it. Pick another folder.")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / marker).write_text(f"made by {program}; deleted and recreated on each run\n")


@contextmanager
def _timed(state: DemoState, name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        state.phase_seconds[name] = round(time.monotonic() - started, 2)


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _printer(stream: TextIO) -> Callable[[str], None]:
    def say(text: str) -> None:
        stream.write(text + "\n")
        stream.flush()
    return say


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted, so `finally` blocks stop the daemons;
    the previous handlers come back afterwards (the demo may run inside a test)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold stop signals for a moment (they are delivered, and raise, right after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def _shielded(stream: TextIO) -> Iterator[None]:
    """While the daemons are being stopped, a second Ctrl-C must not cut that short and
    leave some running; stopping is bounded (SIGTERM, then SIGKILL after a grace)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(_signum: int, _frame: FrameType | None) -> None:
        stream.write("\n      (stopping the daemons; this takes at most a few seconds)\n")
        stream.flush()

    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def privacy_text(settings: DemoSettings) -> str:
    """How the run is private, for titles and the first line."""
    if settings.epsilon_per_hospital is None:
        return f"DP-SGD noise {settings.noise_multiplier:g}"
    if not settings.private:
        return "no DP (epsilon inf)"
    return f"DP-SGD, epsilon <= {settings.epsilon_per_hospital:g} per hospital"


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None,
         started: float | None = None) -> int:
    """Exit codes: 0 success, 1 the demo failed, 2 bad arguments, 128+N on signal N."""
    stream = stream or sys.stdout
    try:
        settings, sweep, seeds = parse_all(argv)
    except ValueError as exc:
        print(f"fl-demo: error: {exc}", file=sys.stderr)
        return 2
    with _stop_signals():
        try:
            if sweep:
                from fl_demo.sweep import run_sweep

                run_sweep(settings, sweep, seeds or [settings.seed], stream)
            else:
                run_demo(settings, stream, started)
        except Interrupted as exc:
            print(f"\nfl-demo: interrupted by {exc}; every process the demo started has been"
                  " stopped", file=sys.stderr)
            return 128 + exc.signum
        except (DemoError, LaunchError) as exc:
            print(f"\nfl-demo: error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a bug or bad data: the trace, then one clear line
            traceback.print_exc()
            print(f"\nfl-demo: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0
