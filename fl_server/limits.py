"""Every call bounded: per-identity concurrency, a reserve of worker threads, and
deadlines on streams that stall.

Why: with the synchronous gRPC server every call in progress holds one worker
thread, and a stream holds it for as long as it lasts. A hospital that opened
uploads and never sent their header (or Watch / reflection streams that send
nothing, which need only a certificate) could hold every thread, after which
Status, health, Join and the honest hospitals' calls were all refused and the job
failed. So, behind the authentication interceptor (the caller's identity is known):

- each identity may hold only a few calls of each kind at once (uploads, downloads,
  task feeds, health Watch, reflection; `CALLS_PER_IDENTITY`); the next one is
  refused with ``RESOURCE_EXHAUSTED`` at once, not queued;
- all streaming calls together may hold at most ``max_workers - reserve`` threads:
  the reserve (`reserve_workers`) is never taken by a stream, so the quick calls
  (Status, health Check, Join, Report) are always served;
- a client stream must send its first message (an update's header) within
  `STREAM_HEADER_DEADLINE_S` and then never wait longer than `STREAM_IDLE_S` for
  the next; a server stream whose message the client does not take within
  `STREAM_SEND_STALL_S` is ended too. An ended call gets ``DEADLINE_EXCEEDED``
  naming the limit, and its thread returns to the pool at once.

A slot is given back when the handler returns or when the call terminates,
whichever comes first (a cancelled call wakes its blocked handler right away).
The server runs on grpc.aio (fl_server/serving.py): a call holds a thread only while
its handler has work, so an idle task stream holds none and is not counted in the
streams' thread budget (THREADLESS_KINDS); uploads, downloads, Watch and reflection
streams still are. Each open call still costs memory and a file descriptor, hence
the per-identity limits on every kind.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from fl_core.constants import (
    CALL_RESERVE_WORKERS,
    CALLS_PER_IDENTITY,
    STREAM_HEADER_DEADLINE_S,
    STREAM_IDLE_S,
    STREAM_SEND_STALL_S,
    STREAMS_PER_IDENTITY,
)
from fl_core.logs import log_event
from fl_core.ratelimit import RefusalLog
from fl_server.auth import identity_of
from fl_server.grpc_types import Handler, WrappingInterceptor, rewrap
from fl_server.idle import Idle

log = logging.getLogger("fl_server.limits")

METHOD_KINDS: Mapping[str, str] = {
    "/fl.v1.Aggregator/SubmitUpdate": "upload",
    "/fl.v1.Aggregator/SubmitSmallUpdate": "upload",  # an upload, whichever call carries it
    "/fl.v1.Aggregator/FetchModel": "download",
    "/fl.v1.Coordinator/Tasks": "tasks",
    "/grpc.health.v1.Health/Watch": "watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "reflection",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "reflection",
}


# Calls that hold no worker thread while they wait: a task stream with nothing to send
# yields its thread back (fl_server/serving.py), so task streams are limited per
# identity but do not count against the threads' stream budget; unary calls are the
# ones the reserve is kept for.
THREADLESS_KINDS = frozenset({"unary", "tasks"})


def reserve_workers(max_workers: int) -> int:
    """Threads no stream may take: CALL_RESERVE_WORKERS, but at most a quarter of
    the pool and at least 2 (a pool of 1 has no room for a reserve)."""
    return max(min(2, max_workers - 1), min(CALL_RESERVE_WORKERS, max_workers // 4))


def end_call(context: Any, code: grpc.StatusCode, message: str) -> None:
    """End a call from outside its handler thread, telling the client why (the
    serving bridge's `ThreadContext.end`, reached through the auth context wrapper)."""
    context.end(code, message)


@dataclass(slots=True)
class _Watch:
    """One stalled-stream timer: `expires` is when the call is ended unless the
    stream makes progress (math.inf while it is not waiting on the client)."""

    context: Any
    what: str
    expires: float = math.inf
    scheduled: float = math.inf
    done: bool = False
    fired: bool = False
    seq: int = 0


@dataclass(order=True, slots=True)
class _Entry:
    when: float
    seq: int
    watch: _Watch = field(compare=False)


class Watchdog:
    """One thread for every stream deadline (a timer thread per call would itself
    be a resource a flood could exhaust)."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, context: Any, what: str) -> _Watch:
        return _Watch(context, what, seq=next(self._seq))

    def arm(self, watch: _Watch, seconds: float, what: str) -> None:
        """End the call unless `disarm` comes within `seconds`."""
        watch.what = what
        watch.expires = time.monotonic() + seconds
        if watch.expires < watch.scheduled:
            with self._cv:
                watch.scheduled = watch.expires
                entry = _Entry(watch.expires, next(self._seq), watch)
                heapq.heappush(self._heap, entry)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="stream-watchdog",
                                                    daemon=True)
                    self._thread.start()
                if self._heap[0] is entry:
                    # only a new earliest deadline shortens the watchdog's sleep: waking
                    # it for every streamed message cost a thread switch per message
                    self._cv.notify()

    @staticmethod
    def disarm(watch: _Watch) -> None:
        watch.expires = math.inf

    @staticmethod
    def finish(watch: _Watch) -> None:
        # The heap keeps a finished watch until its last deadline comes (up to
        # STREAM_IDLE_S): it must not keep the ended call's context (and its peer's
        # certificate, metadata and buffers) alive that long.
        watch.done = True
        watch.expires = math.inf
        watch.context = None

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopped:
                    return
                now = time.monotonic()
                if not self._heap or self._heap[0].when > now:
                    timeout = self._heap[0].when - now if self._heap else None
                    self._cv.wait(timeout)
                    continue
                entry = heapq.heappop(self._heap)
                watch = entry.watch
                if watch.done or entry.when != watch.scheduled:
                    continue  # finished, or superseded by an earlier entry
                watch.scheduled = math.inf
                if watch.expires > now:
                    if math.isfinite(watch.expires):
                        watch.scheduled = watch.expires
                        heapq.heappush(self._heap, _Entry(watch.expires, next(self._seq),
                                                          watch))
                    continue
                context = watch.context
                if context is None:  # finished while its entry was on its way out
                    continue
                watch.done = watch.fired = True
            end_call(context, grpc.StatusCode.DEADLINE_EXCEEDED, watch.what)


class CallLimits:
    """Slots per (identity, kind) and for all streams together."""

    def __init__(self, max_workers: int,
                 per_identity: Mapping[str, int] = CALLS_PER_IDENTITY,
                 reserve: int | None = None,
                 streams_per_identity: int = STREAMS_PER_IDENTITY) -> None:
        self.streams_per_identity = streams_per_identity
        self.reserve = reserve_workers(max_workers) if reserve is None else reserve
        self.stream_budget = max(1, max_workers - self.reserve)
        self.per_identity = dict(per_identity)
        self._held: dict[tuple[str, str], int] = {}
        self._streams = 0
        self._lock = threading.Lock()

    def acquire(self, client_id: str, kind: str) -> str | None:
        """None when the call may go ahead (a slot is now held), else why not."""
        limit = self.per_identity.get(kind, self.per_identity.get("stream", 2))
        with self._lock:
            held = self._held.get((client_id, kind), 0)
            if held >= limit:
                return (f"{client_id!r} already has {held} {kind} call(s) open, the most one"
                        " identity may hold; finish or cancel one first")
            mine = self._held.get((client_id, "*streams"), 0)
            if kind != "unary" and mine >= self.streams_per_identity:
                return (f"{client_id!r} already has {mine} streaming calls open, the most one"
                        " identity may hold; finish or cancel one first")
            if kind not in THREADLESS_KINDS and self._streams >= self.stream_budget:
                return (f"the server holds {self._streams} streaming calls, all it may"
                        f" (the other {self.reserve} threads are kept for Status, health"
                        " and Join); retry shortly")
            self._held[(client_id, kind)] = held + 1
            if kind != "unary":
                self._held[(client_id, "*streams")] = mine + 1
            if kind not in THREADLESS_KINDS:
                self._streams += 1
        return None

    def release(self, client_id: str, kind: str) -> None:
        with self._lock:
            key = (client_id, kind)
            held = self._held.get(key, 0)
            if held <= 1:
                self._held.pop(key, None)
            else:
                self._held[key] = held - 1
            if kind not in THREADLESS_KINDS and held > 0:
                self._streams -= 1
            if kind != "unary" and held > 0:
                mine = self._held.get((client_id, "*streams"), 0)
                if mine <= 1:
                    self._held.pop((client_id, "*streams"), None)
                else:
                    self._held[(client_id, "*streams")] = mine - 1

    def held(self, client_id: str, kind: str) -> int:
        with self._lock:
            return self._held.get((client_id, kind), 0)

    @property
    def streams(self) -> int:
        with self._lock:
            return self._streams


class _Once:
    """A release that runs once, whichever of its two triggers comes first."""

    __slots__ = ("_fn", "_lock")

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class CallLimitInterceptor(WrappingInterceptor):
    """Installs `CallLimits` and the stream deadlines on every method. Must come
    after AuthInterceptor in the server's interceptor list (it reads the identity
    that AuthInterceptor put on the context)."""

    def __init__(self, max_workers: int, *, header_deadline_s: float = STREAM_HEADER_DEADLINE_S,
                 idle_s: float = STREAM_IDLE_S, send_stall_s: float = STREAM_SEND_STALL_S,
                 per_identity: Mapping[str, int] = CALLS_PER_IDENTITY) -> None:
        super().__init__()
        self.limits = CallLimits(max_workers, per_identity)
        self.watchdog = Watchdog()
        self.header_deadline_s = header_deadline_s
        self.idle_s = idle_s
        self.send_stall_s = send_stall_s
        self.refusals = RefusalLog(log)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        streaming_in = bool(handler.request_streaming)
        streaming_out = bool(handler.response_streaming)
        kind = METHOD_KINDS.get(method, "stream" if streaming_in or streaming_out else "unary")

        def limited(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                release = self._admit(context, method, kind)
                watches: list[_Watch] = []
                try:
                    if streaming_in:
                        watch = self.watchdog.watch(context, "")
                        watches.append(watch)
                        request = self._requests(request, watch)
                    result = behavior(request, context)
                except BaseException:
                    self._done(watches, release)
                    raise
                if streaming_out:
                    return self._responses(result, context, watches, release)
                self._done(watches, release)
                return result

            return call

        return rewrap(handler, lambda behavior, _in, _out: limited(behavior))

    def _admit(self, context: grpc.ServicerContext, method: str, kind: str) -> _Once:
        client_id = identity_of(context).client_id
        refusal = self.limits.acquire(client_id, kind)
        if refusal is not None:
            self.refusals.event(client_id, "call_refused", method=method, kind=kind,
                                reason=refusal)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        release = _Once(lambda: self.limits.release(client_id, kind))
        if not context.add_callback(release):
            release()  # the call has already ended
        return release

    def _done(self, watches: list[_Watch], release: _Once) -> None:
        for watch in watches:
            self.watchdog.finish(watch)
        release()

    def _requests(self, requests: Iterator[Any], watch: _Watch) -> Iterator[Any]:
        """The client's messages, each one awaited under a deadline: the first (an
        update's header) under the header deadline, the others under the idle one."""
        first = True
        while True:
            if first:
                self.watchdog.arm(watch, self.header_deadline_s,
                                  f"no first message (header) within"
                                  f" {self.header_deadline_s:g}s of the call's start")
            else:
                self.watchdog.arm(watch, self.idle_s,
                                  f"the stream was silent for more than {self.idle_s:g}s")
            try:
                message = next(requests)
            except StopIteration:
                self.watchdog.finish(watch)
                return
            finally:
                self.watchdog.disarm(watch)
            if watch.fired:
                return
            first = False
            yield message

    def _responses(self, responses: Iterator[Any], context: grpc.ServicerContext,
                   watches: list[_Watch], release: _Once) -> Iterator[Any]:
        """The handler's messages; each must be taken by the client within the send
        limit (the generator resumes only once gRPC has sent the previous one)."""
        watch = self.watchdog.watch(context, "")
        watches.append(watch)
        try:
            for message in responses:
                if isinstance(message, Idle):  # nothing sent: no client to wait for
                    yield message
                    continue
                self.watchdog.arm(watch, self.send_stall_s,
                                  f"the client took no message for {self.send_stall_s:g}s")
                yield message
                self.watchdog.disarm(watch)
        finally:
            self._done(watches, release)


def log_limits(interceptor: CallLimitInterceptor, max_workers: int) -> None:
    limits = interceptor.limits
    log_event(log, "call_limits", max_workers=max_workers, stream_budget=limits.stream_budget,
              reserve=limits.reserve,
              per_identity=",".join(f"{k}={v}" for k, v in limits.per_identity.items()),
              header_deadline_s=interceptor.header_deadline_s, idle_s=interceptor.idle_s)
