"""The stream watchdog (fl_server/limits.py): one thread for every stream deadline."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import grpc

from fl_server.limits import Watchdog


class _Call:
    """What the watchdog ends: records the code it was ended with."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.code: Any = None

    def end(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.ended.set()


def test_a_stalled_stream_is_ended_with_deadline_exceeded() -> None:
    dog = Watchdog()
    try:
        call = _Call()
        watch = dog.watch(call, "upload")
        dog.arm(watch, 0.05, "silent")
        assert call.ended.wait(10)
        assert call.code == grpc.StatusCode.DEADLINE_EXCEEDED and watch.fired
    finally:
        dog.stop()


def test_a_finished_stream_s_call_is_not_kept_until_its_deadline() -> None:
    """A finished watch stays in the heap until its last deadline comes (up to the idle
    limit, 120 s); the ended call, with its peer's certificate and buffers, must not
    stay with it. Nor may the watchdog end anything when the deadline does come."""
    dog = Watchdog()
    try:
        call = _Call()
        watch = dog.watch(call, "upload")
        dog.arm(watch, 0.2, "silent")
        dog.finish(watch)
        ref = weakref.ref(call)
        gc.disable()
        try:
            del call
            assert ref() is None  # freed now, not when the entry leaves the heap
        finally:
            gc.enable()
        time.sleep(0.4)  # the entry's deadline passes: skipped, not fired
        assert not watch.fired
        late = _Call()  # the thread is still alive and still ends stalled streams
        dog.arm(dog.watch(late, "download"), 0.05, "silent")
        assert late.ended.wait(10)
    finally:
        dog.stop()
