"""Sealed chunks opened straight into the assembler's buffer, and digests that trail
the data (issue 16): the same refusals as opening then adding, every byte still
checked against its tensor's digest before the model is handed out, and the
trailing digests authenticated by the final chunk's seal."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fl_core import sealing as sl
from fl_core import tensor_codec as tc
from fl_core.constants import ASYNC_HASH_MIN_CHUNKS
from fl_proto import aggregator_pb2 as apb
from fl_proto import tensors_pb2
from tests.core.test_sealing import copy as altered

KEY = os.urandom(32)


def model(chunks: int = 8, chunk_size: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    total = chunks * chunk_size - 24  # a short last chunk
    return {
        "w": torch.randn(total // 4 - 5, generator=gen),
        "b": torch.randn(3, generator=gen),
        "n": torch.tensor([1, 2], dtype=torch.int32),
    }


def context(manifest: tensors_pb2.TensorManifest) -> sl.StreamContext:
    return sl.StreamContext("job", 2, "hospital_1", "up", "stream-1", sl.manifest_digest(manifest))


def sealed_stream(
    state: dict[str, torch.Tensor], chunk_size: int = 64, trailing: bool = True,
    trailer: bytes | None = None,
) -> tuple[tensors_pb2.TensorManifest, list[tensors_pb2.SealedChunk]]:
    """The chunks as a sender makes them; `trailer` overrides the true digests."""
    manifest = tc.build_manifest(state, chunk_size, digests=not trailing)
    sealer = sl.StreamSealer(KEY, context(manifest))
    if trailer is None:
        trailer = tc.TrailingDigests(state).trailer() if trailing else b""
    chunks = []
    last = manifest.chunk_count - 1
    for seq, plain in enumerate(tc.iter_chunks(state, manifest)):
        msg = apb.UpdateStreamMessage()
        sealer.seal_into(msg.chunk, seq, plain, seq == last, trailer if seq == last else b"")
        chunks.append(msg.chunk)
    return manifest, chunks


def receive(
    manifest: tensors_pb2.TensorManifest, chunks: list[tensors_pb2.SealedChunk],
    spool: Path | None = None, measure: bool = False,
) -> tuple[tc.StreamAssembler, dict[str, torch.Tensor]]:
    assembler = tc.StreamAssembler(manifest, spool_path=spool, measure=measure)
    opener = sl.StreamOpener(KEY, context(manifest))
    for chunk in chunks:
        assembler.add_sealed(opener, chunk)
    opener.finish()
    return assembler, assembler.finish()


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("trailing", [True, False])
@pytest.mark.parametrize("spooled", [True, False])
@pytest.mark.parametrize("chunks", [1, ASYNC_HASH_MIN_CHUNKS + 5])
def test_round_trip(tmp_path: Path, trailing: bool, spooled: bool, chunks: int) -> None:
    state = model(chunks)
    manifest, sealed = sealed_stream(state, trailing=trailing)
    assert manifest.chunk_count == chunks
    assert manifest.digests_trail == trailing and bool(manifest.sha256) != trailing
    assembler, got = receive(manifest, sealed, tmp_path / "s.spool" if spooled else None)
    assert same(got, state)
    # the receiver's manifest ends up the one a sender hashing first would have sent
    assert assembler.manifest.sha256 == tc.build_manifest(state, 64).sha256
    assert [s.sha256 for s in assembler.manifest.tensors] == \
        [s.sha256 for s in tc.build_manifest(state, 64).tensors]


def test_a_fully_hashed_manifest_still_seals_as_before() -> None:
    """Without a trailer the associated data is fl.v1's: an opener that never heard of
    trailers (AESGCM over the old layout) opens what the new sealer makes."""
    state = model(2)
    manifest, sealed = sealed_stream(state, trailing=False)
    cipher = sl._StreamCipher(KEY, context(manifest))
    legacy_aad = cipher._aad_prefix + sl._lp(sl._u64(1), b"\1") + \
        sl._lp(sl.manifest_digest(manifest))
    AESGCM(KEY).decrypt(cipher.nonce(1, True), sealed[1].ciphertext, legacy_aad)


def open_code(manifest: tensors_pb2.TensorManifest,
              chunks: list[tensors_pb2.SealedChunk]) -> str:
    with pytest.raises((sl.SealError, tc.CodecError)) as err:
        receive(manifest, chunks)
    return str(getattr(err.value, "code", ""))


def test_trailer_altered_stripped_or_moved_is_refused_by_the_seal() -> None:
    state = model()
    manifest, chunks = sealed_stream(state)
    digests = bytes(chunks[-1].tensor_digests)
    flipped = bytes([digests[0] ^ 1]) + digests[1:]
    assert open_code(manifest, [*chunks[:-1], altered(chunks[-1], tensor_digests=flipped)]) \
        == "SEAL_INVALID"
    assert open_code(manifest, [*chunks[:-1], altered(chunks[-1], tensor_digests=b"")]) \
        == "SEAL_INVALID"
    moved = [altered(chunks[0], tensor_digests=digests), *chunks[1:]]
    assert open_code(manifest, moved) == "SEAL_INVALID"
    with pytest.raises(sl.SealError, match="only the final chunk"):
        sl.StreamSealer(KEY, context(manifest)).seal(0, b"x", False, digests)


def test_trailing_digests_are_checked_against_the_bytes() -> None:
    """A sender whose digests are not its bytes' (sealed as such) is caught by the
    receiver's own hashing, naming the tensor."""
    state = model()
    true = tc.TrailingDigests(state).trailer()
    wrong = true[:32] + bytes(32) + true[64:]  # tensor "b"
    manifest, chunks = sealed_stream(state, trailer=wrong)
    with pytest.raises(tc.IntegrityError) as err:
        receive(manifest, chunks)
    assert err.value.code == "HASH_MISMATCH" and err.value.field == "b"
    manifest, chunks = sealed_stream(state, trailer=true[:-32])
    with pytest.raises(tc.IntegrityError, match="trailing digests"):
        receive(manifest, chunks)


