"""What a response stream hands back while it has nothing to send.

A generator behind a server-streaming call (the task feed) yields an `Idle` instead
of blocking its thread: the serving bridge (fl_server/serving.py) returns the thread
to the pool and resumes the generator when the Idle is woken or its timeout passes.
That is what lets thousands of hospitals sit connected on a few worker threads.
Whoever would have notified a condition calls `wake()` instead; it may come from any
thread, before or after the bridge starts waiting.

The contract a generator takes on by yielding an Idle: from then on the bridge takes
its messages on the event loop itself (no thread hand-off per heartbeat or task), so
its later steps must not block: take a lock briefly, never wait on one, read no
network, no disk beyond an append.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """`fn` on `loop` from any thread; nothing if the loop has closed (server stopped)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class Idle:
    """One wait of one stream: woken once, or timed out after `timeout_s`.

    Every idle hospital holds one for as long as it waits (issue 16: memory per
    connection), so it is a flag under a lock: the event a plain thread blocks on
    (`block`) is made only when one does."""

    __slots__ = ("_event", "_lock", "_notify", "_woken", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = max(0.0, timeout_s)
        self._lock = threading.Lock()
        self._woken = False
        self._event: threading.Event | None = None
        self._notify: Callable[[], None] | None = None

    def wake(self) -> None:
        with self._lock:
            self._woken = True
            notify, self._notify = self._notify, None
            event = self._event
        if event is not None:
            event.set()
        if notify is not None:
            notify()

    @property
    def woken(self) -> bool:
        return self._woken

    async def wait(self) -> None:
        """Return on `wake()` or after the timeout, on the running event loop; a wake
        from another thread is passed to the loop, never run on it directly."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        finish = functools.partial(_resolve, done)
        with self._lock:
            if self._woken:
                return
            self._notify = functools.partial(call_soon, loop, finish)
        timer = loop.call_later(self.timeout_s, finish)
        try:
            await done
        finally:
            timer.cancel()
            with self._lock:
                self._notify = None

    def block(self) -> None:
        """The same wait for a plain thread (a generator consumed outside the server)."""
        with self._lock:
            if self._woken:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        event.wait(self.timeout_s)
