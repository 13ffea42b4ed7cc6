"""The grpc.aio serving bridge (fl_server/serving.py) on a real loopback server.

What the server's services rely on: an idle response stream gives its worker thread
back, abort ends the call with the code, message and rich status the client reads,
a handler blocked reading a client stream is released when the call is ended from
another thread, and a cancelled call runs its callbacks and its generator's
`finally`. The full services over mTLS are covered by the integration, hostile and
fault suites, which now all run on this bridge.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from fl_core.errors import abort, refusal_of
from fl_server import serving
from fl_server.grpc_types import Handler, WrappingInterceptor, rewrap
from fl_server.idle import Idle
from fl_server.serving import READ_AHEAD, WRITE_AHEAD, AioServer

SERVICE = "test.Bridge"
TIMEOUT = 20.0


def _ident(b: bytes) -> bytes:
    return b


class Payload:
    """A response a test can watch being freed (bytes take no weak reference)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class Feed:
    """Handlers of a toy service, with what the tests need to see from inside."""

    def __init__(self) -> None:
        self.idle: list[Idle] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.callback_ran = threading.Event()
        self.reader_released = threading.Event()
        self.reading = threading.Event()
        self.contexts: list[Any] = []
        self.step_threads: list[str] = []
        self.sent: list[weakref.ref[Payload]] = []
        self.unwound = threading.Event()
        self.where: list[tuple[str, bool]] = []  # (thread, context.on_loop) per Short call

    def wait(self, request: bytes, context: Any) -> Iterator[bytes | Idle]:
        """Idle until woken, then one message."""
        context.add_callback(self.callback_ran.set)
        try:
            idle = Idle(60.0)
            with self.lock:
                self.idle.append(idle)
            while not idle.woken:
                yield idle
            yield b"woken:" + request
        finally:
            self.closed.set()

    def steps(self, request: bytes, context: Any) -> Iterator[bytes | Idle]:
        """Records the thread of each step: before the first Idle, after it."""
        self.step_threads.append(threading.current_thread().name)
        idle = Idle(60.0)
        with self.lock:
            self.idle.append(idle)
        while not idle.woken:
            yield idle
        self.step_threads.append(threading.current_thread().name)
        yield b"one"
        self.step_threads.append(threading.current_thread().name)
        if request == b"raise":
            raise ValueError("broken after an idle")
        yield b"two"

    def refuse(self, request: bytes, context: Any) -> bytes:
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, "not now: " + request.decode(),
              "NOT_NOW", "request")

    def refuse_slowly(self, request: bytes, context: Any) -> bytes:
        """Refuses, then unwinds slowly (an upload's lock, a spool file, the audit)."""
        self.unwound.clear()
        try:
            if request == b"swallow":  # a handler that catches its own abort
                try:
                    abort(context, grpc.StatusCode.FAILED_PRECONDITION, "swallowed")
                except Exception:  # noqa: BLE001 - the test's point
                    return b"answered anyway"
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "refused slowly")
        finally:
            time.sleep(0.3)
            self.unwound.set()

    def refuse_streaming(self, request: bytes, context: Any) -> Iterator[bytes]:
        self.unwound.clear()
        try:
            yield b"first"
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "refused mid-stream")
        finally:
            time.sleep(0.3)
            self.unwound.set()

    def total(self, requests: Iterator[bytes], context: Any) -> bytes:
        return str(sum(len(r) for r in requests)).encode()

    def stall(self, requests: Iterator[bytes], context: Any) -> bytes:
        self.contexts.append(context)
        try:
            for _ in requests:
                self.reading.set()
        except BaseException:
            self.reader_released.set()
            raise
        return b"never"

    def many(self, request: bytes, context: Any) -> Iterator[bytes]:
        """More messages than the write-ahead holds, all before any Idle: the worker
        blocks while the outbox is full and is woken as the client takes them."""
        for i in range(int(request)):
            yield str(i).encode()

    def slow_total(self, requests: Iterator[bytes], context: Any) -> bytes:
        """Starts reading late (the loop's read-ahead fills and waits), then reads
        faster than the client sends (the worker waits on an empty inbox)."""
        time.sleep(0.3)
        return b",".join(requests)

    def short(self, requests: Iterator[bytes], context: Any) -> bytes:
        """Registered to run on the loop when read whole (`short_predicate`)."""
        self.where.append((threading.current_thread().name, context.on_loop))
        got = list(requests)
        if got and got[0] == b"refuse":
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "refused on the loop",
                  "ON_LOOP")
        return b",".join(got)

    @staticmethod
    def short_predicate(messages: Any) -> bool:
        """Up to two messages run on the loop; a first message "boom" breaks the
        predicate itself."""
        if messages and messages[0] == b"boom":
            raise RuntimeError("a broken predicate")
        return len(messages) <= 2

    def carry(self, request: bytes, context: Any) -> Iterator[Payload | Idle]:
        """One message (a task carrying its model), then idle until woken."""
        payload = Payload(request)
        self.sent.append(weakref.ref(payload))
        yield payload
        del payload
        idle = Idle(60.0)
        with self.lock:
            self.idle.append(idle)
        while not idle.woken:
            yield idle

    def handlers(self) -> dict[str, Handler]:
        kw: dict[str, Any] = {"request_deserializer": _ident, "response_serializer": _ident}
        return {
            "Wait": grpc.unary_stream_rpc_method_handler(self.wait, **kw),
            "Steps": grpc.unary_stream_rpc_method_handler(self.steps, **kw),
            "Refuse": grpc.unary_unary_rpc_method_handler(self.refuse, **kw),
            "RefuseSlowly": grpc.unary_unary_rpc_method_handler(self.refuse_slowly, **kw),
            "RefuseStreaming": grpc.unary_stream_rpc_method_handler(self.refuse_streaming,
                                                                    **kw),
            "Total": grpc.stream_unary_rpc_method_handler(self.total, **kw),
            "Stall": grpc.stream_unary_rpc_method_handler(self.stall, **kw),
            "Many": grpc.unary_stream_rpc_method_handler(self.many, **kw),
            "SlowTotal": grpc.stream_unary_rpc_method_handler(self.slow_total, **kw),
            "Short": grpc.stream_unary_rpc_method_handler(self.short, **kw),
            "Carry": grpc.unary_stream_rpc_method_handler(
                self.carry, request_deserializer=_ident,
                response_serializer=lambda p: p.data),
        }