def test_digests_cannot_trail_a_manifest_that_carries_them() -> None:
    state = model()
    manifest = tc.build_manifest(state, 64)
    sealer = sl.StreamSealer(KEY, context(manifest))
    last = manifest.chunk_count - 1
    chunks = [sealer.seal(i, p, i == last, tc.TrailingDigests(state).trailer() if i == last
                          else b"") for i, p in enumerate(tc.iter_chunks(state, manifest))]
    with pytest.raises(tc.IntegrityError, match="carried its own"):
        receive(manifest, chunks)


def test_trailing_manifest_must_not_carry_digests() -> None:
    manifest = tc.build_manifest(model(), 64, digests=False)
    manifest.tensors[0].sha256 = bytes(32)
    with pytest.raises(tc.ManifestInvalid, match="trails the data"):
        tc.validate_manifest(manifest)
    manifest = tc.build_manifest(model(), 64, digests=False)
    manifest.sha256 = bytes(32)
    with pytest.raises(tc.ManifestInvalid):
        tc.validate_manifest(manifest)
    # and the flag is part of the manifest digest every chunk is bound to
    full = tc.build_manifest(model(), 64)
    assert sl.manifest_digest(full) != sl.manifest_digest(tc.build_manifest(model(), 64,
                                                                            digests=False))


