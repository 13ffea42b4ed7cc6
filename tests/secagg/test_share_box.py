"""Shares are sealed hospital to hospital: only the receiver opens them, and only in
the round, session and direction they were sealed for."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fl_core.secagg import SecAggError
from fl_core.secagg.adverts import RoundId
from fl_core.secagg.share_box import open_box, seal

RID = RoundId("job", 1, "s1")


def test_round_trip_and_every_rebinding_fails() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    pa, pb = (k.public_key().public_bytes_raw() for k in (a, b))
    box = seal(a, pb, RID, "A", "B", b"share bytes")
    assert open_box(b, pa, RID, "A", "B", box) == b"share bytes"
    for own, pub, rid, snd, rcv in [
        (c, pa, RID, "A", "B"),                    # another hospital's key
        (b, pa, RoundId("job", 2, "s1"), "A", "B"),  # another round
        (b, pa, RoundId("job", 1, "s2"), "A", "B"),  # another attempt
        (b, pa, RID, "B", "A"),                    # direction reversed
        (b, pa, RID, "A", "C"),                    # another receiver named
    ]:
        with pytest.raises(SecAggError):
            open_box(own, pub, rid, snd, rcv, box)
    tampered = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(SecAggError):
        open_box(b, pa, RID, "A", "B", tampered)
    with pytest.raises(SecAggError):
        open_box(b, pa, RID, "A", "B", box[:10])