class CodeRecorder(WrappingInterceptor):
    """Reads the call's code after the handler, as the refusal audit does."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, Any, Any]] = []

    def _wrap(self, handler: Handler, method: str) -> Handler:
        def wrap(behavior: Callable[[Any, Any], Any], _in: bool, out: bool) -> Any:
            if out:
                return behavior

            def recorded(request: Any, context: Any) -> Any:
                try:
                    return behavior(request, context)
                finally:
                    self.seen.append((method, context.code(), context.details()))

            return recorded

        return rewrap(handler, wrap)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Feed, CodeRecorder, grpc.Channel, AioServer]]:
    feed, recorder = Feed(), CodeRecorder()
    server = AioServer(max_workers=2, interceptors=[recorder])
    server.add_registered_method_handlers(SERVICE, feed.handlers())
    server.run_on_loop_when_read(f"/{SERVICE}/Short", feed.short_predicate)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield feed, recorder, channel, server
    finally:
        channel.close()
        assert server.stop(1.0).wait(10)


def _call(channel: grpc.Channel, kind: str, name: str) -> Any:
    make = {"us": channel.unary_stream, "uu": channel.unary_unary,
            "su": channel.stream_unary}[kind]
    return make(f"/{SERVICE}/{name}", request_serializer=_ident,
                response_deserializer=_ident, _registered_method=True)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_idle_streams_give_their_thread_back(served: Any) -> None:
    """30 open streams on 2 worker threads: every handler reaches its wait (so none
    holds a thread while idle), and each is served when woken."""
    feed, _, channel, _server = served
    feed.idle.clear()
    streams = [_call(channel, "us", "Wait")(str(i).encode(), timeout=TIMEOUT)
               for i in range(30)]
    _until(lambda: len(feed.idle) == 30, "all 30 handlers to be waiting")
    for idle in list(feed.idle):
        idle.wake()
    got = sorted(next(stream) for stream in streams)
    assert got == sorted(b"woken:" + str(i).encode() for i in range(30))
    for stream in streams:
        assert list(stream) == []


def test_steps_after_an_idle_run_on_the_loop(served: Any) -> None:
    """The start runs on a worker; once the generator has yielded an Idle, its steps
    are taken on the event loop (no thread hand-off per message), and an error
    raised there still ends the call with a status."""
    feed, _, channel, _server = served
    for request, expect in ((b"ok", [b"one", b"two"]), (b"raise", [b"one"])):
        feed.idle.clear()
        feed.step_threads.clear()
        stream = _call(channel, "us", "Steps")(request, timeout=TIMEOUT)
        _until(lambda: len(feed.idle) == 1, "the handler to wait")
        feed.idle[0].wake()
        got: list[bytes] = []
        if request == b"raise":
            with pytest.raises(grpc.RpcError) as info:
                for message in stream:
                    got.append(message)
            assert info.value.code() == grpc.StatusCode.UNKNOWN
        else:
            got = list(stream)
        assert got == expect
        assert feed.step_threads[0].startswith("grpc_"), feed.step_threads
        assert feed.step_threads[1:] == ["grpc-aio", "grpc-aio"], feed.step_threads


def test_abort_sends_code_message_and_rich_status(served: Any) -> None:
    feed, recorder, channel, _server = served
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, "uu", "Refuse")(b"x", timeout=TIMEOUT)
    refusal = refusal_of(info.value)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "not now: x"
    assert (refusal.reason, refusal.field) == ("NOT_NOW", "request")
    _until(lambda: any(m.endswith("/Refuse") for m, _, _ in recorder.seen), "the record")
    method, code, details = [r for r in recorder.seen if r[0].endswith("/Refuse")][-1]
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details == "not now: x"


@pytest.mark.parametrize(("kind", "name", "request_", "details"), [
    ("uu", "RefuseSlowly", b"x", "refused slowly"),
    ("uu", "RefuseSlowly", b"swallow", "swallowed"),
    ("us", "RefuseStreaming", b"x", "refused mid-stream"),
])
def test_a_refusal_reaches_the_client_after_the_handler_has_unwound(
        served: Any, kind: str, name: str, request_: bytes, details: str) -> None:
    """As under gRPC's synchronous server: a client that calls again the moment it is
    refused must find the refused call's `finally` done (CI saw an upload still held),
    and a handler that catches its own abort still ends the call refused."""
    feed, _, channel, _ = served
    call = _call(channel, kind, name)
    with pytest.raises(grpc.RpcError) as info:
        out = call(request_, timeout=TIMEOUT)
        if kind == "us":
            assert next(out) == b"first"
            next(out)
    assert feed.unwound.is_set(), "the refusal arrived before the handler had unwound"
    assert (info.value.code(), info.value.details()) == (  # type: ignore[attr-defined]
        grpc.StatusCode.FAILED_PRECONDITION, details)


def test_client_stream_is_read_in_order(served: Any) -> None:
    _feed, _, channel, _server = served
    chunks = [b"a" * n for n in (1, 10, 100, 1000, 100_000)]
    assert _call(channel, "su", "Total")(iter(chunks), timeout=TIMEOUT) == b"101111"


def test_hand_offs_wait_while_full_or_empty_and_keep_order(served: Any) -> None:
    """Both directions through the bounded hand-offs with each side waiting on the
    other: a response stream 16x the write-ahead, read slowly at first; a client
    stream 16x the read-ahead, read late, then sent slowly at the end."""
    _feed, _, channel, _server = served
    count = 16 * WRITE_AHEAD
    stream = _call(channel, "us", "Many")(str(count).encode(), timeout=TIMEOUT)
    got = [next(stream)]
    time.sleep(0.3)  # the worker fills the outbox and waits for room
    got.extend(stream)
    assert got == [str(i).encode() for i in range(count)]

    def requests() -> Iterator[bytes]:
        for i in range(16 * READ_AHEAD):
            if i >= 15 * READ_AHEAD:
                time.sleep(0.02)  # the worker drains the inbox and waits for more
            yield str(i).encode()

    total = _call(channel, "su", "SlowTotal")(requests(), timeout=TIMEOUT)
    assert total == b",".join(str(i).encode() for i in range(16 * READ_AHEAD))


def test_a_short_stream_read_whole_runs_on_the_loop(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered client stream runs on the loop's thread when it has all arrived
    and its predicate accepts it; otherwise on a worker, with the same result: more
    messages than the predicate takes, more than the read-ahead holds, a stream whose
    end comes after LOOP_READ_WAIT_S, a predicate that raises. An abort on the loop
    reaches the client with its code and reason."""
    feed, recorder, channel, _server = served
    short = _call(channel, "su", "Short")
    # a wait no busy test machine outlasts, but for the late stream's case below
    monkeypatch.setattr(serving, "LOOP_READ_WAIT_S", 10.0)

    def where(requests: Iterator[bytes], expected: bytes) -> tuple[str, bool]:
        feed.where.clear()
        assert short(requests, timeout=TIMEOUT) == expected
        assert len(feed.where) == 1
        return feed.where[0]

    thread, on_loop = where(iter([b"a", b"b"]), b"a,b")
    assert (thread, on_loop) == ("grpc-aio", True)
    for many in (3, 4 * READ_AHEAD):
        messages = [str(i).encode() for i in range(many)]
        thread, on_loop = where(iter(messages), b",".join(messages))
        assert thread.startswith("grpc_") and not on_loop

    def late() -> Iterator[bytes]:
        yield b"a"
        time.sleep(1.0)
        yield b"b"

    monkeypatch.setattr(serving, "LOOP_READ_WAIT_S", 0.2)
    thread, on_loop = where(late(), b"a,b")
    assert thread.startswith("grpc_") and not on_loop
    monkeypatch.setattr(serving, "LOOP_READ_WAIT_S", 10.0)
    thread, on_loop = where(iter([b"boom"]), b"boom")
    assert thread.startswith("grpc_") and not on_loop

    feed.where.clear()
    recorder.seen.clear()
    with pytest.raises(grpc.RpcError) as info:
        short(iter([b"refuse"]), timeout=TIMEOUT)
    assert feed.where == [("grpc-aio", True)]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert refusal_of(info.value).reason == "ON_LOOP"
    assert recorder.seen == [(f"/{SERVICE}/Short", grpc.StatusCode.FAILED_PRECONDITION,
                              "refused on the loop")]


