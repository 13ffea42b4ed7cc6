"""The server's gRPC front: grpc.aio underneath, the services' synchronous code on top.

Why: under gRPC's synchronous server every open call holds a worker thread for as
long as it lasts, and every connected hospital keeps a task stream open for days, so
one server held at most `--max_workers` hospitals (issue 16). Under grpc.aio an open
call is a coroutine. This module runs each synchronous handler, with the
interceptors as they are (authentication, call limits, the refusal audit), on a
worker thread only while it has work: a response generator with nothing to send
yields an `Idle` (fl_server/idle.py), its thread goes back to the pool, and the
stream resumes when the Idle is woken. An idle hospital costs a coroutine and its
connection, not a thread.

Why not grpc.aio's own support for synchronous handlers (`migration_thread_pool`):
it keeps the thread for a stream's whole life, and its context for them has no
`is_active`, no `abort_with_status`, no end-of-call callbacks for streams, and an
`abort` that returns, all of which the services and the limits rely on.
`ThreadContext` is the synchronous context they expect, over an aio call.

A method registered with `AioServer.run_on_loop_when_read` skips the worker for a short
client stream: the loop reads it ahead (no thread held while it arrives, for up to
LOOP_READ_WAIT_S), and when the whole stream is in and the service's predicate accepts
it, the handler runs there and then on the loop's own thread; a unary method's one
request is whole at once (SubmitSmallUpdate). Handing a small upload to a worker and
back cost about a seventh of a small round's server CPU per hospital (issue 16 item 2).
The predicate is the service's promise that the handler will not wait on anything
another call's handler may hold: the loop, and so every call's I/O, would wait with it,
and a holder that needs the loop to read its own stream would never let go.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from fl_core.constants import LOOP_READ_WAIT_S
from fl_core.errors import Refusal, status_of
from fl_server.grpc_types import GenericHandler, GenericHandlerBase, Handler, rewrap
from fl_server.idle import Idle, call_soon

log = logging.getLogger(__name__)

_END = object()
# Messages the loop reads ahead of a handler, and a handler writes ahead of the
# client: bounded, so a 1 MiB-chunk transfer buffers at most a few MiB per call.
READ_AHEAD = 4
WRITE_AHEAD = 4
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the type stubs do not declare it


class CallEnded(grpc.RpcError):
    """Raised in a handler reading the requests of a call that has ended (the client
    cancelled, or the server ended it); as gRPC's synchronous server does."""


class Refused(Exception):  # noqa: N818 - named for what happened, as grpc's AbortError
    """What a handler's `context.abort` raises. The status is recorded and sent once the
    handler has unwound, as gRPC's synchronous server does: its `finally` blocks (an
    upload's lock, a spool file, the refusal audit, the call limits) are done before the
    client can see the refusal and call again. Sent at once, a client retrying straight
    away met the refused call's upload still held (BUSY in CI)."""


# Whether a client stream read whole on the loop may be handled there (see the module
# docstring): called on the loop with the stream's messages, so quick and non-blocking.
OnLoopPredicate = Callable[[Sequence[Any]], bool]

# What of the call's auth context is kept once the caller is authenticated: the refusal
# audit (fl_server/audit.py) names the caller of a call that ends with an error by it.
KEPT_AUTH_PROPERTIES = ("x509_common_name",)


