"""A small global model carried sealed in its TRAIN task (fl_server/model_stream.py).

On the live arena (breast cancer, 62 parameters): the task carries the chunks FetchModel
would stream for this session, byte for byte; the client opens them without a
FetchModel call; and a carried model it cannot use (a flipped byte, sealed for another
session) is set aside for FetchModel's, so the result is the same model either way."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from fl_core.stream_ids import download_stream_id
from fl_proto import aggregator_pb2 as apb
from fl_proto import coordinator_pb2 as cpb
from fl_server.model_stream import with_model
from tests.hostile.kit import HostileClient
from tests.hostile.live.arena import Arena

pytestmark = pytest.mark.slow


def _fields(chunk: Any) -> tuple[str, int, bool, bytes, bytes]:
    return (chunk.stream_id, chunk.sequence, chunk.final, bytes(chunk.ciphertext),
            bytes(chunk.tensor_digests))


def _fetched_chunks(evil: HostileClient, task: cpb.Task) -> list[tuple[Any, ...]]:
    stream = evil.aggregator.FetchModel(
        apb.FetchModelRequest(job_id=task.job_id, round=task.round, task_id=task.task_id),
        metadata=evil.metadata(), timeout=30)
    return [_fields(m.chunk) for m in stream if m.HasField("chunk")]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_task_carries_fetchmodels_chunks_and_client_uses_them(
        arena: Arena, evil: HostileClient, caplog: Any) -> None:
    with arena.frozen_round(evil) as frozen:
        task = frozen.evil_task
        assert evil.session is not None
        assert task.model_stream_id == download_stream_id(
            task.job_id, task.round, task.task_id, evil.session.session_id)
        assert [_fields(c) for c in task.model_chunks] == _fetched_chunks(evil, task)

        carried = evil._carried_model(task, task.model_manifest, None)
        assert carried is not None, "the carried model did not open"
        assert _same(evil.fetch_model(task, task.model_manifest), carried)
        fetched_only = cpb.Task()
        fetched_only.CopyFrom(task)
        fetched_only.ClearField("model_chunks")
        fetched = evil.fetch_model(fetched_only, task.model_manifest)
        assert _same(carried, fetched)

        # Unusable carried models: the client falls back to FetchModel, same result.
        flipped = cpb.Task()
        flipped.CopyFrom(task)
        data = bytearray(flipped.model_chunks[0].ciphertext)
        data[3] ^= 0x01
        flipped.model_chunks[0].ciphertext = bytes(data)
        other_session = cpb.Task()
        other_session.CopyFrom(task)
        other_session.model_stream_id = download_stream_id(
            task.job_id, task.round, task.task_id, "another-session")
        with caplog.at_level(logging.WARNING, logger="fl_client.connection"):
            assert evil._carried_model(flipped, task.model_manifest, None) is None
            assert _same(evil.fetch_model(flipped, task.model_manifest), fetched)
        assert any("unusable" in r.getMessage() for r in caplog.records)
        assert evil._carried_model(other_session, task.model_manifest, None) is None
        assert _same(evil.fetch_model(other_session, task.model_manifest), fetched)


def test_models_over_the_limit_are_not_carried() -> None:
    """Above INLINE_MODEL_MAX_BYTES (and for other task kinds) the task is left as it
    is, without even asking the engine (None here would fail if it were asked)."""
    big = cpb.Task(kind=cpb.TRAIN, task_id="t")
    big.model_manifest.total_bytes = (1 << 20) + 1
    stop = cpb.Task(kind=cpb.STOP, task_id="s")
    session: Any = object()
    assert with_model(big, None, "hospital_1", session) is big  # type: ignore[arg-type]
    assert with_model(stop, None, "hospital_1", session) is stop  # type: ignore[arg-type]