@pytest.mark.parametrize("spooled", [True, False])
@pytest.mark.parametrize("count", [3, ASYNC_HASH_MIN_CHUNKS + 4])
def test_a_chunk_that_fails_to_open_changes_nothing(tmp_path: Path, spooled: bool,
                                                    count: int) -> None:
    """Decrypting in place writes before the tag is checked: a refused chunk must
    still count as never received (nor hashed, nor measured), and the stream carries
    on with the right one. A short stream is hashed as it opens, a long one on a
    thread behind it."""
    state = model(count)
    manifest, chunks = sealed_stream(state)
    assembler = tc.StreamAssembler(manifest, spool_path=tmp_path / "s" if spooled else None,
                                   measure=True)
    opener = sl.StreamOpener(KEY, context(manifest))
    assembler.add_sealed(opener, chunks[0])
    ct = bytearray(chunks[1].ciphertext)
    ct[5] ^= 0x40
    for bad, code in [(altered(chunks[1], ciphertext=bytes(ct)), "SEAL_INVALID"),
                      (chunks[2], "OUT_OF_ORDER"),
                      (altered(chunks[1], stream_id="other"), "WRONG_STREAM"),
                      (altered(chunks[1], ciphertext=chunks[1].ciphertext[:-1]), "SEAL_INVALID")]:
        with pytest.raises(sl.SealError) as err:
            assembler.add_sealed(opener, bad)
        assert err.value.code == code
        assert assembler.next_sequence == 1 == opener.next_sequence
    for chunk in chunks[1:]:
        assembler.add_sealed(opener, chunk)
    opener.finish()
    assert same(assembler.finish(), state)
    assert assembler.norms["w"] == pytest.approx(want_norm(state["w"]), rel=1e-6)


def test_a_sealed_chunk_of_the_wrong_length_is_refused_as_before() -> None:
    """A chunk the sender sealed with too many bytes opens, then the codec refuses it."""
    state = model()
    manifest, chunks = sealed_stream(state)
    sealer = sl.StreamSealer(KEY, context(manifest))
    plains = [bytes(p) for p in tc.iter_chunks(state, manifest)]
    assembler = tc.StreamAssembler(manifest)
    opener = sl.StreamOpener(KEY, context(manifest))
    assembler.add_sealed(opener, sealer.seal(0, plains[0], False))
    with pytest.raises(tc.IntegrityError) as err:
        assembler.add_sealed(opener, sealer.seal(1, plains[1] + b"x", False))
    assert err.value.code == "STREAM_OVERSIZE"


def test_open_into_writes_exactly_the_plaintext() -> None:
    manifest = tc.build_manifest(model(), 64)
    sealer = sl.StreamSealer(KEY, context(manifest))
    chunk = sealer.seal(0, b"0123456789", True)
    out = bytearray(b"-" * 14)
    opener = sl.StreamOpener(KEY, context(manifest))
    with pytest.raises(sl.SealError, match="buffer of 11 bytes"):
        opener.open_into(chunk, memoryview(out)[2:13])
    opener.open_into(chunk, memoryview(out)[2:12])
    assert bytes(out) == b"--0123456789--"
    opener.finish()


# --------------------------------------------------------------------------- measured norms
# (issue 16 item 3: the server checks an update's finiteness and takes its norm from
# what the assembler measured as the bytes arrived, instead of reading it back)


def mixed_model(chunks: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(chunks * 16 - 10, generator=gen),  # float32, spans many chunks
        "d": torch.randn(7, generator=gen, dtype=torch.float64),
        "h": torch.randn(5, generator=gen).half(),
        "n": torch.tensor([1, 2, 3], dtype=torch.int32),
        "odd": torch.tensor([1, 2, 3], dtype=torch.uint8),  # leaves "late" unaligned
        "late": torch.randn(9, generator=gen),
    }


def want_norm(t: torch.Tensor) -> float:
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return float(torch.linalg.vector_norm(t, dtype=dtype))


