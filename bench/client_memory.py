"""A hospital daemon's memory over many rounds: local DP training and its privacy ledger.

    python -m bench.client_memory [--rounds 200] [--task breast_cancer] [--every 25]

What the client daemon does once a round, in a loop: `train_round` on the task's model
(one local epoch, batch 32, noise multiplier 1.0) with a `PrivacyLedger` recording each
round, as many rounds as asked. It runs once per accountant, each in a fresh process so
one's heap is not the other's: RDP is the baseline measured in the same run (its cost
does not depend on a grid), PRV is the daemon's default (FFTs over a grid that changes
length as the ledger grows). Printed: the process's anonymous RSS every `--every`
rounds, and its growth per round over the second half of the rounds. A daemon that runs
for months must stay flat: before b35f69e, scipy.fft's cached plans took the PRV run to
765 MB at round 100 and 3.4 GB at round 400, against RDP's flat 306 MB.

Uses the data the task generates or a package ships (breast_cancer: scikit-learn's
Wisconsin set); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import bench_env, print_header, proc_status, table, verdict

ACCOUNTANTS = ("rdp", "prv")
# growth per round over the second half that still counts as flat: the heap's own
# high-water drift (a few KB), far below one cached FFT plan (~45 MB)
FLAT_KB_PER_ROUND = 50.0


def worker(accountant: str, task_name: str, rounds: int, every: int) -> None:
    """One accountant's loop; prints one JSON line per sample (round, anonymous MiB)."""
    import torch

    from fl_client.local_training import train_round
    from fl_client.privacy_ledger import PrivacyLedger
    from fl_models.registry import get_task
    from fl_proto import coordinator_pb2 as pb

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fl-bench-client-memory-") as tmp:
        root = Path(tmp)
        task = get_task(task_name)
        task.prepare(root, 2, None, 0)
        data = task.load_split(root / "hospital_1", "train")
        ledger = PrivacyLedger(root / "state", "hospital_1", 1e9, 1e-5, accountant=accountant)
        config = pb.TrainConfig(local_epochs=1, batch_size=32, seed=0, privacy=pb.PrivacyConfig(
            enabled=True, noise_multiplier=1.0, delta=1e-5))
        state = task.build_model().state_dict()
        started = time.perf_counter()
        for r in range(1, rounds + 1):
            train_round(task, state, data, config, torch.device("cpu"), ledger, False,
                        job_id="bench", round=r)
            if r % every == 0 or r == rounds:
                print(json.dumps({"round": r, "anon_mib": proc_status()["RssAnon"] / 2**20,
                                  "seconds": time.perf_counter() - started,
                                  "epsilon": ledger.spent()}), flush=True)


def _growth_kb_per_round(samples: list[dict[str, float]], rounds: int) -> float:
    """Least-squares slope of anonymous RSS over the second half of the rounds."""
    half = [s for s in samples if s["round"] > rounds / 2]
    if len(half) < 2:
        return float("nan")
    xs = [s["round"] for s in half]
    ys = [s["anon_mib"] * 1024 for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def run(task_name: str, rounds: int, every: int) -> int:
    runs: dict[str, list[dict[str, float]]] = {}
    for accountant in ACCOUNTANTS:
        print(f"running {rounds} rounds with the {accountant} ledger ...", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "bench.client_memory", "--worker", accountant,
             "--task", task_name, "--rounds", str(rounds), "--every", str(every)],
            capture_output=True, text=True, env=bench_env(), timeout=3600)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        runs[accountant] = [json.loads(line) for line in proc.stdout.splitlines()
                            if line.startswith("{")]
    print_header(f"Client daemon memory over {rounds} rounds ({task_name}, DP training + ledger)")
    by_round = {acc: {int(s["round"]): s for s in samples} for acc, samples in runs.items()}
    rows = []
    for r in sorted(by_round["rdp"]):
        rows.append([r, *(by_round[acc][r]["anon_mib"] if r in by_round[acc] else None
                          for acc in ACCOUNTANTS),
                     *(by_round[acc][r]["seconds"] if r in by_round[acc] else None
                       for acc in ACCOUNTANTS)])
    print(table(["round", "RDP anon MiB", "PRV anon MiB", "RDP s", "PRV s"], rows))
    print()
    slopes = {acc: _growth_kb_per_round(runs[acc], rounds) for acc in ACCOUNTANTS}
    for acc in ACCOUNTANTS:
        last = runs[acc][-1]
        print(f"- {acc}: {slopes[acc]:.1f} KB of anonymous memory per round over rounds "
              f"{rounds // 2 + 1}..{rounds}; epsilon spent {last['epsilon']:.2f}")
    flat = slopes["prv"] <= slopes["rdp"] + FLAT_KB_PER_ROUND
    print(f"- PRV's growth per round within {FLAT_KB_PER_ROUND:.0f} KB of RDP's: {verdict(flat)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.client_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=200, help="rounds per accountant (200)")
    p.add_argument("--task", default="breast_cancer", help="the task to train (breast_cancer)")
    p.add_argument("--every", type=int, default=25, help="sample every N rounds (25)")
    p.add_argument("--worker", choices=ACCOUNTANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 2 or args.every < 1:
        p.error("--rounds must be >= 2 and --every >= 1")
    if args.worker:
        worker(args.worker, args.task, args.rounds, args.every)
        return 0
    return run(args.task, args.rounds, args.every)


if __name__ == "__main__":
    sys.exit(main())