def test_a_written_message_is_not_kept_while_the_stream_idles(served: Any) -> None:
    """An idle task stream's next message is 30 s away: the one it wrote last (a
    task with its model sealed in) must be freed once written, not held until then."""
    feed, _, channel, _server = served
    feed.idle.clear()
    feed.sent.clear()
    stream = _call(channel, "us", "Carry")(b"model" * 1000, timeout=TIMEOUT)
    assert next(stream) == b"model" * 1000
    _until(lambda: len(feed.idle) == 1, "the handler to wait")

    def freed() -> bool:
        gc.collect()
        return feed.sent[0]() is None

    _until(freed, "the written message to be freed while the stream idles")
    feed.idle[0].wake()
    assert list(stream) == []


def test_ending_a_call_releases_a_blocked_reader(served: Any) -> None:
    """The stream watchdog's way: `end` from another thread; the client reads the
    code and message, and the handler's blocked read raises at once."""
    feed, _, channel, _server = served
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"first"
        release.wait(TIMEOUT)  # then silence

    future = _call(channel, "su", "Stall").future(requests(), timeout=TIMEOUT)
    try:
        _until(feed.reading.is_set, "the handler to read the first message")
        feed.contexts[-1].end(grpc.StatusCode.DEADLINE_EXCEEDED, "silent for too long")
        assert feed.reader_released.wait(5), "the blocked read was not released"
        error = future.exception(timeout=TIMEOUT)
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details() == "silent for too long"
    finally:
        release.set()