class ThreadContext:
    """The synchronous ServicerContext API over one grpc.aio call, for a handler that
    runs on a worker thread while the call lives on the event loop.

    Slotted, like the bridge's other per-call objects: a connected hospital keeps one
    of each for as long as its task stream is open (issue 16: memory per connection).

    `on_loop` is True while the handler runs on the event loop's own thread (a short
    client stream, see the module docstring): a handler that could wait on a lock
    another call holds must not wait there."""

    __slots__ = ("_aborted", "_auth", "_buffers", "_callbacks", "_context", "_deadline",
                 "_lock", "_loop", "_metadata", "_peer", "_status", "on_loop")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []
        self._buffers: list[_Buffer] = []  # hand-offs to release when the call ends
        self._aborted: BaseException | None = None
        self._status: tuple[grpc.StatusCode, str, tuple[Any, ...]] | None = None
        self.on_loop = False
        # What the handler may ask about the call, read now on the loop thread while
        # the call is alive: gRPC's core call may be freed as soon as the client goes
        # away, while a worker still runs the handler (reading it then crashed).
        self._peer = str(context.peer())
        self._auth = context.auth_context()
        self._metadata = context.invocation_metadata()
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining

    # ending the call -----------------------------------------------------------
    async def _abort(self, code: grpc.StatusCode, details: str,
                     trailing: tuple[Any, ...]) -> BaseException:
        """Send the status; returns the exception gRPC wants the handler to raise. A
        refusal the handler recorded but has not yet unwound from (it may be blocked
        writing to a client that reads nothing) is the status sent, now."""
        with self._lock:
            if self._aborted is not None and not isinstance(self._aborted, Refused):
                return self._aborted
            if self._callbacks is None:  # the handler is done: gRPC owns the call now
                return CallEnded("the call had already ended")
            if self._status is not None and isinstance(self._aborted, Refused):
                code, details, trailing = self._status
            self._status = (code, details, trailing)
        try:
            await self._context.abort(code, details, trailing)
        except grpc.aio.AbortError as exc:
            error: BaseException = exc
        except Exception as exc:  # noqa: BLE001 - the call had already ended
            error = CallEnded(f"the call ended before it could be refused: {exc}")
        else:  # pragma: no cover - abort always raises
            error = CallEnded("the call was ended")
        with self._lock:
            self._aborted = error
            buffers = list(self._buffers)
        for buffer in buffers:
            buffer.close()  # a read blocked on the ended call returns at once
        return error

    def abort(self, code: grpc.StatusCode, details: str = "",
              trailing_metadata: tuple[Any, ...] = ()) -> None:
        """End the call with `code`; raises `Refused` (as the synchronous API raises), so
        the handler stops here. The status goes out once the handler has returned
        (`send_refusal`); reads of the call's messages fail from now on."""
        with self._lock:
            if self._aborted is not None:
                raise self._aborted
            if self._callbacks is None or self._status is not None:
                raise CallEnded("the call had already ended")  # or is being ended
            self._status = (code, details, tuple(trailing_metadata))
            error = self._aborted = Refused(details)
        # The buffers stay open until the call ends: this thread is the handler's, and
        # whatever it writes before the refusal (a stream's messages) still goes out.
        raise error

    @property
    def refused(self) -> bool:
        """The handler aborted and its status has not been sent yet."""
        return isinstance(self._aborted, Refused)

    async def send_refusal(self) -> None:
        """Send the status a handler's `abort` recorded, if it did (raises gRPC's
        AbortError, as aio's own abort does); on the loop, after the handler."""
        if not isinstance(self._aborted, Refused) or self._status is None:
            return
        code, details, trailing = self._status
        try:
            await self._context.abort(code, details, trailing)
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the client has gone: nobody to answer
            raise asyncio.CancelledError from None

    def abort_with_status(self, status: Any) -> None:
        self.abort(status.code, status.details, tuple(status.trailing_metadata or ()))

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the call from another thread without waiting (the stream watchdog); the
        handler's next read or write raises, a blocked read at once."""
        asyncio.run_coroutine_threadsafe(self._abort(code, details, ()), self._loop)

    def cancel(self) -> None:
        self.end(grpc.StatusCode.CANCELLED, "cancelled by the server")

    # the call's life -------------------------------------------------------------
    def is_active(self) -> bool:
        return self._callbacks is not None and self._aborted is None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends; False (and not run) if it has ended."""
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def finish(self) -> None:
        """The call is over: run its callbacks once, release reads still waiting."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
            buffers = list(self._buffers)
        for buffer in buffers:
            buffer.close()
        for callback in callbacks or ():
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing callback must not skip the rest
                log.exception("call-end callback failed")

    def attach(self, buffer: _Buffer) -> None:
        """Close `buffer` when the call ends (at once if it has)."""
        with self._lock:
            if self._callbacks is not None and self._aborted is None:
                self._buffers.append(buffer)
                return
        buffer.close()

    def failed(self) -> BaseException:
        """What a handler reading or writing an ended call raises."""
        return self._aborted or CallEnded("the call ended while its messages were moving")

    # what the call says ------------------------------------------------------------
    def code(self) -> Any:
        return self._status[0] if self._status is not None else self._context.code()

    def details(self) -> Any:
        return self._status[1] if self._status is not None else self._context.details()

    def trailing_metadata(self) -> Any:
        if self._status is not None:
            return self._status[2]
        return self._context.trailing_metadata()

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> Any:
        return self._auth

    def invocation_metadata(self) -> Any:
        return self._metadata

    def drop_credentials(self) -> None:
        """Forget the peer's certificate and the call's metadata (its bearer token) once
        the authentication interceptor has read them: a task stream lives for days and
        nothing after the check reads them (the services read `context.identity`), but
        they were a tenth of an idle connection's memory. The caller's common name
        stays, for the refusal audit."""
        auth = self._auth or {}
        self._auth = {key: auth[key] for key in KEPT_AUTH_PROPERTIES if key in auth}
        self._metadata = None

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(tuple(metadata))


