"""SecAgg+ building blocks shared by the server and the hospitals.

Secure aggregation (Bonawitz et al., CCS 2017; the neighbour graph of Bell et al.,
CCS 2020) lets the server learn only the sum of the selected hospitals' updates:
each hospital adds pairwise masks that cancel in the sum and a self-mask whose seed
it secret-shares with its neighbours, so the server can remove the masks of the
hospitals that finished, and the pairwise masks of those that dropped, but never
both for the same hospital. The pieces here are pure functions and small classes;
the round protocol lives in fl_server/secagg_round.py and fl_client/secagg_client.py.

- shamir.py     t-of-n Shamir sharing of 32-byte secrets over GF(2^256 + 297)
- prg.py        AES-256-CTR masks added into a uint32 buffer chunk by chunk
- quantize.py   clipping, stochastic rounding into Z_2^32, dequantization and its bound
- graph.py      the neighbour graph (complete when small, k-regular otherwise), t and k
- adverts.py    key advertisements signed with the hospital's certificate key
- share_box.py  hospital-to-hospital encryption of shares (X25519 + HKDF + AES-GCM)
- masks.py      pairwise seeds and the masking/unmasking arithmetic over a vector
"""

from __future__ import annotations

# The one tensor a masked upload carries: the masked words as int32 (uint32 bits).
MASKED_TENSOR = "secagg.masked"


class SecAggError(Exception):
    """A secure-aggregation step that cannot proceed; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
