"""The long-running daemons' garbage-collector settings.

Why: a daemon imports torch, grpc, protobuf and the services before its first call:
about a million objects that live as long as the process. CPython's cyclic collector
scans every tracked object on each full collection, and its youngest generation is
collected after every 700 net container allocations, which a single gRPC call
(messages, futures, frames, closures) nearly reaches: on the small model's round the
collector was ~3% of the server's CPU (perf), in part rescanning the start-up heap.
`gc.freeze()` moves what exists once the daemon is ready out of the collector's view
(it is never freed anyway), and a larger first threshold makes young collections
rarer; cycles are still collected, only less often. Less often means a cycle that
holds native memory (buffers, mappings) could outlive its round by many rounds, so
the round engine also collects the young generations after every round
(`collect_round_garbage`): a tenth of a millisecond.

Those young collections promote whatever is still alive at a round's end (its state,
its hospitals' shares and updates) into the oldest generation, where it becomes garbage
a round later. CPython collects that generation only from an automatic collection, once
a quarter as many objects as its last full collection found have been promoted, and the
last one (in `settle_after_startup`, before the freeze) found the whole start-up heap:
about 250,000 promotions, thousands of rounds. The server grew by ~35 KB a round (the
demo's secure rounds) until then. So the old generation is collected too, at most every
GC_FULL_INTERVAL_S: after the freeze it holds only what was made since start-up.
"""

from __future__ import annotations

import gc
import threading
import time

from fl_core.constants import GC_FULL_INTERVAL_S, GC_GEN0_THRESHOLD

_full = {"at": time.monotonic()}
_full_lock = threading.Lock()


def settle_after_startup() -> None:
    """Call once the daemon is ready: freeze the start-up heap, collect young
    objects less often. Idempotent (a second freeze adds what was made since)."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)


def collect_round_garbage() -> bool:
    """Collect the two young generations (what a round left in reference cycles), and
    every generation once GC_FULL_INTERVAL_S have passed since the last time (what
    earlier rounds left in the old one). True when it was a full collection."""
    now = time.monotonic()
    with _full_lock:
        full = now - _full["at"] >= GC_FULL_INTERVAL_S
        if full:
            _full["at"] = now
    gc.collect(2 if full else 1)
    return full
