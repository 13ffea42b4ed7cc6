"""Hospital-to-hospital encryption of Shamir shares.

The server relays every share, so each is sealed for its one receiver: X25519
between the sender's and the receiver's share keys (both signed adverts), HKDF-SHA256
with the ordered pair and the round in its info, AES-256-GCM with the same binding
as associated data. The server sees only ciphertext; a share moved to another
receiver, sender, round or session fails to open.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_core.constants import PROTOCOL_VERSION
from fl_core.secagg import SecAggError
from fl_core.secagg.adverts import RoundId, lp

BAD_SHARE_BOX = "BAD_SHARE_BOX"
_NONCE = 12


def _binding(rid: RoundId, sender: str, receiver: str) -> bytes:
    return lp(PROTOCOL_VERSION.encode(), b"secagg-share", rid.encode(), sender.encode(),
              receiver.encode())


def _key(own: X25519PrivateKey, peer_public: bytes, binding: bytes) -> bytes:
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError(BAD_SHARE_BOX, "peer share key is not a valid X25519 key") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=binding).derive(shared)


def seal(own: X25519PrivateKey, receiver_public: bytes, rid: RoundId, sender: str,
         receiver: str, plaintext: bytes) -> bytes:
    binding = _binding(rid, sender, receiver)
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(_key(own, receiver_public, binding)).encrypt(nonce, plaintext, binding)


def open_box(own: X25519PrivateKey, sender_public: bytes, rid: RoundId, sender: str,
             receiver: str, box: bytes) -> bytes:
    binding = _binding(rid, sender, receiver)
    if len(box) < _NONCE + 16:
        raise SecAggError(BAD_SHARE_BOX, f"share from {sender!r} is truncated")
    try:
        return AESGCM(_key(own, sender_public, binding)).decrypt(box[:_NONCE], box[_NONCE:],
                                                                 binding)
    except InvalidTag:
        raise SecAggError(BAD_SHARE_BOX, f"share from {sender!r} does not open (altered,"
                          " or sealed for another hospital or round)") from None
