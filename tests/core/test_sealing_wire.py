"""Sealed chunks framed and read without protobuf messages (issue 16 item 1): the
bytes are exactly protobuf's, a parsed chunk has protobuf's values (its ciphertext a
view, not a copy), and anything the direct reader is not sure to read as protobuf
does (headers, repeated or unknown fields, malformed bytes) goes to protobuf."""

from __future__ import annotations

import os
import random

import pytest
from google.protobuf.message import DecodeError

from fl_core import sealing as sl
from fl_proto import aggregator_pb2 as apb
from fl_proto import tensors_pb2

KEY = os.urandom(32)
CTX = sl.StreamContext("job", 3, "hospital_1", "down", "stream-é", bytes(32))

# Fixed bytes, not os.urandom: pytest-xdist's workers must collect the same test ids.
CASES = [(0, False, b""), (1, False, b""), (300, True, b""),
         (5, True, bytes(range(7, 71)))]


def sealed_pair(sequence: int, final: bool, trailer: bytes) -> tuple[bytes, bytes]:
    """(seal_message's bytes, the protobuf serialisation of seal_into's message)."""
    plain = os.urandom(1000)
    wire = sl.StreamSealer(KEY, CTX, start_sequence=sequence).seal_message(
        sequence, plain, final, trailer)
    msg = apb.ModelStreamMessage()
    sl.StreamSealer(KEY, CTX, start_sequence=sequence).seal_into(
        msg.chunk, sequence, plain, final, trailer)
    return wire, msg.SerializeToString()


@pytest.mark.parametrize(("sequence", "final", "trailer"), CASES)
def test_framed_exactly_as_protobuf(sequence: int, final: bool, trailer: bytes) -> None:
    wire, proto = sealed_pair(sequence, final, trailer)
    assert wire == proto
    # the same bytes are an UpdateStreamMessage's chunk too (field 2 in both)
    assert apb.UpdateStreamMessage.FromString(wire).chunk == \
        apb.ModelStreamMessage.FromString(wire).chunk


@pytest.mark.parametrize(("sequence", "final", "trailer"), CASES)
def test_read_as_protobuf_reads_it_and_opens(sequence: int, final: bool,
                                             trailer: bytes) -> None:
    wire, _ = sealed_pair(sequence, final, trailer)
    msg = sl.parse_chunk_message(wire)
    assert msg is not None and msg.HasField("chunk") and not msg.HasField("header")
    want = apb.ModelStreamMessage.FromString(wire).chunk
    got = msg.chunk
    assert (got.stream_id, got.sequence, got.final, bytes(got.ciphertext),
            got.tensor_digests) == (want.stream_id, want.sequence, want.final,
                                    want.ciphertext, want.tensor_digests)
    assert isinstance(got.ciphertext, memoryview) and got.ciphertext.obj is wire  # no copy
    opener = sl.StreamOpener(KEY, CTX, start_sequence=sequence)
    assert opener.open(got) == sl.StreamOpener(KEY, CTX, start_sequence=sequence).open(want)


def test_everything_else_goes_to_protobuf() -> None:
    wire, _ = sealed_pair(2, False, b"")
    header = apb.UpdateStreamMessage(header=apb.UpdateStreamHeader(job_id="j")).SerializeToString()
    unknown = apb.ModelStreamMessage(chunk=tensors_pb2.SealedChunk(sequence=1)).SerializeToString()
    unknown = unknown[:1] + bytes([unknown[1] + 2]) + unknown[2:] + b"\x30\x01"  # field 6
    bad_utf8 = tensors_pb2.SealedChunk(sequence=1).SerializeToString() + b"\x0a\x01\xff"
    for data in (b"", header, wire + wire, unknown, b"\x12\x03" + bad_utf8[:3],
                 b"\x12" + bytes([len(bad_utf8)]) + bad_utf8, wire[:-1], b"\x12\x80"):
        assert sl.parse_chunk_message(data) is None, data[:8]
    parse = sl.stream_message_parser(apb.UpdateStreamMessage)
    assert parse(header).header.job_id == "j"
    assert parse(wire + wire).chunk.ciphertext == \
        apb.UpdateStreamMessage.FromString(wire + wire).chunk.ciphertext  # protobuf merges
    with pytest.raises(DecodeError):
        parse(wire[:-1])
    assert sl.serialize_stream_message(wire) is wire
    assert sl.serialize_stream_message(apb.UpdateStreamMessage.FromString(header)) == header