class _Buffer:
    """A bounded hand-off between the event loop and one worker thread.

    Why: a hop per message (a coroutine scheduled from the thread, or an executor
    job per `next()`) cost more than gRPC's synchronous server did per call. Here
    the loop reads ahead and the worker writes ahead, up to `limit` messages; a side
    is woken only when it is actually waiting (the loop through
    call_soon_threadsafe, the thread through a lock it blocks on).

    The thread side's waits are a lock made when a thread actually waits, not a
    `threading.Condition` per buffer: an idle task stream keeps its outbox for days
    and never waits on it, and a condition with its deque cost ~1 KB a connection."""

    __slots__ = ("_items", "_limit", "_lock", "_loop", "_loop_waiter", "_waiters", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._items: list[Any] = []  # at most `limit` (a few): pop(0) is cheap
        self._lock = threading.Lock()
        self._waiters: list[threading.Lock] | None = None  # threads blocked in put/take
        self._loop_waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _wait(self) -> None:
        """Block the calling thread until the other side notifies; `_lock` is held on
        entry and again on return, as a condition variable's wait."""
        waiter = threading.Lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        self._lock.release()
        try:
            waiter.acquire()
        finally:
            self._lock.acquire()

    def _notify(self, every: bool = False) -> None:
        """Wake one blocked thread (all with `every`); `_lock` held."""
        waiters = self._waiters
        if not waiters:
            return
        if every:
            self._waiters = None
            for waiter in waiters:
                waiter.release()
        else:
            waiters.pop(0).release()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._notify(every=True)
            waiter, self._loop_waiter = self._loop_waiter, None
        if waiter is not None:
            _wake_soon(self._loop, waiter)

    # thread side
    def put(self, item: Any) -> bool:
        """Queue `item` for the loop (blocks while full); False once closed."""
        with self._lock:
            while len(self._items) >= self._limit and not self.closed:
                self._wait()
            if self.closed:
                return False
            self._items.append(item)
            waiter, self._loop_waiter = self._loop_waiter, None
        if waiter is not None:
            _wake_soon(self._loop, waiter)
        return True

    def take(self) -> Any:
        """The next item from the loop (blocks while empty); _END once closed."""
        with self._lock:
            while not self._items and not self.closed:
                self._wait()
            if not self._items:
                return _END
            item = self._items.pop(0)
            waiter, self._loop_waiter = self._loop_waiter, None
        if waiter is not None:
            _wake_soon(self._loop, waiter)  # room again for a loop that was full
        return item

    # loop side
    @property
    def full(self) -> bool:
        return len(self._items) >= self._limit

    def queued(self) -> list[Any]:
        """What is waiting to be taken, in order (left in place)."""
        with self._lock:
            return list(self._items)

    async def get(self) -> Any:
        """The next item from the thread; _END once closed and drained."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.pop(0)
                    self._notify()
                    return item
                if self.closed:
                    return _END
                waiter = self._loop_waiter = self._loop.create_future()
            await waiter

    async def push(self, item: Any) -> bool:
        """Queue `item` for the thread, waiting while full; False once closed."""
        while True:
            with self._lock:
                if self.closed:
                    return False
                if len(self._items) < self._limit:
                    self._items.append(item)
                    self._notify()
                    return True
                waiter = self._loop_waiter = self._loop.create_future()
            await waiter


def _wake_soon(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    call_soon(loop, wake)


class _Raised:
    """An exception from the handler's thread, carried to the loop to be raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Requests(Iterator[Any]):
    """A client stream's messages as the synchronous iterator the handlers read; the
    loop reads them ahead into a buffer (`pump`)."""

    __slots__ = ("_context", "_inbox")

    def __init__(self, context: ThreadContext, inbox: _Buffer) -> None:
        self._context = context
        self._inbox = inbox

    def queued(self) -> list[Any]:
        """The messages read ahead and not yet taken (the end of the stream left out)."""
        return [item for item in self._inbox.queued() if item is not _EOF]

    def __next__(self) -> Any:
        if self._context._aborted is not None:  # refused, or ended: no more messages
            raise self._context._aborted
        item = self._inbox.take()
        if item is _EOF:
            if self._context._aborted is not None:
                raise self._context._aborted
            raise StopIteration
        if isinstance(item, _Raised) and isinstance(item.error, DecodeError):
            # a message gRPC's deserializer could not read: the call is alive, so the
            # client is told (before, it waited out its deadline for an answer)
            self._context.abort_with_status(status_of(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a message of this stream cannot be read: {item.error}", Refusal.UNREADABLE))
        if item is _END or isinstance(item, _Raised):
            raise self._context.failed()
        return item


async def _pump(aio_context: Any, inbox: _Buffer,
                settled: asyncio.Future[bool] | None = None) -> None:
    """Read the client's messages into `inbox` until EOF, the call ends or it closes.

    `settled` is resolved once the stream's fate is known: True when its end is queued
    (the whole stream is in `inbox`), False when it fills `inbox` first or fails."""
    try:
        while True:
            message = await aio_context.read()
            pushed = await inbox.push(message)
            if settled is not None and not settled.done() \
                    and (message is _EOF or not pushed or inbox.full):
                settled.set_result(pushed and message is _EOF)
            if not pushed or message is _EOF:
                return
    except Exception as exc:  # noqa: BLE001 - the call ended; the reader is told so
        await inbox.push(_Raised(exc))
    finally:
        if settled is not None and not settled.done():
            settled.set_result(False)


def _accepts(eligible: OnLoopPredicate, messages: Sequence[Any]) -> bool:
    """Whether `eligible` lets a call whose requests are `messages` run on the loop;
    a predicate that fails sends the call to a worker, whose handler says what is
    wrong with it."""
    try:
        return bool(eligible(messages))
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("deciding where to run a call failed")
        return False


class _Bridge:
    """Turns one synchronous method handler into a grpc.aio one."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._loop = loop
        self._pool = pool
        self._pumps: set[asyncio.Task[None]] = set()
        self.on_loop: dict[str, OnLoopPredicate] = {}  # method -> its predicate

    def handler(self, handler: Handler, method: str = "") -> Handler:
        eligible = self.on_loop.get(method)
        return rewrap(handler, lambda behavior, streaming_in, streaming_out: (
            self._streaming(behavior, streaming_in) if streaming_out
            else self._unary(behavior, streaming_in, eligible)))

    def _requests(self, context: ThreadContext, aio_context: Any,
                  settled: asyncio.Future[bool] | None = None) -> _Requests:
        inbox = _Buffer(self._loop, READ_AHEAD)
        context.attach(inbox)
        # The pump is never cancelled: cancelling a read that gRPC has in flight can
        # leave the core call completing an operation after its state is freed (the
        # server died in tests/hostile when refused uploads were cancelled so). It ends
        # by itself: the buffer is closed with the call, and a pending read completes
        # once the call's status is sent.
        pump = self._loop.create_task(_pump(aio_context, inbox, settled))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        return _Requests(context, inbox)

    async def _read_whole(self, context: ThreadContext, aio_context: Any,
                          eligible: OnLoopPredicate) -> tuple[_Requests, bool]:
        """The call's requests, and whether the handler may run on the loop: the whole
        stream arrived within LOOP_READ_WAIT_S and `eligible` accepts its messages.
        Waiting holds no thread; the read in flight is not cancelled when the wait
        ends, it goes on feeding the worker."""
        settled: asyncio.Future[bool] = self._loop.create_future()
        requests = self._requests(context, aio_context, settled)
        done, _ = await asyncio.wait((settled,), timeout=LOOP_READ_WAIT_S)
        if not done or not settled.result():
            return requests, False
        return requests, _accepts(eligible, requests.queued())

    def _unary(self, behavior: Callable[[Any, Any], Any], streaming_in: bool,
               eligible: OnLoopPredicate | None = None) -> Any:
        async def call(request: Any, aio_context: Any) -> Any:
            context = ThreadContext(aio_context, self._loop)
            result = None
            try:
                if streaming_in and eligible is not None:
                    request, context.on_loop = await self._read_whole(context, aio_context,
                                                                      eligible)
                elif streaming_in:
                    request = self._requests(context, aio_context)
                elif eligible is not None:  # a unary call's request is whole already
                    context.on_loop = _accepts(eligible, (request,))
                if context.on_loop:  # the whole stream is in: nothing here waits for the loop
                    result = behavior(request, context)
                else:
                    result = await self._loop.run_in_executor(self._pool, behavior, request,
                                                              context)
            except Refused:
                pass  # sent below, once the call's end-of-call callbacks have run
            except CallEnded:
                raise asyncio.CancelledError from None  # nobody is left to answer
            finally:
                context.finish()
            # also when a handler caught its own abort and returned: the refusal stands
            if context.refused:
                await context.send_refusal()
            return result

        return call

    def _streaming(self, behavior: Callable[[Any, Any], Any], streaming_in: bool) -> Any:
        # A coroutine that writes each message itself, not an async generator: grpc.aio
        # keeps the last message an async generator yielded until it yields the next,
        # and an idle task stream's next message is its heartbeat, 30 s on: every
        # hospital that had a task with a carried model kept that model (sealed for it,
        # 0.2-1 MiB) for that long, ~400 KB per connection at 1,000 hospitals with 10
        # selected a round (issue 16 item 4; heaptrack: upb arenas from seal_into_task).
        async def call(request: Any, aio_context: Any) -> None:
            context = ThreadContext(aio_context, self._loop)
            outbox = _Buffer(self._loop, WRITE_AHEAD)
            context.attach(outbox)
            if streaming_in:
                request = self._requests(context, aio_context)
            # a partial, not a closure: the call's frame keeps no cells for days
            run = _Run(functools.partial(behavior, request, context), outbox, self._pool)
            # Until the generator first yields an Idle its steps run on a worker (the
            # start authenticates, a download seals); after it, on the loop (idle.py).
            on_loop = False
            try:
                run.step()
                while True:
                    item = run.step_here() if on_loop else await outbox.get()
                    if item is _END:
                        if context._aborted is not None \
                                and not isinstance(context._aborted, Refused):
                            raise context._aborted
                        break
                    if isinstance(item, _Raised):
                        if isinstance(item.error, CallEnded):
                            return
                        if isinstance(item.error, Refused):
                            break
                        raise item.error
                    if isinstance(item, Idle):
                        await item.wait()
                        on_loop = True
                        continue
                    await aio_context.write(item)
                    item = None  # not kept while the stream waits for its next message
            finally:
                context.finish()
                run.stop()
            if context.refused:  # the handler ended: its abort goes out now
                await context.send_refusal()

        return call


class _Run:
    """A response generator driven on a worker thread: `step` runs it until it has
    nothing to send (an Idle, the end, an error), writing ahead into the outbox, then
    gives the thread back; after an Idle, `step_here` takes one message at a time on
    the event loop (the generator's steps from then on do not block: idle.py). `stop`
    closes the generator once no step runs, on a worker (its `finally` may write the
    audit trail), unless it has already ended."""

    __slots__ = ("_ended", "_lock", "_outbox", "_pool", "_responses", "_running", "_start",
                 "_stopped")

    def __init__(self, start: Callable[[], Any], outbox: _Buffer,
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._start: Callable[[], Any] | None = start
        self._responses: Any = None
        self._outbox = outbox
        self._pool = pool
        self._lock = threading.Lock()
        self._running = False
        self._stopped = False
        self._ended = False  # the generator returned or raised: nothing to close

    def step(self) -> None:
        with self._lock:
            self._running = True
        try:
            self._pool.submit(self._drive)
        except RuntimeError:  # the pool is shut down: the server is stopping
            with self._lock:
                self._running = False
            self._outbox.close()

    def _drive(self) -> None:
        try:
            if self._start is not None:
                start, self._start = self._start, None
                self._responses = start()
            while True:
                item = next(self._responses, _END)
                if item is _END:
                    self._ended = True
                if not self._outbox.put(item):
                    break
                if item is _END or isinstance(item, Idle):
                    break
        except BaseException as exc:  # noqa: BLE001 - carried to the loop and raised there
            self._ended = True
            self._outbox.put(_Raised(exc))
        finally:
            with self._lock:
                self._running = False
                close = self._stopped
            if close and not self._ended:
                self._close()

    def step_here(self) -> Any:
        """The generator's next message, taken on the calling thread (the loop); _END
        at its end, a _Raised if it raised."""
        try:
            item = next(self._responses, _END)
        except BaseException as exc:  # noqa: BLE001 - raised by the caller, on the loop
            self._ended = True
            return _Raised(exc)
        if item is _END:
            self._ended = True
        return item

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            close = not self._running and not self._ended
        if close:
            try:
                self._pool.submit(self._close)
            except RuntimeError:  # the pool is shut down: the server is stopping
                self._close()

    def _close(self) -> None:
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()


class _Resolver(GenericHandlerBase):
    """The aio server's one generic handler: finds the method among the services'
    handlers, runs the synchronous interceptors over it as grpc.server would (the
    first in the list outermost), and bridges the result (cached per method)."""

    def __init__(self, interceptors: Sequence[Any], bridge: _Bridge) -> None:
        self._interceptors = tuple(interceptors)
        self._bridge = bridge
        self._methods: dict[str, Handler] = {}
        self._generic: list[GenericHandler] = []
        self._bridged: dict[str, tuple[Handler, Handler]] = {}

    def add_methods(self, service: str, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def add_generic(self, handlers: Sequence[GenericHandler]) -> None:
        self._generic.extend(handlers)

    def on_loop(self, method: str, eligible: OnLoopPredicate) -> None:
        self._bridge.on_loop[method] = eligible
        self._bridged.pop(method, None)

    def _find(self, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._methods.get(details.method)
        if handler is not None:
            return handler
        for generic in self._generic:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None] = self._find
        for interceptor in reversed(self._interceptors):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._bridged.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        bridged = self._bridge.handler(handler, method)
        self._bridged[method] = (handler, bridged)
        return bridged


class _Stopped:
    """What `stop` returns: `wait(timeout)` as grpc.server's stop event has."""

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self._future = future

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True


class AioServer:
    """A grpc.aio server on its own event-loop thread, driven with grpc.server's
    synchronous API (add the servicers, add_secure_port, start, stop), so the
    services, the interceptors and the tests see the server they know.

    `max_workers` threads run handlers while they have work; `maximum_concurrent_rpcs`
    caps calls open at once (idle task streams included)."""

    def __init__(self, max_workers: int, interceptors: Sequence[Any] = (),
                 options: Sequence[tuple[str, Any]] = (),
                 maximum_concurrent_rpcs: int | None = None) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers,
                                                           thread_name_prefix="grpc")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio",
                                        daemon=True)
        self._thread.start()
        self._resolver = _Resolver(interceptors, _Bridge(self._loop, self._pool))
        self._stopped: _Stopped | None = None

        async def build() -> grpc.aio.Server:
            return grpc.aio.server(handlers=[self._resolver], options=list(options),
                                   maximum_concurrent_rpcs=maximum_concurrent_rpcs)

        self._server = self._call(build())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # grpc.Server's registration API, as the generated add_*_to_server use it --------
    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        self._resolver.add_generic(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, Handler]) -> None:
        self._resolver.add_methods(service, handlers)

    def run_on_loop_when_read(self, method: str, eligible: OnLoopPredicate) -> None:
        """Run `method` ("/package.Service/Method") on the event loop when
        `eligible(messages)` says its handler will not wait on another call there
        (module docstring): a client-streaming method once its whole stream has
        arrived within LOOP_READ_WAIT_S, a unary one at once (`messages` is its one
        request). Register before the first call."""
        self._resolver.on_loop(method, eligible)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        async def add() -> int:
            return int(self._server.add_secure_port(address, credentials))

        return int(self._call(add()))

    def add_insecure_port(self, address: str) -> int:
        async def add() -> int:
            return int(self._server.add_insecure_port(address))

        return int(self._call(add()))

    def start(self) -> None:
        self._call(self._server.start())

    def stop(self, grace: float | None) -> _Stopped:
        """Refuse new calls, give open ones `grace` seconds, cancel the rest; then the
        loop and the workers end. Returns at once; `.wait()` for the end."""
        if self._stopped is not None:
            return self._stopped

        async def stop() -> None:
            await self._server.stop(grace)

        future = asyncio.run_coroutine_threadsafe(stop(), self._loop)

        def after(_done: object) -> None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._loop.call_soon_threadsafe(self._loop.stop)

        future.add_done_callback(after)
        self._stopped = _Stopped(future)
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


__all__ = ["AioServer", "CallEnded", "ThreadContext"]

