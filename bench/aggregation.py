"""Aggregation throughput: the real FedAvg strategy against a plain numpy weighted sum.

    python -m bench.aggregation [--updates 8] [--mb 100] [--runs 5]

Both fold the same `--updates` float32 deltas of `--mb` MB (the sized model's
layout: 16 MiB tensors) into the next global model, in one process, interleaved
per repetition; medians of `--runs`. Throughput is GB of update folded per second.

  numpy      acc = 0; for each update: tmp = u * n_k; acc += tmp (preallocated tmp);
             new = global + acc / sum(n_k)  -- what a careful hand-written loop does
  fedavg     fl_server.strategies.make_strategy("fedavg"): begin_round, accept() per
             update (shape and finiteness checks, fold into the running sum),
             finish_round() (mean, add to global, finiteness check)
  fedavg/mmap  the same, the updates read from spool files through a private mapping
             as the server's aggregator hands them over (page cache, not heap)

Target: fedavg at 0.5 of numpy or better.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import MB, fmt, median, print_header, table, verdict, workdir
from bench.sized_model import make_state

TARGET = 0.5


def _numpy_fold(global_np: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
                weights: list[float]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for name, g in global_np.items():
        acc = np.zeros_like(g)
        tmp = np.empty_like(g)
        for u, w in zip(updates, weights, strict=True):
            np.multiply(u[name], w, out=tmp)
            acc += tmp
        acc /= total
        acc += g
        out[name] = acc
    return out


def _strategy_fold(global_state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                   weights: list[float]) -> dict[str, torch.Tensor]:
    from fl_server.strategies import make_strategy

    strategy = make_strategy("fedavg")
    strategy.begin_round(global_state)
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        strategy.accept(f"c{i}", u, int(w))
    return strategy.finish_round()


def _spool(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `state` to a file and map it back the way StreamAssembler.finish() does."""
    with open(path, "wb") as fh:
        for t in state.values():
            fh.write(t.numpy().tobytes())
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        buffer = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in state.items():
        nbytes = t.numel() * 4
        out[name] = torch.frombuffer(buffer, dtype=torch.float32, count=t.numel(),
                                     offset=offset).reshape(t.shape)
        offset += nbytes
    return out


def run(updates: int = 8, mb: int = 100, runs: int = 5) -> dict[str, Any]:
    params = mb * MB // 4
    global_state = make_state(params, seed=0)
    deltas = [make_state(params, seed=i + 1) for i in range(updates)]
    weights = [float(100 + 10 * i) for i in range(updates)]
    global_np = {k: v.numpy() for k, v in global_state.items()}
    deltas_np = [{k: v.numpy() for k, v in d.items()} for d in deltas]
    folded = updates * params * 4
    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads})
    times: dict[str, list[float]] = {"numpy": []}
    for n in thread_counts:
        times[f"fedavg, {n} thread(s)"] = []
        times[f"fedavg/mmap, {n} thread(s)"] = []
    with workdir("aggregation") as work:
        for run_no in range(runs):
            t0 = time.perf_counter()
            ref = _numpy_fold(global_np, deltas_np, weights)
            times["numpy"].append(time.perf_counter() - t0)
            for n in thread_counts:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                got = _strategy_fold(global_state, deltas, weights)
                times[f"fedavg, {n} thread(s)"].append(time.perf_counter() - t0)
                if run_no == 0:  # same numbers, to float32 rounding
                    worst = max(float(np.max(np.abs(ref[k] - got[k].numpy()))) for k in ref)
                    assert worst < 1e-5, f"fedavg differs from numpy by {worst}"
                del got
                spooled = [_spool(work / f"u{i}.spool", d) for i, d in enumerate(deltas)]
                t0 = time.perf_counter()
                got = _strategy_fold(global_state, spooled, weights)
                times[f"fedavg/mmap, {n} thread(s)"].append(time.perf_counter() - t0)
                del got, spooled
            torch.set_num_threads(default_threads)
            del ref
    base = median(times["numpy"])
    rows = []
    summary: dict[str, Any] = {"updates": updates, "mb": mb}
    for name, ts in times.items():
        s = median(ts)
        rows.append([name, f"{s:.3f}", fmt(folded / s / 1e9), fmt(base / s)])
        summary[f"{name}_GBps"] = folded / s / 1e9
        summary[f"{name}_ratio"] = base / s
    print_header(f"Aggregation: {updates} float32 updates of {mb} MB, median of {runs} runs")
    print(table(["path", "median s", "GB/s folded", "vs numpy"], rows))
    print()
    for n in thread_counts:
        ratio = summary[f"fedavg, {n} thread(s)_ratio"]
        mapped = summary[f"fedavg/mmap, {n} thread(s)_ratio"]
        print(f"- torch threads {n}: fedavg/numpy = {ratio:.2f} (target >= {TARGET}: "
              f"{verdict(ratio >= TARGET)}); from spool mappings {mapped:.2f}")
    summary["fedavg_ratio"] = summary["fedavg, 1 thread(s)_ratio"]
    sys.stdout.flush()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.aggregation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--mb", type=int, default=100, help="MB per update")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    summary = run(args.updates, args.mb, args.runs)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
