"""bench.sized_server with Python's allocations traced (benchmarks only).

    python -m bench.traced_server --trace_dir DIR <bench.sized_server flags>

Why: to tell the server's per-connection memory held by Python objects (the serving
bridge's per-call state, the task feed's generators) from gRPC's C core and the TLS
library, which tracemalloc does not see. While the server runs, a file
DIR/request-<tag> makes this process write DIR/trace-<tag>.json: the traced total
and the top allocation sites by size (text, no pickle), then delete the request; a
tag starting with "trim" also calls glibc's malloc_trim(0) first and records the RSS
before and after it (what of the RSS is free heap glibc kept, not live memory). Every
answer also counts the live torch tensors and their storages' bytes, and live
per-call objects (CALL_TYPES).
Tracing slows the server: round times from it are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
import threading
import tracemalloc
from pathlib import Path

POLL_S = 0.2
# per-call objects counted live: the serving bridge's and grpc.aio's (a call's C state
# lives as long as its Python objects do)
CALL_TYPES = ("ThreadContext", "_Run", "_Buffer", "Idle", "_ServicerContext", "RPCState",
              "_SyncServicerContext")
TOP = 40


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _tensors() -> dict[str, int]:
    """Live torch tensors and the bytes of their distinct storages (tracemalloc does
    not see torch's allocations)."""
    import gc

    import torch

    storages: dict[int, int] = {}
    count = 0
    calls: dict[str, int] = dict.fromkeys(CALL_TYPES, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in calls:
            calls[name] += 1
        if isinstance(obj, torch.Tensor):
            count += 1
            with contextlib.suppress(Exception):  # a tensor without storage (meta, sparse)
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return {"torch_tensors": count, "torch_storage_bytes": sum(storages.values()),
            **{f"live_{k}": v for k, v in calls.items()}}


def _answer(trace_dir: Path, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        for request in trace_dir.glob("request-*"):
            tag = request.name.removeprefix("request-")
            trimmed: dict[str, int] = {}
            if tag.startswith("trim"):
                trimmed["rss_before_trim"] = _rss()
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                trimmed["rss_after_trim"] = _rss()
            # the snapshots' own memory (tracemalloc.py) is not the server's
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            stats = snapshot.statistics("lineno")
            out = {**trimmed, **_tensors(), "traced": sum(s.size for s in stats),
                   "top": [{"where": str(s.traceback[0]), "bytes": s.size, "count": s.count}
                           for s in stats[:TOP]]}
            del snapshot, stats
            tmp = trace_dir / f"trace-{tag}.tmp"
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(trace_dir / f"trace-{tag}.json")
            request.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--trace_dir", type=Path, required=True)
    ours, rest = pre.parse_known_args(argv)
    ours.trace_dir.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(1)
    stop = threading.Event()
    threading.Thread(target=_answer, args=(ours.trace_dir, stop), name="trace",
                     daemon=True).start()
    from bench import sized_server

    try:
        return sized_server.main(rest)
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
