"""Who is offered a completed job's final model, and what the server waits for."""

from __future__ import annotations

import torch

from fl_core.tensor_codec import build_manifest
from fl_proto import coordinator_pb2 as cpb
from fl_server.final_model import FinalDelivery
from fl_server.rounds import ModelVersion


def model_version(version: int, value: float) -> ModelVersion:
    state = {"w": torch.full((3,), value)}
    return ModelVersion(version, state, build_manifest(state), f"sha-{version}")


def test_only_participants_get_the_model_and_only_connected_ones_are_awaited() -> None:
    final = FinalDelivery()
    assert not final.awaited(["h1"])  # nothing offered yet
    assert not final.stop_task("h1", "job", 3).HasField("model_manifest")
    model = model_version(3, 1.0)
    manifest = model.manifest
    final.open("job", 3, model, lambda _client: manifest, {"h1", "h2"})
    offered = final.stop_task("h1", "job", 3)
    assert offered.kind == cpb.STOP and (offered.job_id, offered.round) == ("job", 3)
    assert offered.model_manifest == manifest
    assert final.stop_task("h1", "job", 3).task_id == offered.task_id  # stable on re-send
    outsider = final.stop_task("h3", "job", 3)
    assert outsider.kind == cpb.STOP and not outsider.HasField("model_manifest")
    assert final.offer_of("h1", offered.task_id) == (offered, model)
    assert final.offer_of("h2", offered.task_id) is None  # another hospital's task id
    assert final.offer_of("h3", outsider.task_id) is None  # a plain STOP fetches nothing
    assert final.awaited(["h1", "h3"])
    assert not final.awaited(["h3"])  # the ones left are gone: not waited for
    final.fetched("h1")
    assert not final.awaited(["h1", "h3"]) and final.awaited(["h2"])


def test_the_offered_model_is_served_while_the_next_job_runs() -> None:
    """The next queued job starts as soon as one completes, and from then on its engine
    serves its own model; a hospital still fetching the completed job's final model gets
    that one (it was refused FAILED_PRECONDITION, and left without it, when the model
    was looked up in the engine)."""
    final = FinalDelivery()
    done = model_version(2, 5.0)
    final.open("job-a", 2, done, lambda _client: done.manifest, {"h1"})
    offered = final.stop_task("h1", "job-a", 2)
    final.begin_job("job-b", "symptom")  # the next job's engine now serves round 0 of b
    assert final.offer_of("h1", offered.task_id) == (offered, done)
    assert final.stop_task("h1", "job-a", 2) == offered  # still offered, as before
    # once the next job completes, its model replaces the offer
    newer = model_version(1, 7.0)
    final.open("job-b", 1, newer, lambda _client: newer.manifest, {"h1"})
    assert final.offer_of("h1", offered.task_id) is None
    task = final.stop_task("h1", "job-b", 1)
    assert final.offer_of("h1", task.task_id) == (task, newer)


def test_a_stop_is_not_swallowed_by_the_next_jobs_first_task() -> None:
    """The next job's first task replaces a hospital's pending task at once; the STOP
    that carries the last job's final model must still reach its task stream first."""
    from fl_server.clients import ClientRegistry

    registry = ClientRegistry()
    registry.assign("h1", cpb.Task(task_id="t1", kind=cpb.TRAIN, job_id="a", round=2))
    registry.broadcast(lambda cid: cpb.Task(task_id="stop-a", kind=cpb.STOP, job_id="a"))
    registry.assign("h1", cpb.Task(task_id="t2", kind=cpb.TRAIN, job_id="b", round=1))
    stream = registry.task_stream("h1", heartbeat_s=0.3, is_active=lambda: True)

    def sent() -> cpb.Task:
        """The next message the stream sends, waiting out its idle spells."""
        for _ in range(100):
            item = next(stream)
            if isinstance(item, cpb.Task):
                return item
            item.block()
        raise AssertionError("the stream sent nothing")

    try:
        assert [sent().task_id for _ in range(2)] == ["stop-a", "t2"]
        # a STOP still pending after it was sent is not sent again on the same stream
        registry.broadcast(lambda cid: cpb.Task(task_id="stop-b", kind=cpb.STOP, job_id="b"))
        assert sent().task_id == "stop-b"
        assert sent().kind == cpb.HEARTBEAT
    finally:
        registry.close()
        stream.close()
