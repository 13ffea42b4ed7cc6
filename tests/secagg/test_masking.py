"""The masking arithmetic end to end in memory (no protocol): masked inputs summed
mod 2^32 and unmasked with the survivors' self-seeds and the dropped hospitals'
reconstructed mask keys equal exactly the sum of the survivors' quantized inputs;
with too few shares the secret cannot be rebuilt."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.secagg import SecAggError
from fl_core.secagg.adverts import RoundId
from fl_core.secagg.graph import neighbours, positions, threshold
from fl_core.secagg.masks import (
    dropped_mask_removals,
    mask_in_place,
    remove_masks,
    self_mask_removals,
)
from fl_core.secagg.shamir import combine, split

RID = RoundId("job", 2, "sess")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), length=st.integers(1, 3000), data=st.data())
def test_unmasked_sum_is_exactly_the_survivors_sum(n: int, length: int,
                                                   data: st.DataObject) -> None:
    ids = [f"h{i:02d}" for i in range(n)]
    graph = neighbours(ids, RID.session_id)
    k = len(graph[ids[0]])
    t = threshold(k, 0.5)
    pos = positions(ids)
    keys = {c: X25519PrivateKey.generate() for c in ids}
    pubs = {c: keys[c].public_key().public_bytes_raw() for c in ids}
    seeds = {c: os.urandom(32) for c in ids}
    inputs = {c: np.frombuffer(os.urandom(4 * length), dtype=np.uint32).copy() for c in ids}
    # shares of each hospital's two secrets, held by its neighbours and itself
    holders = {c: [*graph[c], c] for c in ids}
    seed_shares = {c: split(seeds[c], t, [pos[h] for h in holders[c]]) for c in ids}
    key_shares = {c: split(keys[c].private_bytes_raw(), t, [pos[h] for h in holders[c]])
                  for c in ids}
    # hospitals that drop after sharing: any set that leaves every survivor's and every
    # dropped hospital's neighbourhood with t surviving holders, and at least one survivor
    order = data.draw(st.permutations(ids))
    dropped: set[str] = set()
    for c in order[: data.draw(st.integers(0, n - 1))]:
        trial = dropped | {c}
        if all(len([h for h in holders[x] if h not in trial]) >= t for x in ids):
            dropped = trial
    survivors = [c for c in ids if c not in dropped]
    total = np.zeros(length, dtype=np.uint32)
    for c in survivors:
        y = inputs[c].copy()
        mask_in_place(y, RID, c, seeds[c], keys[c], {p: pubs[p] for p in graph[c]})
        total += y
    # the server: survivors' self seeds, dropped hospitals' mask keys, from surviving holders
    def rebuild(shares: dict[int, bytes], owner: str) -> bytes:
        alive = {pos[h]: shares[pos[h]] for h in holders[owner] if h not in dropped}
        return combine(alive, t)
    removals = self_mask_removals(RID, {c: rebuild(seed_shares[c], c) for c in survivors})
    for d in sorted(dropped):
        sk = X25519PrivateKey.from_private_bytes(rebuild(key_shares[d], d))
        removals += dropped_mask_removals(RID, d, sk,
                                          [(s, pubs[s]) for s in graph[d] if s not in dropped])
    remove_masks(total, removals)
    expected = np.zeros(length, dtype=np.uint32)
    for c in survivors:
        expected += inputs[c]
    assert np.array_equal(total, expected)


def test_one_masked_input_alone_looks_nothing_like_the_input() -> None:
    ids = ["a", "b", "c"]
    keys = {c: X25519PrivateKey.generate() for c in ids}
    pubs = {c: keys[c].public_key().public_bytes_raw() for c in ids}
    x = np.zeros(1 << 14, dtype=np.uint32)  # a very structured input
    y = x.copy()
    mask_in_place(y, RID, "a", os.urandom(32), keys["a"], {p: pubs[p] for p in ("b", "c")})
    counts = np.bincount((y >> 24).astype(np.int64), minlength=256)
    assert float(((counts - y.size / 256) ** 2 / (y.size / 256)).sum()) < 400


def test_more_dropouts_than_n_minus_t_cannot_be_unmasked() -> None:
    ids = ["a", "b", "c", "d", "e"]
    pos = positions(ids)
    t = threshold(4, 0.5)  # 3 of 5
    secret = os.urandom(32)
    shares = split(secret, t, [pos[c] for c in ids])
    alive = {pos[c]: shares[pos[c]] for c in ("a", "b")}  # three dropped
    with pytest.raises(SecAggError) as err:
        combine(alive, t)
    assert err.value.code == "NOT_ENOUGH_SHARES"
