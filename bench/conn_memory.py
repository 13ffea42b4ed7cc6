"""What one idle mTLS connection costs a bare grpc.aio server, by channel option.

    python -m bench.conn_memory [--connections 1000] [--stream] \
        [--server_option name=value ...] [--client_option name=value ...]

Why: the real server's RSS per connected hospital (bench.load --breakdown) is mostly
below Python (TLS and HTTP/2 state in gRPC's C core, which tracemalloc does not see).
This starts a bare grpc.aio server in its own process with the real server's options
(fl_core.tls.SERVER_OPTIONS) and credentials (client certificates required), plus any
`--server_option`, opens N connections to it from this process (one grpc.aio channel
each, own subchannel pool), optionally each with one open server stream that never
sends (an idle task stream), and prints the server's RSS per connection. No project
service runs, so the difference to bench.load's figures is the project's own share.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.common import MB, Procs, client_tls, make_bench_pki, proc_status, workdir
from fl_core.tls import SERVER_OPTIONS, channel_credentials, channel_options, server_credentials

METHOD = "/bench.Idle/Hold"
CONNECT_AT_ONCE = 32


def _value(text: str) -> tuple[str, int | str]:
    name, _, value = text.partition("=")
    return name, int(value) if value.lstrip("-").isdigit() else value


async def _serve(keys: Path, options: list[tuple[str, Any]], ready: Path) -> None:
    async def hold(_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.send_initial_metadata(())  # the client knows the stream is open
        await asyncio.Event().wait()  # an idle stream: open, nothing to send
        yield b""

    async def down(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        yield bytes(int(request))  # a model of that many bytes, in one message

    async def up(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        async for _ in requests:
            pass
        return b""

    def trim(_request: bytes, context: grpc.ServicerContext) -> bytes:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of the RSS was free heap
        return b""

    handler = grpc.method_handlers_generic_handler("bench.Idle", {
        "Trim": grpc.unary_unary_rpc_method_handler(trim),
        "Hold": grpc.unary_stream_rpc_method_handler(hold),
        "Down": grpc.unary_stream_rpc_method_handler(down),
        "Up": grpc.stream_unary_rpc_method_handler(up)})
    server = grpc.aio.server(handlers=[handler], options=options,
                             maximum_concurrent_rpcs=100_000)
    creds = server_credentials((keys / "server.crt").read_bytes(),
                               (keys / "server.key").read_bytes(),
                               (keys / "ca.crt").read_bytes())
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    ready.write_text(json.dumps({"port": port}))
    await server.wait_for_termination()


async def _connect(target: str, tls: tuple[bytes, bytes, bytes], n: int, stream: bool,
                   options: list[tuple[str, Any]], transfer: int,
                   direction: str = "both") -> list[Any]:
    creds = channel_credentials(*tls)
    held: list[Any] = []
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one() -> None:
        async with gate:
            channel = grpc.aio.secure_channel(target, creds, options=[
                *channel_options(), ("grpc.use_local_subchannel_pool", 1), *options])
            await asyncio.wait_for(channel.channel_ready(), 120)
            held.append(channel)
            if transfer and direction in ("both", "down"):  # a round's download
                async for _ in channel.unary_stream("/bench.Idle/Down", None, None)(
                        str(transfer).encode()):
                    pass
            if transfer and direction in ("both", "up"):  # and its upload
                await channel.stream_unary("/bench.Idle/Up", None, None)(iter([bytes(transfer)]))
            if stream:
                call = channel.unary_stream(METHOD, None, None)(b"")
                held.append(call)
                await asyncio.wait_for(call.initial_metadata(), 120)

    await asyncio.gather(*(one() for _ in range(n)))
    return held


async def _measure(args: argparse.Namespace, work: Path, pid: int, port: int) -> dict[str, Any]:
    before = proc_status(pid)
    held = await _connect(f"127.0.0.1:{port}", client_tls(work, "hospital_1"), args.connections,
                          args.stream, [_value(o) for o in args.client_option], args.transfer,
                          args.direction)
    await asyncio.sleep(3.0)
    after = proc_status(pid)
    await held[0].unary_unary("/bench.Idle/Trim", None, None)(b"")
    trimmed = proc_status(pid)
    for item in held:
        if isinstance(item, grpc.aio.Channel):
            await item.close(None)
    n = args.connections
    return {"connections": n, "stream": args.stream, "transfer": args.transfer,
            "server_option": args.server_option, "client_option": args.client_option,
            "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
            "kb_per_conn": (after["VmRSS"] - before["VmRSS"]) / n / 1e3,
            "anon_kb_per_conn": (after.get("RssAnon", 0) - before.get("RssAnon", 0)) / n / 1e3,
            "trimmed_kb_per_conn": (trimmed["VmRSS"] - before["VmRSS"]) / n / 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.conn_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--stream", action="store_true", help="one idle server stream each")
    p.add_argument("--transfer", type=int, default=0,
                   help="bytes each connection downloads and uploads once before idling")
    p.add_argument("--direction", choices=("both", "down", "up"), default="both",
                   help="with --transfer: which way the bytes go")
    p.add_argument("--server_option", action="append", default=[], help="name=value")
    p.add_argument("--client_option", action="append", default=[], help="name=value")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    options = [*SERVER_OPTIONS, *(_value(o) for o in args.server_option)]
    if args.serve is not None:
        asyncio.run(_serve(args.work / "keys", options, args.serve))
        return 0
    with workdir("conn-memory") as work:
        make_bench_pki(work, ["hospital_1"])
        procs = Procs()
        try:
            ready = work / "server.ready"
            server = procs.start(["-m", "bench.conn_memory", "--serve", str(ready), "--work",
                                  str(work), *(f"--server_option={o}" for o in args.server_option)],
                                 work / "server.log")
            deadline = time.monotonic() + 60
            while not ready.exists():
                if time.monotonic() > deadline or not server.alive():
                    raise RuntimeError(f"server not ready:\n{server.tail()}")
                time.sleep(0.1)
            time.sleep(1.0)
            out = asyncio.run(_measure(args, work, server.pid,
                                       int(json.loads(ready.read_text())["port"])))
        finally:
            procs.stop_all()
    print(f"{out['connections']} connections{' + idle stream' if out['stream'] else ''}"
          f"{f' after {args.transfer} B {args.direction}' if args.transfer else ''}, "
          f"server options {out['server_option'] or 'default'}, client options "
          f"{out['client_option'] or 'default'}: server RSS {out['rss_before'] / MB:.0f} -> "
          f"{out['rss_after'] / MB:.0f} MB, {out['kb_per_conn']:.1f} KB per connection "
          f"({out['anon_kb_per_conn']:.1f} KB anon); after malloc_trim(0) "
          f"{out['trimmed_kb_per_conn']:.1f} KB per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
