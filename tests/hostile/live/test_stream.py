"""Attacks on the wire and on the sealed update stream, by a hospital holding a real
certificate, session and task (the attacker is selected: fraction 1 selects every
connected client). Each case asserts the exact status the server answers with, and
runs in a frozen round: the server stays SERVING, the model and its checkpoint do not
move, and the round completes with only the honest update in it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from fl_core.constants import MAX_MESSAGE_BYTES, UPLOAD_BUSY_WAIT_S
from fl_core.stream_ids import upload_stream_id
from fl_proto import aggregator_pb2 as apb
from tests.hostile.kit import (
    HTTP2_PREFACE,
    SERVING,
    HostileClient,
    SealedUpload,
    checkpoint_sha,
    closed_after,
    frames,
    refused,
    tls_probe,
)
from tests.hostile.live.arena import EVIL, ROUND_DEADLINE_S, Arena, Frozen

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
Msgs = list[apb.UpdateStreamMessage]


def upload(evil: HostileClient, frozen: Frozen) -> SealedUpload:
    up = evil.sealed(frozen.evil_task, evil.zero_delta(frozen.evil_task), chunk_size=48)
    assert len(up.chunks) >= 4, "the attacks below need a stream of several chunks"
    return up


def flipped(msg: apb.UpdateStreamMessage, byte: int = 5) -> apb.UpdateStreamMessage:
    out = apb.UpdateStreamMessage()
    out.CopyFrom(msg)
    data = bytearray(out.chunk.ciphertext)
    data[byte] ^= 0x01
    out.chunk.ciphertext = bytes(data)
    return out


def with_final(msg: apb.UpdateStreamMessage, final: bool) -> apb.UpdateStreamMessage:
    out = apb.UpdateStreamMessage()
    out.CopyFrom(msg)
    out.chunk.final = final
    return out


def other_stream(msg: apb.UpdateStreamMessage, stream_id: str) -> apb.UpdateStreamMessage:
    out = apb.UpdateStreamMessage()
    out.CopyFrom(msg)
    out.chunk.stream_id = stream_id
    return out


# case name -> (how to bend the stream, expected status, expected ErrorDetail code)
BENT: dict[str, tuple[Callable[[SealedUpload], Msgs], grpc.StatusCode, str]] = {
    "sequence_gap": (lambda u: [u.messages()[0], u.chunks[0], u.chunks[2]],
                     INVALID, "OUT_OF_ORDER"),
    "duplicate_chunk": (lambda u: [u.messages()[0], u.chunks[0], u.chunks[1], u.chunks[1]],
                        INVALID, "OUT_OF_ORDER"),
    "reordered_chunks": (lambda u: [u.messages()[0], u.chunks[1], u.chunks[0], *u.chunks[2:]],
                         INVALID, "OUT_OF_ORDER"),
    "flipped_ciphertext": (lambda u: [u.messages()[0], u.chunks[0], flipped(u.chunks[1]),
                                      *u.chunks[2:]], INVALID, "SEAL_INVALID"),
    "flipped_gcm_tag": (lambda u: [u.messages()[0],
                                   flipped(u.chunks[0], len(u.chunks[0].chunk.ciphertext) - 1),
                                   *u.chunks[1:]], INVALID, "SEAL_INVALID"),
    "final_flag_forged_early": (lambda u: [u.messages()[0], with_final(u.chunks[0], True)],
                                INVALID, "SEAL_INVALID"),
    "final_flag_stripped": (lambda u: [*u.messages()[:-1], with_final(u.chunks[-1], False)],
                            INVALID, "SEAL_INVALID"),
    "stops_before_final_chunk": (lambda u: u.messages()[:-1], grpc.StatusCode.ABORTED,
                                 "TRUNCATED"),
    "data_after_final_chunk": (lambda u: [*u.messages(),
                                          u.seal(len(u.chunks), b"\x00" * 16, False)],
                               INVALID, "AFTER_FINAL"),
    "final_chunk_repeated": (lambda u: [*u.messages(), u.chunks[-1]], INVALID, "AFTER_FINAL"),
    "chunks_without_header": (lambda u: list(u.chunks), INVALID, "BAD_HEADER"),
    "second_header_mid_stream": (lambda u: [u.messages()[0], u.chunks[0], u.messages()[0]],
                                 INVALID, "BAD_HEADER"),
    "empty_stream": (lambda u: [], INVALID, "BAD_HEADER"),
    "chunk_of_another_stream": (lambda u: [u.messages()[0],
                                           other_stream(u.chunks[0], u.header.stream_id + "x")],
                                INVALID, "WRONG_STREAM"),
}


@pytest.mark.parametrize("case", sorted(BENT))
def test_bent_update_stream(arena: Arena, evil: HostileClient, case: str) -> None:
    bend, code, detail = BENT[case]
    with arena.frozen_round(evil) as frozen:
        up = upload(evil, frozen)
        refusal = refused(lambda: evil.submit(bend(up)))
        assert (refusal.code, refusal.detail_code) == (code, detail), refusal


def test_header_names_another_sessions_stream(arena: Arena, evil: HostileClient) -> None:
    with arena.frozen_round(evil) as frozen:
        up = upload(evil, frozen)
        task = frozen.evil_task
        up.header.stream_id = upload_stream_id(task.job_id, task.round, task.task_id, "f" * 32)
        refusal = refused(lambda: evil.submit(up.messages()))
        assert (refusal.code, refusal.detail_code) == (INVALID, "WRONG_STREAM"), refusal


def test_message_over_the_size_limit(arena: Arena) -> None:
    """A chunk bigger than MAX_MESSAGE_BYTES: refused by gRPC itself before any
    handler code or allocation for it (the attacker lifted its own send limit)."""
    evil = arena.client(EVIL, max_send_bytes=4 * MAX_MESSAGE_BYTES)
    try:
        with arena.frozen_round(evil) as frozen:
            up = upload(evil, frozen)
            huge = apb.UpdateStreamMessage()
            huge.CopyFrom(up.chunks[0])
            huge.chunk.ciphertext = os.urandom(MAX_MESSAGE_BYTES + 1024)
            refusal = refused(lambda: evil.submit([up.messages()[0], huge]))
            assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
    finally:
        evil.close()


def test_stream_replayed_from_an_earlier_round(arena: Arena, evil: HostileClient) -> None:
    """A valid stream, captured in round N, replayed in round N+1: whole (its header
    names a closed task) and as chunks under a fresh header (sealed for another stream)."""
    with arena.frozen_round(evil) as first:
        captured = upload(evil, first)
        receipt = evil.submit(captured.messages())
        assert receipt.chunks_received == len(captured.chunks)
        first.evil_accepted = True
    with arena.frozen_round(evil) as second:
        refusal = refused(lambda: evil.submit(captured.messages()))
        assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION, refusal
        assert "not the open task" in refusal.details
        fresh = upload(evil, second)
        refusal = refused(lambda: evil.submit([fresh.messages()[0], *captured.chunks]))
        assert (refusal.code, refusal.detail_code) == (INVALID, "WRONG_STREAM"), refusal
        # the chunk ids rewritten to the new stream: the seal still binds the old one
        moved = [other_stream(c, fresh.header.stream_id) for c in captured.chunks]
        refusal = refused(lambda: evil.submit([fresh.messages()[0], *moved]))
        assert (refusal.code, refusal.detail_code) == (INVALID, "SEAL_INVALID"), refusal


def test_a_second_stream_for_an_upload_in_flight_is_busy_and_a_resume_after_it_is_not(
        arena: Arena, evil: HostileClient) -> None:
    """Two streams for one upload. The second, sent while the first still holds the
    upload, is refused BUSY once it has waited UPLOAD_BUSY_WAIT_S for it. When the first
    has been refused (it ended before its final chunk), a resume sent at once is let in
    and completes the update: the refusal reaches the client only once the server has
    let go of the upload (CI once saw BUSY in the replay case above)."""
    with arena.frozen_round(evil) as frozen:
        up = upload(evil, frozen)
        resumed = apb.UpdateStreamMessage()  # the header of a resume from chunk 1
        resumed.CopyFrom(up.messages()[0])
        resumed.header.resume_from = 1
        release = threading.Event()
        outcome: dict[str, object] = {}

        def held() -> Iterator[apb.UpdateStreamMessage]:
            yield up.messages()[0]
            yield up.chunks[0]
            release.wait(ROUND_DEADLINE_S)

        def send() -> None:
            outcome["first"] = refused(lambda: evil.submit(held()))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the server has taken the first chunk
                try:
                    if evil.aggregator.UploadStatus(
                            apb.UploadStatusRequest(stream_id=up.header.stream_id),
                            metadata=evil.metadata(), timeout=5).next_sequence == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
            else:
                raise AssertionError("the first stream never reached the server")
            started = time.monotonic()
            busy = refused(lambda: evil.submit([resumed, *up.chunks[1:]]))
            assert (busy.code, busy.detail_code) == (grpc.StatusCode.ABORTED, "BUSY"), busy
            assert time.monotonic() - started >= 0.9 * UPLOAD_BUSY_WAIT_S
        finally:
            release.set()
            sender.join(timeout=30)
        first = outcome["first"]
        assert getattr(first, "detail_code", None) == "TRUNCATED", first
        receipt = evil.submit([resumed, *up.chunks[1:]])
        assert receipt.chunks_received == len(up.chunks)
        frozen.evil_accepted = True


def test_stalled_stream_slowloris(arena: Arena, evil: HostileClient) -> None:
    """A stream that sends a header and one chunk and then nothing, never giving up:
    the server keeps serving everyone, and the round deadline cancels the stalled call
    and closes the round on the honest update."""
    with arena.frozen_round(evil) as frozen:
        frozen.close_by_deadline = True
        up = upload(evil, frozen)
        release = threading.Event()
        outcome: dict[str, object] = {}

        def stalled() -> Iterator[apb.UpdateStreamMessage]:
            yield up.messages()[0]
            yield up.chunks[0]
            release.wait(3 * ROUND_DEADLINE_S)

        def send() -> None:
            outcome["refusal"] = refused(lambda: evil.submit(stalled(),
                                                             timeout=4 * ROUND_DEADLINE_S))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            time.sleep(1.0)
            # while it stalls: the model is untouched and the server answers everyone
            assert arena.status().model_sha256 == frozen.sha_before
            assert arena.health() == SERVING
            sender.join(timeout=ROUND_DEADLINE_S + 15)
            assert not sender.is_alive(), "the stalled call was never ended by the server"
        finally:
            release.set()
            sender.join(timeout=10)
        refusal = outcome["refusal"]
        assert getattr(refusal, "code", None) == grpc.StatusCode.CANCELLED, refusal
    row = arena.round_row(frozen.round)
    assert row is not None
    assert "deadline" in row.failures.get(EVIL, ""), row.failures
    assert checkpoint_sha(arena.state_dir, arena.job_id, frozen.round - 1) == frozen.sha_before


# --------------------------------------------------------------------------- raw wire


def test_garbage_bytes_on_a_raw_tcp_socket(arena: Arena) -> None:
    """Not TLS at all: the server closes the connection at once, sending nothing but
    at most a fatal TLS alert (never a ServerHello, never an HTTP answer)."""
    junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 64
    with arena.frozen_round():
        started = time.monotonic()
        how, answer = closed_after(arena.port, junk)
        assert how in ("eof", "reset"), (how, answer[:16])
        assert time.monotonic() - started < 2.0
        fatal_alert = len(answer) == 7 and answer[:1] == b"\x15" and answer[5:6] == b"\x02"
        assert answer == b"" or fatal_alert, answer[:16]


def test_garbage_inside_an_authenticated_tls_connection(arena: Arena) -> None:
    """Junk instead of the HTTP/2 preface, from a valid certificate: the connection is
    closed, no call is ever dispatched."""
    ident = arena.identity(EVIL)
    with arena.frozen_round():
        probe = tls_probe(arena.port, ident.ca, ident.cert, ident.key,
                          payload=b"\x00\xffjunk" * 200)
        # it answered as an HTTP/2 server (SETTINGS), then hung up on the junk
        assert probe.h2[3:4] == b"\x04" and probe.closed, probe


def test_malformed_http2_frame(arena: Arena) -> None:
    """A correct preface, then a DATA frame header claiming 16 MiB (far over the
    16 KiB frame limit): the connection is closed, never a 16 MiB read."""
    ident = arena.identity(EVIL)
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    monster = b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"x" * 64
    with arena.frozen_round():
        probe = tls_probe(arena.port, ident.ca, ident.cert, ident.key,
                          payload=HTTP2_PREFACE + settings + monster)
        # it read our preface and SETTINGS (and acknowledged them), then hung up
        assert (0x4, 0x1) in frames(probe.h2) and probe.closed, probe