def test_cancelled_stream_runs_callbacks_and_closes_its_generator(served: Any) -> None:
    feed, _, channel, _server = served
    feed.idle.clear()
    feed.closed.clear()
    feed.callback_ran.clear()
    stream = _call(channel, "us", "Wait")(b"gone", timeout=TIMEOUT)
    _until(lambda: len(feed.idle) == 1, "the handler to wait")
    stream.cancel()
    assert feed.callback_ran.wait(5), "the call's callback did not run"
    assert feed.closed.wait(5), "the generator's finally did not run"


def test_hospitals_beyond_the_worker_threads_stay_connected(tmp_path: Any) -> None:
    """The real server daemon with --max_workers 8 (a stream budget of 6 threads under
    the synchronous server): 40 hospitals join over mTLS and hold their task streams
    at once, all are connected, the operator's Status still answers at once, and
    when they leave none is counted as connected."""
    from fl_demo.launcher import Federation, make_pki
    from tests.hostile.kit import HostileClient, site_identity, wait_for

    names = [f"hospital_{i}" for i in range(1, 41)]
    make_pki(tmp_path, names)
    fed = Federation(tmp_path, [], "breast_cancer")
    clients: list[HostileClient] = []
    try:
        port = fed.start_server(["--rounds", "1", "--min_clients", "1000",
                                 "--wait_for_clients_s", "600", "--max_workers", "8"])
        for name in names:
            client = HostileClient(port, site_identity(tmp_path, name), name)
            client.open_tasks()
            clients.append(client)

        def connected() -> set[str]:
            return {c.client_id for c in fed.status().clients if c.connected}

        wait_for(lambda: connected() == set(names), 60, "all 40 hospitals connected")
        started = time.monotonic()
        assert fed.status(timeout_s=5.0).job_state == "running"
        assert time.monotonic() - started < 5.0
        assert all(c._thread is not None and c._thread.is_alive() for c in clients), \
            "a task stream was refused or ended"
        for client in clients:
            client.close_tasks()
        wait_for(lambda: not connected(), 30, "no hospital connected after they left")
        assert fed.server is not None and fed.server.poll() is None
    finally:
        for client in clients:
            client.close()
        fed.stop_all()


def test_idle_blocks_a_plain_thread_until_woken_or_timed_out() -> None:
    """Outside the server a generator's Idle is waited on by the thread itself."""
    started = time.monotonic()
    Idle(0.05).block()
    assert 0.04 <= time.monotonic() - started < TIMEOUT
    idle = Idle(TIMEOUT)
    threading.Timer(0.1, idle.wake).start()
    started = time.monotonic()
    idle.block()
    assert idle.woken and time.monotonic() - started < TIMEOUT / 2
    started = time.monotonic()
    idle.block()  # already woken: at once
    assert time.monotonic() - started < 0.05
