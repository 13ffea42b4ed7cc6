"""The new global model's two hashes, as the round engine takes them, against the same
two one after the other.

    python -m bench.model_hash [--mb 100] [--runs 7]

Each round the server hashes its new model twice: the transfer manifest's per-tensor
digests (FAST_DIGEST, BLAKE3, on the hashing pool) and the record's SHA-256 (one
sequential hash over the whole model). Both sit on the round's critical path, between
aggregation and the checkpoint.

  sequential  build_manifest(...), then state_sha256(...)
  engine      fl_server.rounds.hash_model (from PARALLEL_HASH_MIN_BYTES: the SHA-256
              on a thread of its own while the manifest is built)

Interleaved per repetition on the sized model's layout (16 MiB float32 tensors);
medians of `--runs`, and the ratio engine / sequential.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bench.sized_model import make_state
from fl_core.tensor_codec import FAST_DIGEST, build_manifest
from fl_server.rounds import hash_model
from fl_server.store import state_sha256


def sequential(state: dict[str, torch.Tensor]) -> None:
    build_manifest(state, digest=FAST_DIGEST)
    state_sha256(state)


def engine(state: dict[str, torch.Tensor]) -> None:
    hash_model(state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_hash", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100, help="model size in MB")
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    state = make_state(args.mb * 1_000_000 // 4)
    ways: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
        "sequential": sequential, "engine": engine}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(max(1, args.runs)):
        for name, way in ways.items():
            started = time.perf_counter()
            way(state)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"## The new model's hashes ({args.mb} MB, median of {args.runs})\n")
    print("| way | ms |\n| --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m * 1000:.1f} |")
    print(f"\nengine / sequential: {medians['engine'] / medians['sequential']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
