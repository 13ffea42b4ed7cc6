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
(`collect_round_garbage`): a tenth of a millisecond, and garbage lives one round at most.
"""

from __future__ import annotations

import gc

from fl_core.constants import GC_GEN0_THRESHOLD


def settle_after_startup() -> None:
    """Call once the daemon is ready: freeze the start-up heap, collect young
    objects less often. Idempotent (a second freeze adds what was made since)."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)


def collect_round_garbage() -> None:
    """Collect the two young generations: what a round left in reference cycles."""
    gc.collect(1)
