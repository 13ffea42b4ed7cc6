"""Which uploads the aggregator receives into memory instead of a spool file: one-chunk
uploads up to UPLOAD_MEMORY_MAX_BYTES, within UPLOAD_MEMORY_BUDGET_BYTES for all of
them at once; the budget comes back when an upload is discarded (issue 16 item 2)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fl_core.tensor_codec import build_manifest
from fl_proto import aggregator_pb2 as apb
from fl_proto import tensors_pb2 as tpb
from fl_server import aggregator
from fl_server.aggregator import AggregatorService, Upload


def manifest(params: int, chunk_size: int = 1 << 20) -> tpb.TensorManifest:
    return build_manifest({"w": torch.zeros(params)}, chunk_size=chunk_size, digests=False)


def service(tmp_path: Path) -> AggregatorService:
    engine: Any = SimpleNamespace(on_round_closed=[])
    return AggregatorService(engine, SimpleNamespace(), tmp_path / "spool")  # type: ignore[arg-type]


def held(svc: AggregatorService, size: int) -> Upload:
    return Upload("c", "t", SimpleNamespace(), tpb.TensorManifest(), SimpleNamespace(),  # type: ignore[arg-type]
                  SimpleNamespace(), None, threading.Lock(), memory=size)  # type: ignore[arg-type]


def test_one_chunk_uploads_within_the_budget_are_held_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregator, "UPLOAD_MEMORY_BUDGET_BYTES", 1000)
    svc = service(tmp_path)
    assert svc._memory_for(manifest(100)) == 400
    assert svc._memory_for(manifest(100, chunk_size=64)) == 0  # several chunks: spooled
    assert svc._memory_for(manifest(0)) == 0  # nothing to hold
    monkeypatch.setattr(aggregator, "UPLOAD_MEMORY_MAX_BYTES", 500)
    assert svc._memory_for(manifest(200)) == 0  # larger than one held upload may be
    assert svc._memory_for(manifest(100)) == 400
    assert svc._memory_for(manifest(100)) == 0  # 1,200 > 1,000: past the budget, spooled
    up = held(svc, 400)
    svc._discard(up)
    svc._discard(up)  # twice: given back once
    assert up.memory == 0
    assert svc._memory_for(manifest(100)) == 400
    assert svc._memory_for(manifest(50)) == 200
    assert svc._memory_held == 1000


def test_only_a_fresh_small_one_chunk_upload_is_handled_on_the_event_loop(
        tmp_path: Path) -> None:
    """`runs_on_loop`: the stream read whole must be a header and one chunk, starting
    from chunk 0, small enough to be received into memory, and no other stream may be
    sending the same upload (its handler would wait for the lock, on the loop)."""
    svc = service(tmp_path)

    def stream(params: int = 100, chunk_size: int = 1 << 20, resume_from: int = 0,
               chunk: bool = True) -> list[Any]:
        header = apb.UpdateStreamMessage(header=apb.UpdateStreamHeader(
            stream_id="s1", manifest=manifest(params, chunk_size), resume_from=resume_from))
        sealed = apb.UpdateStreamMessage(chunk=tpb.SealedChunk(stream_id="s1", final=True))
        return [header, sealed] if chunk else [header]

    assert svc.runs_on_loop(stream())
    assert not svc.runs_on_loop(stream(chunk=False))  # no chunk: refused on a worker
    assert not svc.runs_on_loop(stream()[::-1])  # a chunk first
    assert not svc.runs_on_loop([*stream(), stream()[1]])  # two chunks
    assert not svc.runs_on_loop(stream(resume_from=1))
    assert not svc.runs_on_loop(stream(params=100, chunk_size=64))  # several chunks
    assert not svc.runs_on_loop(stream(params=0))
    assert not svc.runs_on_loop(stream(params=(aggregator.UPLOAD_MEMORY_MAX_BYTES // 4) + 1,
                                       chunk_size=1 << 22))
    up = held(svc, 0)
    svc._uploads["s1"] = up
    assert svc.runs_on_loop(stream())  # a partial upload nobody is sending: resumed
    with up.lock:
        assert not svc.runs_on_loop(stream())  # being sent: the wait is a worker's
    assert svc.runs_on_loop(stream())
