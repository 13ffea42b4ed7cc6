"""Light no-op hospitals: thousands of real connections on one event loop per process.

    python -m bench.light_clients --server 127.0.0.1:PORT --work DIR \
        --clients hospital_1,hospital_2 [--rate 25] [--mode stream] [--status_file F]

Why not bench.noop_client's threads: gRPC Python's synchronous channel polls each
channel with an open streaming call on a thread of its own, so 5,000 hospitals
holding their task streams were 5,000 client threads (plus their own) on the same
cores as the server, and the measurement was of that storm, not of the server
(BENCHMARKS section 4). Here a process holds its hospitals on one asyncio loop
(grpc.aio: one poller for every channel) and a few worker threads.

Each hospital still speaks the real protocol over its own connection: its own
certificate and mTLS channel (grpc.aio, with a subchannel pool of its own, so one
TCP + TLS connection per hospital), Join through fl_client.connection.ServerConnection
(X25519 key agreement, the session token, renewal), the pushed task stream read on
the loop (heartbeats included), and a TRAIN or EVALUATE task answered by
bench.noop_client.NoopClient on a worker thread: ServerConnection's sealed, resumable
fetch_model / submit_update, whose stubs are bridged onto the hospital's own aio
channel (`SyncStub`), so a round moves over the connection the hospital holds.

`--mode` stops a hospital part-way, to see what each part costs the server:
`tls` (the channel connected, no call), `join` (+ a session, no stream), `stream`
(the whole hospital: connected, as the server counts it).

Connections are opened at `--rate` per second, at most CONNECTING at a time, with
generous timeouts, and a failed hospital retries with jittered backoff. Every second
the process writes its counts to `--status_file` (JSON).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.common import write_json
from bench.noop_client import NoopClient, client_parser, parse_client_args
from fl_core.tls import channel_credentials, channel_options
from fl_proto import aggregator_pb2_grpc as apb_grpc
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc

log = logging.getLogger("bench.light_clients")

MODES = ("tls", "join", "stream")
CONNECT_TIMEOUT_S = 120.0  # a TLS handshake behind thousands of others
CONNECTING = 8  # hospitals of one process connecting and joining at once
WORKERS = 4  # threads of one process for Join and the sealed transfers
WAIT_S = 600.0  # a worker's bound on one loop operation (each call has its deadline too)
MAX_BACKOFF_S = 30.0
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the type stubs do not declare it


class SyncStub:
    """A generated stub's synchronous face over its grpc.aio twin, for a worker thread.

    ServerConnection drives its stubs synchronously (Join, Report, the sealed
    FetchModel / SubmitUpdate streams and their resume logic); this runs each of
    those calls on the hospital's aio channel, on the loop, and hands the results
    to the thread, so the transfer code is reused as it is and no second
    connection is opened."""

    def __init__(self, stub: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._stub = stub
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)
        if isinstance(method, grpc.aio.UnaryStreamMultiCallable):
            return functools.partial(self._unary_stream, method)
        if isinstance(method, grpc.aio.StreamUnaryMultiCallable):
            return functools.partial(self._stream_unary, method)
        if isinstance(method, grpc.aio.UnaryUnaryMultiCallable):
            return functools.partial(self._unary_unary, method)
        raise TypeError(f"{name}: bidirectional streams are not bridged")

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(WAIT_S)

    def _cancel(self, call: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self._loop.call_soon_threadsafe(call.cancel)

    def _unary_unary(self, method: Any, request: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return await method(request, **kwargs)

        return self._run(call())

    def _unary_stream(self, method: Any, request: Any, **kwargs: Any) -> Iterator[Any]:
        async def start() -> Any:
            return method(request, **kwargs)

        call = self._run(start())

        def messages() -> Iterator[Any]:
            try:
                while True:
                    message = self._run(call.read())
                    if message is _EOF:
                        return
                    yield message
            finally:
                self._cancel(call)  # a reader that stops early ends the call

        return messages()

    def _stream_unary(self, method: Any, requests: Any, **kwargs: Any) -> Any:
        async def start() -> Any:
            return method(**kwargs)  # no iterator: the call is written to

        async def result() -> Any:
            return await call

        call = self._run(start())
        try:
            for message in requests:  # produced (sealed) here, on the worker thread
                self._run(call.write(message))
            self._run(call.done_writing())
            return self._run(result())
        except BaseException:
            self._cancel(call)
            raise


class LightHospital:
    """One hospital on the loop: connect, Join, hold the task stream, answer tasks."""

    def __init__(self, name: str, server: str, tls: tuple[bytes, bytes, bytes], seed: int,
                 keep_running: bool, max_failures: int = 50,
                 fresh_transfers: bool = False) -> None:
        self.noop = NoopClient(name, server, tls, seed=seed, keep_running=keep_running)
        self.name = name
        self.server = server
        self._creds = channel_credentials(*tls)
        self.keep_running = keep_running
        self.fresh_transfers = fresh_transfers
        self.max_failures = max_failures
        self.state = "new"
        self.heartbeats = 0
        self.reconnects = 0
        self.failures = 0
        self.error = ""
        self.finished = False

    async def run(self, mode: str, connecting: asyncio.Semaphore,
                  pool: concurrent.futures.ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.name)
        delay = 1.0
        while self.failures <= self.max_failures:
            channel = self._channel()
            try:
                async with connecting:
                    await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
                    self.state = "tls"
                    if mode != "tls":
                        metadata = await self._join(channel, loop, pool)
                        self.state = "joined"
                if mode == "stream":
                    await self._serve(channel, metadata, loop, pool)
                    if self.finished:
                        return
                else:
                    await asyncio.Event().wait()  # held until the process stops
                delay = 1.0  # the stream ran and ended: reconnect soon
            except Exception as exc:  # noqa: BLE001 - counted, logged, and retried
                self.failures += 1
                code = getattr(exc, "code", None)
                self.error = (f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]
                              if callable(code) else f"{type(exc).__name__}: {exc}")
                log.warning("%s (%s): %s; reconnecting", self.name, self.state, self.error)
            finally:
                self.state = "new"
                await channel.close(None)
            self.reconnects += 1
            await asyncio.sleep(rng.uniform(delay / 2, delay))
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _channel(self) -> grpc.aio.Channel:
        """A channel with its own subchannel pool: its own TCP and TLS connection."""
        return grpc.aio.secure_channel(
            self.server, self._creds,
            options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)])

    def _bridge(self, channel: grpc.aio.Channel, loop: asyncio.AbstractEventLoop) -> None:
        """ServerConnection's calls (duck-typed stubs) onto `channel`."""
        conn = self.noop.conn
        conn.coordinator = SyncStub(cpb_grpc.CoordinatorStub(channel), loop)  # type: ignore[assignment]
        conn.aggregator = SyncStub(apb_grpc.AggregatorStub(channel), loop)  # type: ignore[assignment]

    async def _handle(self, task: cpb.Task, channel: grpc.aio.Channel,
                      loop: asyncio.AbstractEventLoop,
                      pool: concurrent.futures.ThreadPoolExecutor) -> None:
        """Answer a task on a worker; with `fresh_transfers` its transfers go over a
        connection of their own, closed after, so the task stream's connection never
        carries a model (gRPC keeps a connection's read buffers grown to the largest
        message it has received: bench.conn_memory --transfer)."""
        if not self.fresh_transfers:
            await loop.run_in_executor(pool, self.noop.handle, task)
            return
        apart = self._channel()
        try:
            self._bridge(apart, loop)
            await loop.run_in_executor(pool, self.noop.handle, task)
        finally:
            self._bridge(channel, loop)
            await apart.close(None)

    async def _join(self, channel: grpc.aio.Channel, loop: asyncio.AbstractEventLoop,
                    pool: concurrent.futures.ThreadPoolExecutor) -> tuple[tuple[str, str], ...]:
        conn = self.noop.conn
        self._bridge(channel, loop)
        conn.session = None
        # metadata() joins (a new session, its key agreement and token) on the worker
        return await loop.run_in_executor(pool, conn.metadata)

    async def _serve(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...],
                     loop: asyncio.AbstractEventLoop,
                     pool: concurrent.futures.ThreadPoolExecutor) -> None:
        session = self.noop.conn.session
        assert session is not None
        call = cpb_grpc.CoordinatorStub(channel).Tasks(
            cpb.TaskStreamRequest(session_id=session.session_id), metadata=metadata)
        self.state = "stream"
        try:
            async for task in call:
                if task.kind == cpb.HEARTBEAT:
                    self.heartbeats += 1
                elif task.kind == cpb.STOP:
                    if not self.keep_running:
                        self.finished = True
                        return
                else:
                    await self._handle(task, channel, loop, pool)
        finally:
            call.cancel()

    def stop(self) -> None:
        self.noop.stop_event.set()  # an upload in flight gives up


