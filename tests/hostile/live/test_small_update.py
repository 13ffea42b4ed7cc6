"""SubmitSmallUpdate: a one-chunk update in one unary call (issue 16 item 2). It is
SubmitUpdate's stream of two messages in one, so every case here asserts that it is
answered exactly as that stream is (the same status and reason), that a bent request
moves nothing, and that the honest one is taken once."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from fl_core.errors import refusal_of
from fl_proto import aggregator_pb2 as apb
from tests.hostile.kit import HostileClient, SealedUpload, refused
from tests.hostile.live.arena import Arena, Frozen
from tests.hostile.live.test_stream import INVALID, flipped, other_stream, with_final

pytestmark = pytest.mark.slow

ONE_CHUNK = 1 << 20  # the breast-cancer model (248 bytes) in one chunk


def one_chunk(evil: HostileClient, frozen: Frozen) -> SealedUpload:
    up = evil.sealed(frozen.evil_task, evil.zero_delta(frozen.evil_task), chunk_size=ONE_CHUNK)
    assert len(up.chunks) == 1
    return up


def small(evil: HostileClient, request: apb.SmallUpdate | bytes) -> apb.UpdateReceipt:
    receipt: apb.UpdateReceipt = evil.aggregator.SubmitSmallUpdate(
        request, metadata=evil.metadata(), timeout=30)
    return receipt


def as_small(header: apb.UpdateStreamHeader | None,
             chunk: apb.UpdateStreamMessage | None) -> apb.SmallUpdate:
    request = apb.SmallUpdate()
    if header is not None:
        request.header.CopyFrom(header)
    if chunk is not None:
        request.chunk.CopyFrom(chunk.chunk)
    return request


def test_an_honest_small_update_is_taken_once(arena: Arena, evil: HostileClient) -> None:
    """The receipt is the one the stream gives (the server's own digest of the bytes),
    and the same update sent again is refused as a second stream of it is."""
    with arena.frozen_round(evil) as frozen:
        up = one_chunk(evil, frozen)
        receipt = small(evil, as_small(up.header, up.chunks[0]))
        frozen.evil_accepted = True
        assert receipt.stream_id == up.header.stream_id
        assert receipt.chunks_received == 1
        assert receipt.bytes_received == up.manifest.total_bytes
        assert len(receipt.sha256) == 32
        again_small = refused(lambda: small(evil, as_small(up.header, up.chunks[0])))
        again_stream = refused(lambda: evil.submit(up.messages()))
        assert (again_small.code, again_small.detail_code) == \
            (again_stream.code, again_stream.detail_code), (again_small, again_stream)
        assert again_small.code != grpc.StatusCode.OK


def test_fields_in_another_order_are_read_as_protobuf_reads_them(
        arena: Arena, evil: HostileClient) -> None:
    """The chunk first, then the header: legal protobuf that the server's in-place
    reader does not take, so protobuf reads it, and the update is taken."""
    with arena.frozen_round(evil) as frozen:
        up = one_chunk(evil, frozen)
        swapped = up.chunks[0].SerializeToString() + \
            apb.UpdateStreamMessage(header=up.header).SerializeToString()
        assert apb.SmallUpdate.FromString(swapped) == as_small(up.header, up.chunks[0])
        receipt = small(evil, swapped)
        frozen.evil_accepted = True
        assert receipt.chunks_received == 1


# case name -> (the request, the stream answered the same, their status and reason); a
# stream of None: a case the stream cannot express
Case = tuple[Callable[[SealedUpload], apb.SmallUpdate | bytes],
             Callable[[SealedUpload], list[apb.UpdateStreamMessage]] | None,
             grpc.StatusCode, str]
BENT: dict[str, Case] = {
    "flipped_ciphertext": (lambda u: as_small(u.header, flipped(u.chunks[0])),
                           lambda u: [u.messages()[0], flipped(u.chunks[0])],
                           INVALID, "SEAL_INVALID"),
    "final_flag_stripped": (lambda u: as_small(u.header, with_final(u.chunks[0], False)),
                            lambda u: [u.messages()[0], with_final(u.chunks[0], False)],
                            INVALID, "SEAL_INVALID"),
    "chunk_of_another_stream": (
        lambda u: as_small(u.header, other_stream(u.chunks[0], u.header.stream_id + "x")),
        lambda u: [u.messages()[0], other_stream(u.chunks[0], u.header.stream_id + "x")],
        INVALID, "WRONG_STREAM"),
    "no_chunk": (lambda u: as_small(u.header, None), None, INVALID, "BAD_HEADER"),
    "no_header": (lambda u: as_small(None, u.chunks[0]), lambda u: list(u.chunks),
                  INVALID, "BAD_HEADER"),
    "empty": (lambda u: b"", lambda u: [], INVALID, "BAD_HEADER"),
    "not_protobuf": (lambda u: b"\xff\xff\xff",
                     lambda u: [u.messages()[0], b"\xff\xff\xff"],  # type: ignore[list-item]
                     INVALID, "UNREADABLE"),
}


@pytest.mark.parametrize("case", sorted(BENT))
def test_bent_small_update(arena: Arena, evil: HostileClient, case: str) -> None:
    bend, as_stream, code, reason = BENT[case]
    with arena.frozen_round(evil) as frozen:
        up = one_chunk(evil, frozen)
        refusal = refused(lambda: small(evil, bend(up)))
        assert (refusal.code, refusal.detail_code) == (code, reason), refusal
        if as_stream is not None:
            streamed = refused(lambda: evil.submit(as_stream(up)))
            assert (streamed.code, streamed.detail_code) == (code, reason), streamed


def test_an_update_of_several_chunks_is_sent_to_the_stream(arena: Arena,
                                                           evil: HostileClient) -> None:
    """A manifest of several chunks cannot come whole in one call: refused, naming the
    field, before anything of it is stored; the stream then takes the same update."""
    with arena.frozen_round(evil) as frozen:
        up = evil.sealed(frozen.evil_task, evil.zero_delta(frozen.evil_task), chunk_size=48)
        assert len(up.chunks) > 1
        with pytest.raises(grpc.RpcError) as error:
            small(evil, as_small(up.header, up.chunks[-1]))
        refusal = refusal_of(error.value)
        assert (refusal.code, refusal.reason, refusal.field) == \
            (INVALID, "NOT_ONE_CHUNK", "manifest.chunk_count"), refusal
        receipt = evil.submit(up.messages())
        frozen.evil_accepted = True
        assert receipt.chunks_received == len(up.chunks)
