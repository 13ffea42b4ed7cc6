"""Server CPU per call: grpc.server, grpc.aio with native handlers, and our bridge.

    python -m bench.serving [--calls 2000] [--runs 3]

Why: the small model's round costs the server a few milliseconds per hospital
(issue 16 item 2) and most of it is per-call machinery, not the services' work. This
separates the floor each gRPC server kind sets from what `fl_server.serving`'s bridge
(synchronous handlers on worker threads over grpc.aio) adds on top.

A server process per kind on 127.0.0.1 (insecure port: TLS costs the same for every
kind and is left out), the same three methods in each, bytes in and out, no work:

  unary   one request, one response                       (Status, Join, Report)
  stream  one request, 2 responses                        (FetchModel: header + chunk)
  upload  3 requests, one response                        (SubmitUpdate: header, chunk, end)

The client (this process, a synchronous channel) makes `--calls` calls of each method,
10 at a time from 10 threads as ten hospitals would. Reported: the server process's
CPU microseconds per call (utime + stime over the run / calls), median of `--runs`,
runs interleaved across kinds.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.common import Procs, cpu_seconds, median, print_header, table, workdir

KINDS = ("sync", "aio", "bridge")
METHODS = ("unary", "stream", "upload")
SERVICE = "bench.Serving"
PAYLOAD = b"x" * 4096
THREADS = 10


def _unary(request: bytes, context: Any) -> bytes:
    return request


def _stream(request: bytes, context: Any) -> Iterator[bytes]:
    yield request
    yield request


def _upload(requests: Iterator[bytes], context: Any) -> bytes:
    size = 0
    for r in requests:
        size += len(r)
    return size.to_bytes(8, "little")


async def _aio_unary(request: bytes, context: Any) -> bytes:
    return request


async def _aio_stream(request: bytes, context: Any) -> Any:
    yield request
    yield request


async def _aio_upload(requests: Any, context: Any) -> bytes:
    size = 0
    async for r in requests:
        size += len(r)
    return size.to_bytes(8, "little")


def _handlers(aio: bool) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    unary, stream, upload = (_aio_unary, _aio_stream, _aio_upload) if aio else (
        _unary, _stream, _upload)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "unary": grpc.unary_unary_rpc_method_handler(unary),
        "stream": grpc.unary_stream_rpc_method_handler(stream),
        "upload": grpc.stream_unary_rpc_method_handler(upload),
    })


def serve(kind: str, port_file: Path) -> None:
    """Run one server kind until killed; writes its port to `port_file`."""
    if kind == "aio":
        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([_handlers(True)])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            port_file.write_text(str(port))
            await server.wait_for_termination()

        asyncio.run(main())
        return
    if kind == "sync":
        server: Any = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32))
    else:
        from fl_server.serving import AioServer

        server = AioServer(32)
    server.add_generic_rpc_handlers([_handlers(False)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()


def _same(b: bytes) -> bytes:
    return b


def _drive(channel: grpc.Channel, method: str, calls: int) -> None:
    path = f"/{SERVICE}/{method}"
    kw: dict[str, Any] = {"request_serializer": _same, "response_deserializer": _same}
    if method == "unary":
        fn: Any = channel.unary_unary(path, **kw)
        for _ in range(calls):
            fn(PAYLOAD, timeout=30)
    elif method == "stream":
        fn = channel.unary_stream(path, **kw)
        for _ in range(calls):
            for _r in fn(PAYLOAD, timeout=30):
                pass
    else:
        fn = channel.stream_unary(path, **kw)
        for _ in range(calls):
            fn(iter((PAYLOAD, PAYLOAD, PAYLOAD)), timeout=30)


def measure(target: str, pid: int, method: str, calls: int) -> float:
    """Server CPU microseconds per call of `method`, `calls` calls from THREADS threads."""
    channels = [grpc.insecure_channel(target) for _ in range(THREADS)]
    try:
        for ch in channels:
            _drive(ch, method, 5)  # connect and warm up
        per = calls // THREADS
        before = cpu_seconds(pid)
        threads = [threading.Thread(target=_drive, args=(ch, method, per)) for ch in channels]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (cpu_seconds(pid) - before) / (per * THREADS) * 1e6
    finally:
        for ch in channels:
            ch.close()


def run(calls: int, runs: int) -> dict[str, dict[str, float]]:
    procs = Procs()
    results: dict[str, dict[str, list[float]]] = {k: {m: [] for m in METHODS} for k in KINDS}
    try:
        with workdir("bench-serving") as work:
            servers = {}
            for kind in KINDS:
                port_file = work / f"{kind}.port"
                proc = procs.start(["-m", "bench.serving", "--serve", kind,
                                    "--port_file", str(port_file)],
                                   work / f"{kind}.log", cwd=work)
                deadline = time.monotonic() + 60
                while not port_file.exists() or not port_file.read_text():
                    if time.monotonic() > deadline or not proc.alive():
                        raise RuntimeError(f"{kind} server did not start:\n{proc.tail()}")
                    time.sleep(0.05)
                servers[kind] = (f"127.0.0.1:{port_file.read_text()}", proc.pid)
            for _ in range(runs):
                for method in METHODS:
                    for kind in KINDS:
                        target, pid = servers[kind]
                        results[kind][method].append(measure(target, pid, method, calls))
    finally:
        procs.stop_all()
    return {k: {m: median(v) for m, v in ms.items()} for k, ms in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per method per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--port_file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port_file)
        return 0
    print_header("Server CPU per call: grpc.server, grpc.aio, the bridge")
    res = run(args.calls, args.runs)
    rows = [[m, *(res[k][m] for k in KINDS), res["bridge"][m] / res["aio"][m]]
            for m in METHODS]
    print(table(["method", *(f"{k} us/call" for k in KINDS), "bridge / aio"], rows))
    print(f"\n- load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