def test_mutated_messages_read_as_protobuf_reads_them() -> None:
    """Whatever the direct reader accepts, protobuf reads the same values from."""
    rng = random.Random(16)
    base, _ = sealed_pair(7, True, os.urandom(32))
    accepted = 0
    for _ in range(3000):
        data = bytearray(base[:80] if rng.random() < 0.5 else base)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(min(len(data), 48))
            data[pos] = rng.randrange(256)
        raw = bytes(data)
        got = sl.parse_chunk_message(raw)
        if got is None:
            continue
        want = apb.ModelStreamMessage.FromString(raw)  # must not raise
        accepted += 1
        assert want.HasField("chunk")
        assert (got.chunk.stream_id, got.chunk.sequence, got.chunk.final,
                bytes(got.chunk.ciphertext), got.chunk.tensor_digests) == \
            (want.chunk.stream_id, want.chunk.sequence, want.chunk.final,
             want.chunk.ciphertext, want.chunk.tensor_digests)
    assert accepted > 100


# SmallUpdate (SubmitSmallUpdate's request): a header message's bytes, then a chunk's
SMALL = sl.small_update_parser(apb.SmallUpdate, apb.UpdateStreamMessage)


def small_update_bytes() -> tuple[bytes, apb.UpdateStreamHeader]:
    header = apb.UpdateStreamHeader(job_id="j", round=4, task_id="t", stream_id="s",
                                    num_examples=9, metrics={"loss": 0.5})
    header.manifest.chunk_count = 1
    wire, _ = sealed_pair(0, True, bytes(range(32)))
    return apb.UpdateStreamMessage(header=header).SerializeToString() + wire, header


def as_read(messages: tuple[object, ...]) -> list[tuple[object, ...]]:
    """What the handler reads of each message, comparable across both readers."""
    out: list[tuple[object, ...]] = []
    for message in messages:
        if message.HasField("header"):  # type: ignore[attr-defined]
            out.append(("header", message.header.SerializeToString(  # type: ignore[attr-defined]
                deterministic=True)))
        if message.HasField("chunk"):  # type: ignore[attr-defined]
            c = message.chunk  # type: ignore[attr-defined]
            out.append(("chunk", c.stream_id, c.sequence, c.final, bytes(c.ciphertext),
                        c.tensor_digests))
    return out


def protobuf_reading(data: bytes) -> list[tuple[object, ...]]:
    small = apb.SmallUpdate.FromString(data)
    return as_read(tuple(apb.UpdateStreamMessage(**{part: getattr(small, part)})
                         for part in ("header", "chunk") if small.HasField(part)))


def test_a_small_update_is_the_two_stream_messages_back_to_back() -> None:
    data, header = small_update_bytes()
    small = apb.SmallUpdate.FromString(data)
    assert small.header == header and small.chunk.final
    assert data == small.SerializeToString()  # what protobuf itself writes
    header_message, chunk_message = SMALL(data)
    assert isinstance(chunk_message, sl.WireChunkMessage)  # read in place
    assert as_read((header_message, chunk_message)) == protobuf_reading(data)


def test_a_small_update_protobuf_must_read_goes_to_protobuf() -> None:
    data, header = small_update_bytes()
    header_bytes = apb.UpdateStreamMessage(header=header).SerializeToString()
    swapped = data[len(header_bytes):] + header_bytes
    for odd in (swapped, header_bytes, data[len(header_bytes):], header_bytes * 2, b""):
        got = SMALL(odd)
        assert not any(isinstance(m, sl.WireChunkMessage) for m in got)
        assert as_read(got) == protobuf_reading(odd)
    (unreadable,) = SMALL(data[:-1])
    assert isinstance(unreadable, sl.UnreadableMessage) and not unreadable.HasField("header")
    assert unreadable.error


def test_mutated_small_updates_read_as_protobuf_reads_them() -> None:
    rng = random.Random(17)
    base, _ = small_update_bytes()
    in_place = 0
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        raw = bytes(data)
        got = SMALL(raw)
        if len(got) == 1 and isinstance(got[0], sl.UnreadableMessage):
            with pytest.raises(DecodeError):
                apb.SmallUpdate.FromString(raw)
            continue
        in_place += any(isinstance(m, sl.WireChunkMessage) for m in got)
        assert as_read(got) == protobuf_reading(raw)
    assert in_place > 100
