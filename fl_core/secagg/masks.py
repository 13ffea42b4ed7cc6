"""The masking arithmetic: what a hospital adds, and what the server removes.

A hospital i sends  y_i = q_i + PRG(b_i) + sum_{j in N(i) and U2} sign(i, j) PRG(s_ij)
(mod 2^32) where q_i is its quantized update, b_i its self-mask seed, s_ij the seed
agreed with neighbour j (X25519 of the two mask keys, HKDF bound to the round and
the unordered pair), and sign(i, j) = +1 if i < j else -1, so the pair's masks
cancel when both are summed. U2 is the set of hospitals that shared their keys.

The server, summing y_i over the hospitals U3 that sent one, is left with
  sum q_i + sum_{i in U3} PRG(b_i) + sum_{i in U3, j in (U2 - U3) and N(i)} sign(i,j) PRG(s_ij)
and removes the first kind with the reconstructed b_i (survivors) and the second
with the reconstructed mask keys of the dropped hospitals j, never both for one
hospital (which would expose q_j).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_core.constants import PROTOCOL_VERSION
from fl_core.secagg import SecAggError
from fl_core.secagg.adverts import RoundId, lp
from fl_core.secagg.prg import SEED_BYTES, apply_masks

BAD_MASK_KEY = "BAD_MASK_KEY"


def pair_seed(own: X25519PrivateKey, peer_public: bytes, rid: RoundId, a: str, b: str) -> bytes:
    """The seed of the mask between a and b (the same from either side)."""
    low, high = sorted((a, b))
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError(BAD_MASK_KEY, f"mask key between {a} and {b} is invalid") from None
    info = lp(PROTOCOL_VERSION.encode(), b"secagg-pair-mask", rid.encode(), low.encode(),
              high.encode())
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def self_seed_key(seed: bytes, rid: RoundId, client_id: str) -> bytes:
    """The PRG key of a self-mask: the shared seed b_i bound to round and owner."""
    info = lp(PROTOCOL_VERSION.encode(), b"secagg-self-mask", rid.encode(), client_id.encode())
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(seed)


def sign(a: str, b: str) -> int:
    return 1 if a < b else -1


def own_masks(rid: RoundId, client_id: str, self_seed: bytes, mask_key: X25519PrivateKey,
              peer_mask_keys: Mapping[str, bytes]) -> list[tuple[bytes, int]]:
    """The (seed, sign) masks a hospital adds: its self-mask and one per neighbour."""
    masks = [(self_seed_key(self_seed, rid, client_id), 1)]
    masks += [(pair_seed(mask_key, public, rid, client_id, peer), sign(client_id, peer))
              for peer, public in sorted(peer_mask_keys.items())]
    return masks


def mask_in_place(vector: np.ndarray, rid: RoundId, client_id: str, self_seed: bytes,
                  mask_key: X25519PrivateKey, peer_mask_keys: Mapping[str, bytes]) -> None:
    """Turns a hospital's quantized vector into its masked input, in place."""
    apply_masks(vector, own_masks(rid, client_id, self_seed, mask_key, peer_mask_keys))


def self_mask_removals(rid: RoundId, seeds: Mapping[str, bytes]) -> list[tuple[bytes, int]]:
    """The (seed, sign) masks that take the survivors' self-masks out of the sum."""
    return [(self_seed_key(seed, rid, cid), -1) for cid, seed in sorted(seeds.items())]


def dropped_mask_removals(rid: RoundId, dropped: str, dropped_key: X25519PrivateKey,
                          survivors: Iterable[tuple[str, bytes]]) -> list[tuple[bytes, int]]:
    """The masks that take out what survivors added with a hospital that dropped: each
    survivor i added sign(i, dropped) * PRG(s_i,dropped)."""
    return [(pair_seed(dropped_key, public, rid, dropped, cid), -sign(cid, dropped))
            for cid, public in sorted(survivors)]


def remove_masks(total: np.ndarray, removals: list[tuple[bytes, int]]) -> None:
    """Applies every removal in one pass over the sum."""
    apply_masks(total, removals)
