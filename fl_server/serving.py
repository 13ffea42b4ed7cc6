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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio

from fl_server.grpc_types import GenericHandler, GenericHandlerBase, Handler
from fl_server.idle import Idle

log = logging.getLogger(__name__)

_END = object()
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the type stubs do not declare it


class CallEnded(grpc.RpcError):
    """Raised in a handler reading the requests of a call that has ended (the client
    cancelled, or the server ended it); as gRPC's synchronous server does."""


class ThreadContext:
    """The synchronous ServicerContext API over one grpc.aio call, for a handler that
    runs on a worker thread while the call lives on the event loop."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._aborted: BaseException | None = None
        self._status: tuple[grpc.StatusCode, str, tuple[Any, ...]] | None = None

    # ending the call -----------------------------------------------------------
    async def _abort(self, code: grpc.StatusCode, details: str,
                     trailing: tuple[Any, ...]) -> BaseException:
        """Send the status; returns the exception gRPC wants the handler to raise."""
        with self._lock:
            if self._aborted is not None:
                return self._aborted
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
            pending = list(self._pending)
        for future in pending:
            future.cancel()  # a read blocked on the ended call returns at once
        return error

    def abort(self, code: grpc.StatusCode, details: str = "",
              trailing_metadata: tuple[Any, ...] = ()) -> None:
        """End the call with `code`; raises (as the synchronous API does), so the
        handler stops here."""
        if self._aborted is not None:
            raise self._aborted
        future = asyncio.run_coroutine_threadsafe(
            self._abort(code, details, tuple(trailing_metadata)), self._loop)
        raise future.result()

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
            pending = list(self._pending)
        for future in pending:
            future.cancel()
        for callback in callbacks or ():
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing callback must not skip the rest
                log.exception("call-end callback failed")

    def read(self) -> Any:
        """The next request message, or _EOF; blocks this (worker) thread."""
        if self._aborted is not None:
            raise self._aborted
        future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        with self._lock:
            if self._callbacks is None:
                future.cancel()
            self._pending.add(future)
        try:
            message = future.result()
        except (concurrent.futures.CancelledError, Exception):
            if self._aborted is not None:
                raise self._aborted from None
            raise CallEnded("the call ended while its messages were being read") from None
        finally:
            with self._lock:
                self._pending.discard(future)
        if message is _EOF and self._aborted is not None:
            raise self._aborted
        return message

    async def _read(self) -> Any:
        return await self._context.read()

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
        return str(self._context.peer())

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def time_remaining(self) -> Any:
        return self._context.time_remaining()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(tuple(metadata))


class _Requests(Iterator[Any]):
    """A client stream's messages as the synchronous iterator the handlers read."""

    def __init__(self, context: ThreadContext) -> None:
        self._context = context

    def __next__(self) -> Any:
        message = self._context.read()
        if message is _EOF:
            raise StopIteration
        return message


class _Bridge:
    """Turns one synchronous method handler into a grpc.aio one."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._loop = loop
        self._pool = pool

    def handler(self, handler: Handler) -> Handler:
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, False), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, True), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, False), **kwargs)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, True), **kwargs)
        raise TypeError("method handler has no behavior")

    def _run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return self._loop.run_in_executor(self._pool, fn, *args)

    def _unary(self, behavior: Callable[[Any, Any], Any], streaming_in: bool) -> Any:
        async def call(request: Any, aio_context: Any) -> Any:
            context = ThreadContext(aio_context, self._loop)
            try:
                if streaming_in:
                    request = _Requests(context)
                return await self._run(behavior, request, context)
            except CallEnded:
                raise asyncio.CancelledError from None  # nobody is left to answer
            finally:
                context.finish()

        return call

    def _streaming(self, behavior: Callable[[Any, Any], Any], streaming_in: bool) -> Any:
        async def call(request: Any, aio_context: Any) -> Any:
            context = ThreadContext(aio_context, self._loop)
            responses: Any = None
            busy: asyncio.Future[Any] | None = None
            try:
                if streaming_in:
                    request = _Requests(context)
                responses = await self._run(behavior, request, context)
                while True:
                    busy = self._run(next, responses, _END)
                    item = await busy
                    busy = None
                    if item is _END:
                        return
                    if isinstance(item, Idle):
                        await item.wait()
                        continue
                    yield item
            except CallEnded:
                return
            finally:
                context.finish()
                if responses is not None:
                    self._close_later(responses, busy)

        return call

    def _close_later(self, responses: Any, busy: asyncio.Future[Any] | None) -> None:
        """Close the handler's generator (its `finally` blocks run) on a worker, after
        the step still running on one, if any, returns."""
        close = getattr(responses, "close", None)
        if close is None:
            return

        def submit(_done: object = None) -> None:
            try:
                self._pool.submit(close)
            except RuntimeError:  # the pool is shut down: the server is stopping
                close()

        if busy is not None and not busy.done():
            busy.add_done_callback(submit)
        else:
            submit()


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
        bridged = self._bridge.handler(handler)
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
