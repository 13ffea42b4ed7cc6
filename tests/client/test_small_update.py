"""A hospital's one-chunk update goes whole in one unary call (SubmitSmallUpdate) to a
server that has it, and as SubmitUpdate's stream to one that predates it: that server
answers UNIMPLEMENTED, the same update is streamed in the same attempt, and the
connection streams from then on. The servers here are real gRPC servers over mTLS on
loopback; they open and verify what they get under the session's keys."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from bench.common import client_tls, make_bench_pki
from fl_client.connection import ServerConnection, SessionInfo
from fl_core.sealing import StreamContext, StreamOpener, manifest_digest, stream_key
from fl_core.tensor_codec import StreamAssembler
from fl_core.tls import server_credentials
from fl_proto import aggregator_pb2 as apb
from fl_proto import aggregator_pb2_grpc as apb_grpc
from fl_proto import coordinator_pb2 as cpb
from fl_server.keyfiles import load_server_tls

CLIENT = "hospital_1"
SECRET = secrets.token_bytes(32)


class OlderServer(apb_grpc.AggregatorServicer):
    """An Aggregator from before SubmitSmallUpdate: the generated base answers it
    UNIMPLEMENTED, as a server built from the older contract does."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.received: list[dict[str, torch.Tensor]] = []

    def take(self, messages: list[apb.UpdateStreamMessage]) -> apb.UpdateReceipt:
        header = messages[0].header
        ctx = StreamContext(header.job_id, header.round, CLIENT, "up", header.stream_id,
                            manifest_digest(header.manifest))
        opener = StreamOpener(stream_key(SECRET, ctx), ctx)
        assembler = StreamAssembler(header.manifest)
        for message in messages[1:]:
            assembler.add_sealed(opener, message.chunk)
        opener.finish()
        self.received.append({k: v.clone() for k, v in assembler.finish().items()})
        return apb.UpdateReceipt(stream_id=header.stream_id,
                                 chunks_received=len(messages) - 1,
                                 bytes_received=header.manifest.total_bytes,
                                 sha256=assembler.manifest.sha256)

    def SubmitUpdate(self, request_iterator: Iterator[apb.UpdateStreamMessage],  # noqa: N802
                     context: Any) -> apb.UpdateReceipt:
        self.calls.append("SubmitUpdate")
        return self.take(list(request_iterator))


class CurrentServer(OlderServer):
    def SubmitSmallUpdate(self, request: apb.SmallUpdate,  # noqa: N802
                          context: Any) -> apb.UpdateReceipt:
        self.calls.append("SubmitSmallUpdate")
        return self.take([apb.UpdateStreamMessage(header=request.header),
                          apb.UpdateStreamMessage(chunk=request.chunk)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("small-update")
    make_bench_pki(work, [CLIENT])
    return work


def _upload(pki: Path, servicer: OlderServer,
            states: list[dict[str, torch.Tensor]]) -> tuple[ServerConnection, list[Any]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    apb_grpc.add_AggregatorServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0",
                                  server_credentials(*load_server_tls(pki / "keys")))
    server.start()
    conn = ServerConnection(f"127.0.0.1:{port}", *client_tls(pki, CLIENT), CLIENT,
                            "breast_cancer", 100)
    try:
        conn.connect()
        conn.session = SessionInfo(session_id="s" * 32, token="token",
                                   expires=time.time() + 3600, secret=SECRET, job_id="job",
                                   client_id=CLIENT)
        receipts = [conn.submit_update(cpb.Task(task_id=f"t{i}", job_id="job", round=i + 1),
                                       state, 100, {"loss": 0.5})
                    for i, state in enumerate(states)]
    finally:
        conn.close()
        server.stop(None)
    return conn, receipts


def _states(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [{"w": torch.randn(30, 2, generator=generator), "b": torch.randn(2, generator=generator)}
            for _ in range(count)]


def test_a_one_chunk_update_goes_in_one_call(pki: Path) -> None:
    servicer = CurrentServer()
    states = _states(2)
    conn, receipts = _upload(pki, servicer, states)
    assert servicer.calls == ["SubmitSmallUpdate", "SubmitSmallUpdate"]
    assert conn.small_updates and conn.resumes == 0
    for state, got, receipt in zip(states, servicer.received, receipts, strict=True):
        assert all(torch.equal(got[name], state[name]) for name in state)
        assert receipt.chunks_received == 1 and len(receipt.sha256) == 32


def test_a_server_without_it_gets_the_stream(pki: Path) -> None:
    servicer = OlderServer()
    states = _states(2)
    conn, receipts = _upload(pki, servicer, states)
    # the first update: refused UNIMPLEMENTED (not recorded here), then streamed in the
    # same attempt; the second streamed at once
    assert servicer.calls == ["SubmitUpdate", "SubmitUpdate"]
    assert not conn.small_updates and conn.resumes == 0
    for state, got, receipt in zip(states, servicer.received, receipts, strict=True):
        assert all(torch.equal(got[name], state[name]) for name in state)
        assert receipt.chunks_received == 1
