"""What a Status call costs the server once a job has many recorded rounds: every round
(as before StatusRequest.rounds_after, and still a first poll) against only the rounds
after the last one a poller holds.

    python -m bench.status [--rounds 2000] [--runs 7]

A real Store in a temporary folder with `--rounds` recorded rounds (ten hospitals'
metrics each, as a round records them), and the server's own reply builder
(fl_server.coordinator.build_job_status) with its serialisation; medians of `--runs`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fl_server.clients import ClientRegistry
from fl_server.coordinator import build_job_status
from fl_server.store import RoundSummary, Store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2000, help="recorded rounds in the job")
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    summary = RoundSummary(
        selected=10, reported=10, failed=0, seconds=0.5,
        metrics={"train_loss": 0.25, "wait_seconds": 0.1,
                 "clients": {f"hospital_{i}": {"epsilon_total": 1.5} for i in range(10)}})
    with tempfile.TemporaryDirectory(prefix="fl-bench-status-") as tmp:
        store = Store(Path(tmp) / "state")
        try:
            store.create_job("job", "sized", "fedavg", {"rounds": args.rounds},
                             total_rounds=args.rounds)
            store.save_initial_model("job", {"w": torch.zeros(4)})
            for r in range(1, args.rounds + 1):  # no checkpoints: only the rows matter
                store.record_failed_round("job", r, summary, reason="bench")
            job = store.get_job("job")
            assert job is not None
            registry = ClientRegistry()
            print(f"## Status with {args.rounds} recorded rounds (median of {args.runs})\n")
            print("| rounds sent | ms per call | reply bytes |\n| --- | --- | --- |")
            for after in (0, args.rounds - 1):
                times, size = [], 0
                for _ in range(max(1, args.runs)):
                    started = time.perf_counter()
                    size = len(build_job_status(job, registry, store, after)
                               .SerializeToString())
                    times.append(time.perf_counter() - started)
                sent = "every round" if after == 0 else f"after {after}"
                print(f"| {sent} | {statistics.median(times) * 1000:.1f} | {size} |")
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
