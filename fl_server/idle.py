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
import threading
from collections.abc import Callable


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """`fn` on `loop` from any thread; nothing if the loop has closed (server stopped)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


class Idle:
    """One wait of one stream: woken once, or timed out after `timeout_s`."""

    __slots__ = ("_lock", "_notify", "_woken", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = max(0.0, timeout_s)
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._notify: Callable[[], None] | None = None

    def wake(self) -> None:
        with self._lock:
            self._woken.set()
            notify, self._notify = self._notify, None
        if notify is not None:
            notify()

    @property
    def woken(self) -> bool:
        return self._woken.is_set()

    async def wait(self) -> None:
        """Return on `wake()` or after the timeout, on the running event loop; a wake
        from another thread is passed to the loop, never run on it directly."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        with self._lock:
            if self._woken.is_set():
                return
            self._notify = lambda: call_soon(loop, finish)
        timer = loop.call_later(self.timeout_s, finish)
        try:
            await done
        finally:
            timer.cancel()
            with self._lock:
                self._notify = None

    def block(self) -> None:
        """The same wait for a plain thread (a generator consumed outside the server)."""
        self._woken.wait(self.timeout_s)
