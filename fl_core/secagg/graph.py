"""Who masks with whom, and how many shares reconstruct a secret.

Bonawitz et al. mask every pair (the complete graph): each hospital's work and
messages grow like n. SecAgg+ (Bell et al., CCS 2020) masks only along a random
k-regular graph with k = O(log n), which keeps the sum hidden as long as the graph
stays connected after dropouts and collusion. Here:
- n <= SECAGG_COMPLETE_GRAPH_MAX: the complete graph (k = n - 1);
- otherwise a circulant (Harary) graph over a permutation of the participants: each
  hospital is joined to the k/2 nearest on either side, k even,
  k = 2 * ceil(SECAGG_DEGREE_FACTOR * log2(n) / 2) (25 -> 28 = complete, 50 -> 34,
  100 -> 40, 1000 -> 60).
The permutation is derived from the round's session id, so every hospital computes
the same graph from the participant list alone and need not trust the server's.

Each hospital's secrets are shared among its neighbours and itself (k + 1 holders);
t = floor(fraction * (k + 1)) + 1 of them reconstruct, so with the default fraction
0.5 any reconstruction needs more than half of a neighbourhood, and up to
k + 1 - t holders may drop out.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from fl_core.constants import SECAGG_COMPLETE_GRAPH_MAX, SECAGG_DEGREE_FACTOR
from fl_core.secagg import SecAggError

BAD_GRAPH = "BAD_GRAPH"


def neighbour_count(n: int) -> int:
    """k for n participants (see the module docstring)."""
    if n < 2:
        raise SecAggError(BAD_GRAPH, f"secure aggregation needs at least 2 hospitals, got {n}")
    if n <= SECAGG_COMPLETE_GRAPH_MAX:
        return n - 1
    k = 2 * math.ceil(SECAGG_DEGREE_FACTOR * math.log2(n) / 2)
    return min(n - 1, k)


def threshold(k: int, fraction: float) -> int:
    """Shares needed out of k + 1 holders."""
    if not 0.0 <= fraction < 1.0:
        raise SecAggError(BAD_GRAPH, f"threshold fraction must be in [0, 1), got {fraction}")
    return min(k + 1, max(2, math.floor(fraction * (k + 1)) + 1))


def neighbours(participants: Sequence[str], session_id: str) -> dict[str, tuple[str, ...]]:
    """Each participant's neighbours (sorted), the same on every hospital."""
    ids = sorted(participants)
    if len(set(ids)) != len(ids):
        raise SecAggError(BAD_GRAPH, "participant ids repeat")
    n = len(ids)
    k = neighbour_count(n)
    if k == n - 1:
        return {a: tuple(b for b in ids if b != a) for a in ids}
    seed = hashlib.sha256(f"fl.v1 secagg graph\0{session_id}".encode()).digest()
    order = list(ids)
    random.Random(seed).shuffle(order)
    half = k // 2
    out: dict[str, tuple[str, ...]] = {}
    for pos, a in enumerate(order):
        near = {order[(pos + d) % n] for d in range(-half, half + 1) if d != 0}
        out[a] = tuple(sorted(near))
    return out


def positions(participants: Sequence[str]) -> dict[str, int]:
    """Each participant's Shamir evaluation point (1-based position in sorted order)."""
    return {cid: i + 1 for i, cid in enumerate(sorted(participants))}
