"""The digest algorithm a manifest names (tensors.proto Digest): SHA-256, fl.v1's
default, or BLAKE3. Each is the algorithm's own digest of the raw bytes (checked here
against hashlib and the blake3 package directly), every receiver checks it in full,
and a manifest from before the field reads as SHA-256."""

from __future__ import annotations

import hashlib
import threading

import blake3
import pytest
import torch

from fl_core import tensor_codec as tc
from fl_proto import tensors_pb2 as tpb

ALGORITHMS = {tpb.SHA256: hashlib.sha256, tpb.BLAKE3: blake3.blake3}


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(37, 5, generator=gen), "b": torch.randn(11, generator=gen),
            "steps": torch.tensor([7], dtype=torch.int64), "empty": torch.zeros(0)}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def send(manifest: tpb.TensorManifest, tensors: dict[str, torch.Tensor],
         digests: bytes | None = None) -> dict[str, torch.Tensor]:
    assembler = tc.StreamAssembler(manifest, expected=tensors)
    for sequence, chunk in enumerate(tc.iter_chunks(tensors, manifest)):
        assembler.add_chunk(sequence, chunk)
    return assembler.finish(digests)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS), ids=tc.digest_name)
def test_digests_are_the_algorithms_own_and_a_stream_checks_them(algorithm: int) -> None:
    s = state()
    manifest = tc.build_manifest(s, chunk_size=64, digest=algorithm)
    assert manifest.digest == algorithm
    new = ALGORITHMS[algorithm]
    for spec in manifest.tensors:
        assert spec.sha256 == new(raw(s[spec.name])).digest(), spec.name
    root = new(b"fl.v1 stream digests\0" + b"".join(spec.sha256 for spec in manifest.tensors))
    assert manifest.sha256 == root.digest()
    got = send(manifest, s)
    assert all(torch.equal(got[k], s[k]) for k in s)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS), ids=tc.digest_name)
def test_bytes_that_do_not_match_are_refused_naming_the_algorithm(algorithm: int) -> None:
    s = state()
    manifest = tc.build_manifest(s, chunk_size=64, digest=algorithm)
    other = dict(s, b=s["b"] + 1)
    with pytest.raises(tc.IntegrityError, match=tc.digest_name(algorithm)) as err:
        send(manifest, other)
    assert err.value.code == "HASH_MISMATCH" and err.value.field == "b"


def test_the_two_algorithms_give_different_digests_of_one_model() -> None:
    """A manifest's digests mean nothing without its algorithm: a SHA-256 manifest's
    digests relabelled BLAKE3 are refused, not taken."""
    s = state()
    sha = tc.build_manifest(s, chunk_size=64)
    fast = tc.build_manifest(s, chunk_size=64, digest=tpb.BLAKE3)
    assert sha.sha256 != fast.sha256
    relabelled = tpb.TensorManifest()
    relabelled.CopyFrom(sha)
    relabelled.digest = tpb.BLAKE3
    with pytest.raises(tc.IntegrityError):
        send(relabelled, s)


def test_trailing_blake3_digests() -> None:
    s = state()
    manifest = tc.build_manifest(s, chunk_size=64, digests=False, digest=tpb.BLAKE3)
    trailer = tc.TrailingDigests(s, manifest.digest).trailer()
    assert trailer == b"".join(blake3.blake3(raw(t)).digest() for t in s.values())
    got = send(manifest, s, trailer)
    assert all(torch.equal(got[k], s[k]) for k in s)
    wrong = tc.TrailingDigests(s, tpb.SHA256).trailer()  # the other algorithm's
    with pytest.raises(tc.IntegrityError):
        send(manifest, s, wrong)


def test_trailing_digests_without_overlap_hash_on_the_callers_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-chunk upload's digests (overlap=False): the same trailer as the threaded
    form, taken once in trailer() on the caller's thread with no thread started, and
    a failure raised there each time it is asked for."""
    s = state()
    threaded = tc.TrailingDigests(s, tpb.BLAKE3).trailer()
    seen: list[str] = []
    real = tc.digests_of_state

    def spy(st: dict[str, torch.Tensor], algorithm: int) -> list[bytes]:
        seen.append(threading.current_thread().name)
        if not st:
            raise RuntimeError("nothing to hash")
        return real(st, algorithm)

    monkeypatch.setattr(tc, "digests_of_state", spy)
    before = threading.active_count()
    inline = tc.TrailingDigests(s, tpb.BLAKE3, overlap=False)
    assert threading.active_count() == before and seen == []  # nothing until asked
    assert inline.trailer() == threaded
    assert inline.trailer() == threaded  # hashed once, kept
    assert seen == [threading.current_thread().name]
    broken = tc.TrailingDigests({}, tpb.BLAKE3, overlap=False)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="nothing to hash"):
            broken.trailer()


def test_a_manifest_from_before_the_field_reads_as_sha256() -> None:
    """fl.v1 as it was: a manifest serialised without `digest` (field 7)."""
    s = state()
    manifest = tc.build_manifest(s, chunk_size=64)
    # SHA-256 is the enum's zero: proto3 leaves it off the wire, as before the field
    assert "digest" not in [field.name for field, _ in manifest.ListFields()]
    old = tpb.TensorManifest.FromString(manifest.SerializeToString())
    assert old.digest == tpb.SHA256
    assert all(spec.sha256 == hashlib.sha256(raw(s[spec.name])).digest()
               for spec in old.tensors)
    send(old, s)


def test_an_unknown_algorithm_is_refused_before_any_byte() -> None:
    s = state()
    manifest = tc.build_manifest(s, chunk_size=64)
    manifest.digest = 9  # type: ignore[assignment]
    with pytest.raises(tc.ManifestInvalid, match="unknown digest algorithm 9") as err:
        tc.StreamAssembler(manifest)
    assert err.value.field == "digest"
    with pytest.raises(tc.ManifestInvalid):
        tc.build_manifest(s, digest=9)


def test_the_fast_digest_is_used_only_towards_a_peer_that_checks_it() -> None:
    assert tc.preferred_digest([]) == tpb.SHA256  # a peer from before
    assert tc.preferred_digest([tpb.BLAKE3]) == tpb.BLAKE3
    assert tc.preferred_digest([42]) == tpb.SHA256  # one this build does not know
    assert tpb.SHA256 not in tc.EXTRA_DIGESTS and tc.FAST_DIGEST in tc.EXTRA_DIGESTS
