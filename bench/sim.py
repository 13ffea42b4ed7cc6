"""Simulation cost: `python -m bench.sim [--hospitals 10 100 1000] [--real 10] [--reps 1]`.

For each N, `python -m fl_sim` with N virtual hospitals, breast_cancer, DP-SGD, 3
rounds, on embedded Ray with this machine's CPUs: wall time of the whole command,
the time of the rounds alone, and memory, sampled over the command's whole process
tree (the driver, Ray's daemons and the pool's workers): the peak of the summed RSS
(which counts shared library pages once per process) and of the summed anonymous
RSS (each process's own heap: what grows with N if anything does).

Against real client processes: the same task, settings and data split run as a real
federation (one server and one client daemon per hospital over mutual TLS, started
by `fl_demo.launcher`), and both sides give their cost per hospital-round: rounds'
seconds / (hospitals x rounds), and memory per hospital.

breast_cancer has 569 cases (455 after the held-out test set), so past ~100
hospitals the data is split into 100 parts and hospital k trains on part
((k-1) mod 100)+1 (`--partitions`): the per-hospital work stays that of 100
hospitals, which is what a cost benchmark needs.

`--robust 10 50 100 [--params 1000000]` measures instead what a strategy that needs
every update at once (median) costs the simulation's driver: N updates of a
`--params`-float model handed over as the engine hands them now (spooled to a file and
memory-mapped back, `fl_sim.engine.spool_update`), and as it did before (kept on the
heap), each in a fresh process: peak anonymous RSS (heap), peak RSS (heap plus the
mapped spool pages, which are page cache the kernel may drop) and the round's time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    REPO_ROOT,
    MiB,
    bench_env,
    machine_line,
    median,
    print_header,
    proc_status,
    table,
    workdir,
)

ROUNDS = 3
LOCAL_EPOCHS = 1
MAX_PARTS = 100  # breast_cancer: ~4 training cases per part at 100
BUDGET = "1000"  # no hospital refuses: the benchmark measures work done, not budgets
NOISE = 1.0  # a fixed noise multiplier, the same for both sides
SIM_TIMEOUT_S = 3600.0


def _parents_and_sessions() -> tuple[dict[int, list[int]], dict[int, int]]:
    kids: dict[int, list[int]] = {}
    sessions: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
        sessions[int(entry)] = int(fields[3])
    return kids, sessions


def tree(root: int) -> list[int]:
    """`root`, its descendants, and every process of its session: Ray's workers are
    re-parented to init, but stay in the session of the command that started Ray."""
    kids, sessions = _parents_and_sessions()
    found = {pid for pid, sid in sessions.items() if sid == root}
    todo = [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(kids.get(pid, []))
    return sorted(found)


class TreeSampler:
    """Peak summed RSS and anonymous RSS of a process tree, sampled on a thread."""

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_anon = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = anon = count = 0
            for pid in tree(self.root):
                try:
                    s = proc_status(pid)
                except OSError:
                    continue
                total += s.get("VmRSS", 0)
                anon += s.get("RssAnon", 0)
                count += 1
            self.peak_rss = max(self.peak_rss, total)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_procs = max(self.peak_procs, count)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_sim(work: Path, hospitals: int, cpus: int, secure: bool = False) -> dict[str, Any]:
    out = work / f"sim_{hospitals}{'_secure' if secure else ''}"
    parts = min(hospitals, MAX_PARTS)
    cmd = [PYTHON, "-m", "fl_sim", "--model_type", "breast_cancer", "--hospitals",
           str(hospitals), "--partitions", str(parts), "--rounds", str(ROUNDS),
           "--local_epochs", str(LOCAL_EPOCHS), "--epsilon_budget", BUDGET,
           "--noise_multiplier", str(NOISE),
           "--num_cpus", str(cpus), "--no_plot", "--progress_s", "60", "--out", str(out)]
    if secure:
        cmd.append("--secure_aggregation")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=bench_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    try:
        text, _ = proc.communicate(timeout=SIM_TIMEOUT_S)
    finally:
        sampler.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"fl_sim exited with {proc.returncode}:\n{text[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    sim = report["simulation"]
    phases = sim["phase_seconds"]
    return {"hospitals": hospitals, "secure": secure, "parts": parts, "wall_s": wall,
            "rounds_s": phases["rounds"], "ray_start_s": phases["ray_start"],
            "pool_start_s": phases["pool_start"], "hospital_rounds": sim["hospital_rounds"],
            "workers": sim["workers"], "peak_rss_mb": sampler.peak_rss / MiB,
            "peak_anon_mb": sampler.peak_anon / MiB, "processes": sampler.peak_procs,
            "driver_peak_mb": sim["peak_rss_mb_driver"],
            "accuracy": report["final"]["global"].get("accuracy")}


def run_real(work: Path, hospitals: int) -> dict[str, Any]:
    """The same job as real daemons: one server and `hospitals` client processes."""
    from fl_demo.launcher import Federation, make_pki
    from fl_models.registry import get_task

    fed_dir = work / f"real_{hospitals}"
    names = [f"hospital_{i}" for i in range(1, hospitals + 1)]
    make_pki(fed_dir, names)
    data = fed_dir / "data"
    get_task("breast_cancer").prepare(data, hospitals, None, 0)
    noise = NOISE
    started = time.monotonic()
    with Federation(fed_dir, names, "breast_cancer") as fed:
        fed.start_server(["--rounds", str(ROUNDS), "--min_clients", str(hospitals),
                          "--exit_when_done", "--no_fed_eval", "--local_epochs",
                          str(LOCAL_EPOCHS), "--noise_multiplier", str(noise),
                          "--eval_data", str(data / "test"), "--round_deadline_s", "600",
                          "--wait_for_clients_s", "600"])
        assert fed.server is not None
        sampler = TreeSampler(os.getpid())
        try:
            for name in names:
                fed.start_client(name, data / name, ["--epsilon_budget", BUDGET])
            code = fed.wait_server(timeout_s=SIM_TIMEOUT_S)
        finally:
            sampler.stop()
        if code != 0:
            raise RuntimeError(f"the server exited with {code}:\n{fed.tail('server.log')}")
    wall = time.monotonic() - started
    db = sqlite3.connect(fed_dir / "server_state" / "server.db")
    try:
        seconds = [float(r[0]) for r in db.execute(
            "SELECT seconds FROM rounds WHERE state='completed' ORDER BY round")]
    finally:
        db.close()
    own = proc_status("self")  # the benchmark's own process is in the sampled tree
    return {"hospitals": hospitals, "wall_s": wall, "rounds_s": sum(seconds),
            "hospital_rounds": hospitals * ROUNDS,
            "peak_rss_mb": (sampler.peak_rss - own.get("VmRSS", 0)) / MiB,
            "peak_anon_mb": (sampler.peak_anon - own.get("RssAnon", 0)) / MiB,
            "processes": sampler.peak_procs - 1}


def robust_child(mode: str, count: int, params: int, spool_dir: Path) -> dict[str, Any]:
    """One measurement (in its own process): `count` updates into a median round."""
    import torch

    from fl_proto import coordinator_pb2 as cpb
    from fl_server.config import ServerConfig
    from fl_server.strategies import make_strategy
    from fl_sim.engine import Attempt, Progress, Simulation
    from fl_sim.worker import OK, HospitalResult

    torch.set_num_threads(1)
    names = [f"hospital_{i}" for i in range(1, count + 1)]
    global_state = {"w": torch.zeros(params)}
    strategy = make_strategy("median")
    sim = Simulation(None, [], ServerConfig(strategy="median"), strategy, None,
                     cpb.TrainConfig(), names, "bench", 0.0, None,
                     Progress(lambda _: None, 1, 60.0), spool_dir=spool_dir)
    record = Attempt(1, 1, "failed", names)
    accepted: dict[str, dict[str, Any]] = {}
    gen = torch.Generator().manual_seed(0)
    base = proc_status()["RssAnon"]
    peak_anon = base
    started = time.perf_counter()
    strategy.begin_round(global_state)
    for name in names:
        delta = {"w": torch.randn(params, generator=gen)}  # as it arrives from Ray
        if mode == "spooled":
            sim._take(HospitalResult(name, OK, state=delta, num_examples=1), record, accepted,
                      global_state, None)
        else:  # before: the engine gave the strategy the update as it came
            strategy.accept(name, delta, 1)
        del delta
        peak_anon = max(peak_anon, proc_status()["RssAnon"])
    strategy.finish_round()
    seconds = time.perf_counter() - started
    status = proc_status()
    peak_anon = max(peak_anon, status["RssAnon"])
    return {"mode": mode, "updates": count, "params": params, "seconds": seconds,
            "anon_growth_mb": (peak_anon - base) / MiB, "peak_rss_mb": status["VmHWM"] / MiB}


def run_robust(work: Path, counts: list[int], params: int) -> None:
    print_header(f"Median round in the simulation's driver ({params:,} floats per update)")
    print(f"Machine: {machine_line()}; load average at start {os.getloadavg()[0]:.1f}\n",
          flush=True)
    rows = []
    for count in counts:
        for mode in ("heap (before)", "spooled"):
            spool = work / f"spool_{count}_{mode[:4]}"
            spool.mkdir()
            text = subprocess.run(
                [PYTHON, "-m", "bench.sim", "--robust_child", mode.split()[0], str(count),
                 str(params), str(spool)], cwd=REPO_ROOT, env=bench_env(), check=True,
                capture_output=True, text=True, timeout=SIM_TIMEOUT_S).stdout
            r = json.loads(text.strip().splitlines()[-1])
            rows.append([count, mode, r["updates"] * params * 4 / MiB, r["anon_growth_mb"],
                         r["peak_rss_mb"], r["seconds"]])
            print(f"  {mode} N={count}: heap +{r['anon_growth_mb']:.0f} MB, peak RSS"
                  f" {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s", flush=True)
    print()
    print(table(["updates", "kept", "updates' size MB", "peak heap growth MB",
                 "peak RSS MB", "round s"], rows))


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--robust_child"]:
        mode, count, params, spool = sys.argv[2:6]
        print(json.dumps(robust_child(mode, int(count), int(params), Path(spool))))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hospitals", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--real", type=int, default=10,
                   help="hospitals of the real-process federation to compare with (0: skip)")
    p.add_argument("--reps", type=int, default=1, help="runs of each size (medians shown)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="embedded Ray's CPUs (the pool's size)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--secure", type=int, nargs="*", default=[], metavar="N",
                   help="also run these sizes with --secure_aggregation")
    p.add_argument("--robust", type=int, nargs="+", metavar="N",
                   help="measure a median round's driver memory for N updates instead")
    p.add_argument("--params", type=int, default=1_000_000,
                   help="floats per update for --robust")
    args = p.parse_args(argv)
    if args.robust:
        with workdir("sim-robust", args.keep) as work:
            run_robust(work, args.robust, args.params)
        return 0
    print_header(f"Simulation on Ray (breast_cancer, DP-SGD, {ROUNDS} rounds x"
                 f" {LOCAL_EPOCHS} local epoch)")
    print(f"Machine: {machine_line()}; load average at start"
          f" {os.getloadavg()[0]:.1f}\n", flush=True)
    sims: list[dict[str, Any]] = []
    real: dict[str, Any] | None = None
    with workdir("sim", args.keep) as work:
        plan = [(n, False) for n in args.hospitals] + [(n, True) for n in args.secure]
        for n, secure in plan:
            runs = [run_sim(work, n, args.cpus, secure) for _ in range(args.reps)]
            row = {k: (median([r[k] for r in runs]) if isinstance(runs[0][k], float)
                       else runs[0][k]) for k in runs[0]}
            sims.append(row)
            print(f"  sim N={n}{' secure' if secure else ''}: wall {row['wall_s']:.1f} s,"
                  f" rounds {row['rounds_s']:.1f} s,"
                  f" peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        print()
        print(table(["hospitals", "secure agg.", "data parts", "pool workers", "wall s",
                     "Ray start s",
                     "pool start s", "rounds s", "ms per hospital-round",
                     "peak RSS MB (tree)", "peak anon MB (tree)", "driver peak MB",
                     "processes", "global accuracy"],
                    [[r["hospitals"], "yes" if r["secure"] else "no", r["parts"], r["workers"],
                      r["wall_s"], r["ray_start_s"],
                      r["pool_start_s"], r["rounds_s"],
                      1000 * r["rounds_s"] / r["hospital_rounds"], r["peak_rss_mb"],
                      r["peak_anon_mb"], r["driver_peak_mb"], r["processes"], r["accuracy"]]
                     for r in sims]), flush=True)
        if args.real:
            try:
                real = run_real(work, args.real)
            except (RuntimeError, OSError) as exc:
                print(f"\nthe real-process federation failed: {str(exc)[:2000]}")
                return 1
            print(f"\n  real N={args.real}: wall {real['wall_s']:.1f} s, rounds"
                  f" {real['rounds_s']:.1f} s, peak RSS {real['peak_rss_mb']:.0f} MB",
                  flush=True)
    if real is not None:
        same = next((r for r in sims if r["hospitals"] == real["hospitals"]
                     and not r["secure"]), None)
        print()
        rows = [["real processes (server + clients, mTLS)", real["hospitals"], real["wall_s"],
                 real["rounds_s"], 1000 * real["rounds_s"] / real["hospital_rounds"],
                 real["peak_rss_mb"], real["peak_rss_mb"] / real["hospitals"],
                 real["processes"]]]
        if same is not None:
            rows.append(["simulation (Ray pool)", same["hospitals"], same["wall_s"],
                         same["rounds_s"], 1000 * same["rounds_s"] / same["hospital_rounds"],
                         same["peak_rss_mb"], same["peak_rss_mb"] / same["hospitals"],
                         same["processes"]])
        print(table(["run", "hospitals", "wall s", "rounds s", "ms per hospital-round",
                     "peak RSS MB (tree)", "MB per hospital", "processes"], rows))
        if same is not None:
            ratio = (same["rounds_s"] / same["hospital_rounds"]) / (
                real["rounds_s"] / real["hospital_rounds"])
            print(f"\nper hospital-round, simulation / real processes: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
