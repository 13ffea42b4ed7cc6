"""Run every benchmark: `python -m bench` (full) or `python -m bench --quick`.

Each benchmark runs in its own Python process, one after another (they would only
disturb each other's timings side by side), and prints its own table of medians and
ratios; this runner adds the machine line and the wall time of each. Benchmarks are
measurements, not tests: a missed target is printed as MISSED, and the exit status
is non-zero only when a benchmark could not run.

    python -m bench --quick                 # ~5 minutes on 2 cores
    python -m bench                         # ~20-30 minutes on 2 cores
    python -m bench --only transfer rounds  # a subset
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import REPO_ROOT, bench_env, machine_line

BENCHES = ("transfer", "aggregation", "model_hash", "rounds", "round_floor", "status", "load",
           "dp_step", "client_memory")


def commands(quick: bool) -> dict[str, list[str]]:
    if quick:
        return {
            "transfer": ["--mib", "64", "--runs", "3"],
            "aggregation": ["--updates", "4", "--mb", "50", "--runs", "3"],
            "model_hash": ["--mb", "50", "--runs", "3"],
            "rounds": ["--quick"],
            "round_floor": ["--runs", "1", "--rounds", "50"],
            "status": ["--rounds", "500", "--runs", "3"],
            "load": ["--quick"],
            "dp_step": ["--reps", "5", "--warmup", "1"],
            "client_memory": ["--rounds", "60", "--every", "15"],
        }
    return {name: [] for name in BENCHES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    p.add_argument("--only", nargs="*", choices=BENCHES, help="run only these")
    args = p.parse_args(argv)
    print(f"# Benchmarks ({'quick' if args.quick else 'full'})")
    print()
    print(f"Machine: {machine_line()}")
    sys.stdout.flush()
    failed = []
    for name, extra in commands(args.quick).items():
        if args.only and name not in args.only:
            continue
        if not (REPO_ROOT / "bench" / f"{name}.py").exists():
            print(f"\n(bench.{name} not present: skipped)")
            continue
        cmd = [sys.executable, "-m", f"bench.{name}", *extra]
        print(f"\n$ python -m bench.{name} {' '.join(extra)}".rstrip(), flush=True)
        t0 = time.monotonic()
        env = bench_env()
        if name == "aggregation" and "OMP_NUM_THREADS" not in os.environ:
            del env["OMP_NUM_THREADS"]  # it compares 1 thread with torch's default itself
        rc = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        print(f"\n(bench.{name}: {time.monotonic() - t0:.0f} s, exit {rc})", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
