"""The registry's views of who is connected and who serves the running job's model:
read by every round's selection, kept between changes, and right after each change
(a stream opened or closed, a Join's studies, the job's model type)."""

from __future__ import annotations

import threading
from collections.abc import Generator
from types import GeneratorType

from fl_server.clients import ClientRegistry
from fl_server.idle import Idle

NEVER = threading.Event()


def join(registry: ClientRegistry, client_id: str, studies: dict[str, int] | None = None,
         renewing: str = "") -> str:
    return registry.new_session(client_id, b"k" * 32, 10, studies=studies, grace_s=0.0,
                                previous_session_id=renewing).session_id


def open_stream(registry: ClientRegistry, client_id: str) -> Generator[object, None, None]:
    """A task stream, opened: its first step registers it and yields (an Idle)."""
    stream = registry.task_stream(client_id, heartbeat_s=60.0, is_active=lambda: True)
    assert isinstance(stream, GeneratorType)  # closing it ends the stream
    assert isinstance(next(stream), Idle)
    return stream


def selectable(registry: ClientRegistry) -> list[str]:
    return registry.wait_for_connected(0, 0.0, NEVER)


def test_views_follow_streams_studies_and_the_model_type() -> None:
    registry = ClientRegistry()
    sessions = {cid: join(registry, cid, studies) for cid, studies in (
        ("h3", None), ("h1", {"ecg": 5}), ("h2", {"breast_cancer": 7}))}
    assert registry.connected() == [] and selectable(registry) == []

    streams = {cid: open_stream(registry, cid) for cid in ("h3", "h1", "h2")}
    assert registry.connected() == ["h1", "h2", "h3"]
    assert selectable(registry) == ["h1", "h2", "h3"]  # no job model type yet: all

    registry.set_model_type("ecg")
    assert selectable(registry) == ["h1", "h3"]  # h3 declared no studies: serves any
    assert registry.connected() == ["h1", "h2", "h3"]

    join(registry, "h2", {"ecg": 3, "breast_cancer": 7}, renewing=sessions["h2"])  # a study more
    assert selectable(registry) == ["h1", "h2", "h3"]

    streams["h1"].close()  # the stream ends (its generator's finally)
    assert registry.connected() == ["h2", "h3"]
    assert selectable(registry) == ["h2", "h3"]

    registry.set_model_type("breast_cancer")
    assert selectable(registry) == ["h2", "h3"]
    streams["h1"] = open_stream(registry, "h1")  # back, but it serves only ecg
    assert registry.connected() == ["h1", "h2", "h3"]
    assert selectable(registry) == ["h2", "h3"]
    for stream in streams.values():
        stream.close()
    assert registry.connected() == [] and selectable(registry) == []


def test_a_caller_cannot_change_the_kept_view() -> None:
    registry = ClientRegistry()
    join(registry, "h1")
    stream = open_stream(registry, "h1")
    registry.connected().append("intruder")
    selectable(registry).clear()
    assert registry.connected() == ["h1"] and selectable(registry) == ["h1"]
    stream.close()


def test_a_waiting_selection_sees_a_stream_that_opens() -> None:
    registry = ClientRegistry()
    join(registry, "h1")
    join(registry, "h2")
    first = open_stream(registry, "h1")
    got: list[list[str]] = []
    waiter = threading.Thread(target=lambda: got.append(
        registry.wait_for_connected(2, 10.0, NEVER)))
    waiter.start()
    second = open_stream(registry, "h2")
    waiter.join(10.0)
    assert got == [["h1", "h2"]]
    first.close()
    second.close()