@pytest.mark.parametrize("spooled", [True, False])
@pytest.mark.parametrize("chunks", [1, ASYNC_HASH_MIN_CHUNKS + 5])
def test_norms_measured_on_arrival(tmp_path: Path, spooled: bool, chunks: int) -> None:
    state = mixed_model(chunks)
    manifest, sealed = sealed_stream(state)
    assembler, got = receive(manifest, sealed, tmp_path / "s" if spooled else None, True)
    assert same(got, state)
    norms = assembler.norms
    # every floating tensor whose pieces hold whole elements; not integers, and not a
    # float32 tensor that starts 3 bytes after a multiple of 4
    assert sorted(norms) == ["d", "h", "w"]
    for name, norm in norms.items():
        assert norm == pytest.approx(want_norm(state[name]), rel=1e-6)


def test_nothing_measured_unless_asked() -> None:
    manifest, sealed = sealed_stream(model())
    assembler, _ = receive(manifest, sealed)
    assert assembler.norms == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_element_gives_a_non_finite_norm(bad: float) -> None:
    state = model(ASYNC_HASH_MIN_CHUNKS + 2)
    state["w"][37] = bad
    assembler, _ = receive(*sealed_stream(state), measure=True)
    assert not math.isfinite(assembler.norms["w"])
    assert math.isfinite(assembler.norms["b"])


def test_huge_finite_values_are_measured_in_float64() -> None:
    """float32 squares of 1e30 overflow; the piece is measured again in float64, so a
    huge but finite update keeps a finite (true) norm and is not taken for NaN/Inf."""
    state = {"w": torch.full((300,), 1e30)}
    assembler, _ = receive(*sealed_stream(state), measure=True)
    assert assembler.norms["w"] == pytest.approx(1e30 * math.sqrt(300), rel=1e-6)


def test_norms_cover_the_chunks_a_resumed_spool_reads_back(tmp_path: Path) -> None:
    state = mixed_model(ASYNC_HASH_MIN_CHUNKS + 3)
    manifest, sealed = sealed_stream(state)
    path = tmp_path / "s"
    first = tc.StreamAssembler(manifest, spool_path=path, measure=True)
    opener = sl.StreamOpener(KEY, context(manifest))
    for chunk in sealed[:3]:
        first.add_sealed(opener, chunk)
    first.flush()
    first.close()
    second = tc.StreamAssembler(manifest, spool_path=path, resume_at=3, measure=True)
    for chunk in sealed[3:]:
        second.add_sealed(opener, chunk)
    assert same(second.finish(), state)
    assert second.norms["w"] == pytest.approx(want_norm(state["w"]), rel=1e-6)


@pytest.mark.parametrize("ending", ["finish", "close", "failed finish"])
@pytest.mark.parametrize("spooled", [True, False])
def test_an_ended_stream_is_freed_without_the_collector(
        tmp_path: Path, ending: str, spooled: bool) -> None:
    """The daemons collect cycles only now and then (fl_core/gc_policy.py), so an
    assembler must not stay in one once its stream ended: its scratch chunks and
    hashing queue (megabytes per upload) went with the cycle, every round, for as long
    as the collector waited (a 100 MB x 4 server grew ~20 MB a round)."""
    import gc
    import weakref

    state = model(ASYNC_HASH_MIN_CHUNKS + 5)
    manifest, sealed = sealed_stream(state, trailing=False)
    if ending == "failed finish":
        sealed = sealed[:-1]  # the stream stops short: finish() refuses it
    gc.disable()
    try:
        assembler = tc.StreamAssembler(manifest, spool_path=tmp_path / "s" if spooled else None)
        opener = sl.StreamOpener(KEY, context(manifest))
        for chunk in sealed:
            assembler.add_sealed(opener, chunk)
        tensors: dict[str, torch.Tensor] = {}
        if ending == "finish":
            tensors = assembler.finish()
        elif ending == "close":
            assembler.close()
        else:
            with pytest.raises(tc.CodecError):
                assembler.finish()
            assembler.close()
        ref = weakref.ref(assembler)
        del assembler, opener
        assert ref() is None  # freed by its last reference going, no collection
    finally:
        gc.enable()
    if ending == "finish":
        assert same(tensors, state)