def _status(hospitals: list[LightHospital], lag_s: float, started: float) -> dict[str, Any]:
    states = Counter(h.state for h in hospitals)
    errors = Counter(h.error.split(":")[0] for h in hospitals if h.error)
    return {"pid": os.getpid(), "hospitals": len(hospitals), "states": dict(states),
            "reconnects": sum(h.reconnects for h in hospitals),
            "failures": sum(h.failures + h.noop.failures for h in hospitals),
            "errors": dict(errors), "heartbeats": sum(h.heartbeats for h in hospitals),
            "tasks": sum(len(h.noop.records) for h in hospitals),
            "finished": sum(h.finished for h in hospitals),
            "loop_lag_s": round(lag_s, 4), "threads": threading.active_count(),
            "uptime_s": round(time.monotonic() - started, 1)}


def _write(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        write_json(path, data)


async def run(server: str, work: Path, names: list[str], mode: str, rate: float,
              keep_running: bool, timeout_s: float, status_file: Path | None,
              fresh_transfers: bool = False) -> int:
    """Run the hospitals until SIGTERM/SIGINT, `timeout_s`, or every one is done."""
    from bench.common import client_tls

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    hospitals = [LightHospital(n, server, client_tls(work, n), seed=i, keep_running=keep_running,
                               fresh_transfers=fresh_transfers) for i, n in enumerate(names)]
    connecting = asyncio.Semaphore(CONNECTING)
    pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="light")
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []

    async def launch() -> None:
        for hospital in hospitals:
            if stopping.is_set():
                return
            tasks.append(loop.create_task(hospital.run(mode, connecting, pool)))
            await asyncio.sleep(1.0 / rate)

    launcher = loop.create_task(launch())
    deadline = started + timeout_s
    lag = 0.0
    try:
        while not stopping.is_set() and time.monotonic() < deadline:
            _write(status_file, _status(hospitals, lag, started))
            if launcher.done() and tasks and all(t.done() for t in tasks):
                break
            before = loop.time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
            lag = max(0.0, loop.time() - before - 1.0) if not stopping.is_set() else lag
    finally:
        launcher.cancel()
        for hospital in hospitals:
            hospital.stop()
        for task in tasks:
            task.cancel()
        await asyncio.wait([launcher, *tasks], timeout=20)
        pool.shutdown(wait=False, cancel_futures=True)
        _write(status_file, _status(hospitals, lag, started))
    return 0 if all(h.failures == 0 and h.noop.failures == 0 for h in hospitals) else 1


def main(argv: list[str] | None = None) -> int:
    p = client_parser("bench.light_clients", __doc__)
    p.add_argument("--mode", choices=MODES, default="stream")
    p.add_argument("--rate", type=float, default=25.0, help="new connections per second")
    p.add_argument("--fresh_transfers", action="store_true",
                   help="each task's transfers on a new connection, closed after")
    p.add_argument("--status_file", type=Path, help="counts, rewritten every second (JSON)")
    args, names = parse_client_args(p, argv)
    return asyncio.run(run(args.server, args.work, names, args.mode, max(args.rate, 0.1),
                           args.keep_running, args.timeout_s, args.status_file,
                           args.fresh_transfers))


if __name__ == "__main__":
    sys.exit(main())
