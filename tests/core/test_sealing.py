"""Sealing: round trips, and every way a chunk or stream can be tampered with is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fl_core import sealing as sl
from fl_core import tensor_codec as tc
from fl_proto import tensors_pb2

DIGEST = hashlib.sha256(b"manifest").digest()
CTX = sl.StreamContext("job-1", 3, "hospital_1", "up", "stream-a", DIGEST)


def agreed_secret(session_id: str = "session-1") -> bytes:
    server_private, server_public = sl.generate_keypair()
    client_private, client_public = sl.generate_keypair()
    server = sl.session_secret(server_private, client_public, session_id)
    client = sl.session_secret(client_private, server_public, session_id)
    assert server == client and len(server) == 32
    return server


SECRET = agreed_secret()
KEY = sl.stream_key(SECRET, CTX)
PLAINTEXTS = [os.urandom(100) for _ in range(4)] + [b"tail"]


def seal_all(ctx: sl.StreamContext = CTX, key: bytes = KEY) -> list[tensors_pb2.SealedChunk]:
    sealer = sl.StreamSealer(key, ctx)
    last = len(PLAINTEXTS) - 1
    return [sealer.seal(i, p, final=i == last) for i, p in enumerate(PLAINTEXTS)]


def open_code(
    chunks: list[tensors_pb2.SealedChunk], ctx: sl.StreamContext = CTX, key: bytes = KEY
) -> str:
    """Open chunks in order and return the code of the first refusal."""
    opener = sl.StreamOpener(key, ctx)
    with pytest.raises(sl.SealError) as err:
        for chunk in chunks:
            opener.open(chunk)
        opener.finish()
    return err.value.code


def copy(chunk: tensors_pb2.SealedChunk, **changes: object) -> tensors_pb2.SealedChunk:
    out = tensors_pb2.SealedChunk()
    out.CopyFrom(chunk)
    for field, value in changes.items():
        setattr(out, field, value)
    return out


def test_round_trip() -> None:
    chunks = seal_all()
    opener = sl.StreamOpener(KEY, CTX)
    assert [opener.open(c) for c in chunks] == PLAINTEXTS
    assert opener.done and opener.next_sequence == len(PLAINTEXTS)
    opener.finish()
    assert all(len(c.ciphertext) == len(p) + 16 for c, p in zip(chunks, PLAINTEXTS, strict=True))
    assert [c.final for c in chunks] == [False] * 4 + [True]


def test_codec_stream_through_seal() -> None:
    state = {"w": torch.randn(1000), "n": torch.tensor(4)}
    manifest = tc.build_manifest(state, chunk_size=512)
    ctx = dataclasses.replace(CTX, manifest_digest=sl.manifest_digest(manifest))
    key = sl.stream_key(SECRET, ctx)
    sealer, opener = sl.StreamSealer(key, ctx), sl.StreamOpener(key, ctx)
    assembler = tc.StreamAssembler(manifest, expected=state)
    for i, plain in enumerate(tc.iter_chunks(state, manifest)):
        sealed = sealer.seal(i, plain, final=i == manifest.chunk_count - 1)
        wire = tensors_pb2.SealedChunk.FromString(sealed.SerializeToString())
        assembler.add_chunk(i, opener.open(wire))
    opener.finish()
    got = assembler.finish()
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["n"], state["n"])


def test_wire_format_nonce_and_associated_data() -> None:
    """Pins the construction so another implementation can interoperate."""
    chunk = seal_all()[4]

    def lp(*fields: bytes) -> bytes:
        return b"".join(struct.pack(">I", len(f)) + f for f in fields)

    nonce = b"\0" * 4 + (4).to_bytes(7, "big") + b"\1"
    aad = lp(
        b"fl.v1",
        b"job-1",
        (3).to_bytes(8, "big"),
        b"hospital_1",
        b"up",
        b"stream-a",
        (4).to_bytes(8, "big"),
        b"\1",
        DIGEST,
    )
    assert AESGCM(KEY).decrypt(nonce, chunk.ciphertext, aad) == b"tail"


def test_flipped_bit_refused() -> None:
    chunks = seal_all()
    bad = bytearray(chunks[2].ciphertext)
    bad[7] ^= 0x10
    chunks[2] = copy(chunks[2], ciphertext=bytes(bad))
    assert open_code(chunks) == "SEAL_INVALID"
    tag = bytearray(chunks[0].ciphertext)
    tag[-1] ^= 1
    assert open_code([copy(chunks[0], ciphertext=bytes(tag))]) == "SEAL_INVALID"
    assert open_code([copy(chunks[0], ciphertext=b"short")]) == "SEAL_INVALID"


def test_swapped_chunks_refused() -> None:
    chunks = seal_all()
    swapped = [chunks[0], chunks[2], chunks[1], *chunks[3:]]
    assert open_code(swapped) == "OUT_OF_ORDER"
    # Relabelled so the sequence numbers look right: the nonce and AAD still differ.
    relabelled = [chunks[0], copy(chunks[2], sequence=1), copy(chunks[1], sequence=2)]
    assert open_code(relabelled) == "SEAL_INVALID"


@pytest.mark.parametrize(
    "change",
    [
        {"stream_id": "stream-b"},
        {"round": 4},
        {"client_id": "hospital_2"},
        {"direction": "down"},
        {"job_id": "job-2"},
        {"manifest_digest": hashlib.sha256(b"other").digest()},
    ],
    ids=lambda c: next(iter(c)),
)
def test_replay_from_another_stream_refused(change: dict[str, object]) -> None:
    other = dataclasses.replace(CTX, **change)  # type: ignore[arg-type]
    foreign = seal_all(other, sl.stream_key(SECRET, other))
    if "stream_id" in change:
        assert open_code(foreign) == "WRONG_STREAM"
        foreign = [copy(c, stream_id=CTX.stream_id) for c in foreign]
    assert open_code(foreign) == "SEAL_INVALID"
    # Even under the same key, the associated data alone tells the streams apart.
    same_key = [copy(c, stream_id=CTX.stream_id) for c in seal_all(other, KEY)]
    assert open_code(same_key) == "SEAL_INVALID"


def test_truncated_stream_refused() -> None:
    chunks = seal_all()
    opener = sl.StreamOpener(KEY, CTX)
    for chunk in chunks[:-1]:
        opener.open(chunk)
    assert not opener.done
    with pytest.raises(sl.SealError) as err:
        opener.finish()
    assert err.value.code == "TRUNCATED"
    # Passing the last chunk off as non-final (or an early one as final) fails too.
    assert open_code([*chunks[:-1], copy(chunks[-1], final=False)]) == "SEAL_INVALID"
    assert open_code([copy(chunks[0], final=True)]) == "SEAL_INVALID"


def test_chunk_after_final_refused() -> None:
    chunks = seal_all()
    extra = sl.StreamSealer(KEY, CTX, start_sequence=len(chunks)).seal(len(chunks), b"x", True)
    assert open_code([*chunks, extra]) == "AFTER_FINAL"
    sealer = sl.StreamSealer(KEY, CTX)
    sealer.seal(0, b"only", final=True)
    with pytest.raises(sl.SealError) as err:
        sealer.seal(1, b"more", final=False)
    assert err.value.code == "AFTER_FINAL"


def test_wrong_key_refused() -> None:
    assert open_code(seal_all(), key=os.urandom(32)) == "SEAL_INVALID"
    assert open_code(seal_all(), key=sl.stream_key(agreed_secret(), CTX)) == "SEAL_INVALID"


def test_sealer_refuses_nonce_reuse() -> None:
    sealer = sl.StreamSealer(KEY, CTX)
    sealer.seal(0, b"a", False)
    for sequence in (0, -1):
        with pytest.raises(sl.SealError) as err:
            sealer.seal(sequence, b"b", False)
        assert err.value.code == "OUT_OF_ORDER"
    with pytest.raises(sl.SealError):
        sealer.seal(sl.MAX_SEQUENCE + 1, b"c", False)


def test_resume_from_acknowledged_sequence() -> None:
    chunks = seal_all()
    first = sl.StreamOpener(KEY, CTX)
    first.open(chunks[0])
    first.open(chunks[1])
    # The connection drops; the sender re-seals from the receiver's next_sequence.
    resumed = sl.StreamSealer(KEY, CTX, start_sequence=first.next_sequence)
    again = [resumed.seal(i, PLAINTEXTS[i], i == 4) for i in range(2, 5)]
    opener = sl.StreamOpener(KEY, CTX, start_sequence=2)
    assert [opener.open(c) for c in again] == PLAINTEXTS[2:]
    opener.finish()


def test_keys_fresh_per_round_direction_stream() -> None:
    keys = {
        sl.stream_key(SECRET, dataclasses.replace(CTX, **change))  # type: ignore[arg-type]
        for change in (
            {},
            {"round": 4},
            {"direction": "down"},
            {"stream_id": "stream-b"},
            {"client_id": "hospital_2"},
            {"job_id": "job-2"},
        )
    }
    assert len(keys) == 6
    assert sl.stream_key(SECRET, CTX) == KEY
    # The digest is bound per chunk, not into the key.
    assert sl.stream_key(SECRET, dataclasses.replace(CTX, manifest_digest=bytes(32))) == KEY
    assert agreed_secret("session-1") != agreed_secret("session-2")


@pytest.mark.parametrize(
    "public",
    [
        b"",
        bytes(31),
        bytes(32),
        b"\x01" + bytes(31),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ],
)
def test_bad_public_keys_refused(public: bytes) -> None:
    private, _ = sl.generate_keypair()
    with pytest.raises(sl.SealError) as err:
        sl.session_secret(private, public, "s")
    assert err.value.code == "BAD_PUBLIC_KEY"


def test_bad_context_and_keys() -> None:
    with pytest.raises(sl.SealError) as err:
        dataclasses.replace(CTX, direction="sideways")
    assert err.value.code == "BAD_CONTEXT"
    with pytest.raises(sl.SealError):
        dataclasses.replace(CTX, manifest_digest=b"short")
    with pytest.raises(sl.SealError) as key_err:
        sl.StreamSealer(b"short", CTX)
    assert key_err.value.code == "BAD_KEY"


def test_manifest_digest_deterministic() -> None:
    state = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    one, two = tc.build_manifest(state), tc.build_manifest(state)
    assert sl.manifest_digest(one) == sl.manifest_digest(two)
    two.chunk_size = 7
    assert sl.manifest_digest(one) != sl.manifest_digest(two)
