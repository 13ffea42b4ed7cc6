"""A round's transport floor: what gRPC itself costs the server per hospital.

    python -m bench.round_floor [--hospitals 10] [--payload 400000] [--rounds 200] [--runs 3]
    python -m bench.round_floor --hospitals 4 --payload 100000000 --chunk 1048576 \
        --rounds 6 --server_rounds 10       # item 3's round: 100 MB in 1 MiB chunks

Issue 16 item 2 asks for at most 3 ms of server CPU per hospital and round on the
100k-parameter model with 10 hospitals. Such a round moves, per hospital, one pushed
task that carries the model (~400 KB) and one uploaded update answered by a receipt:
a header and ~400 KB in one unary call (SubmitSmallUpdate), or, with `--chunk`, a
header message and then the chunks on a client stream (SubmitUpdate). This benchmark
moves exactly those messages, of those sizes, over mutual TLS with the server's own
gRPC options and credentials, and does nothing else with them: no protobuf, no
sealing, no hashing, no aggregation, no store. It gives the server's CPU per hospital
and round two ways, alternating in every run so drift hits both alike:

  aio     the handlers as grpc.aio coroutines on the event loop: gRPC's own cost
  bridge  the same handlers as synchronous code behind fl_server.serving.AioServer,
          the server's real front: the task pushed from a generator woken out of an
          Idle, a one-call upload handled on the loop (as the server's small uploads),
          a streamed one on a worker thread

  server  the real server with no-op hospitals on the same traffic (bench.rounds'
          "100k x10" scenario: the whole round, sealed, hashed, aggregated, stored)

With `--chunk` the payload moves as messages of that size each way (as a large model's
download and upload do; the floor pushes the download on the task stream). What
`server` spends above `bridge` is the project's own work per hospital; what
`bridge` spends above `aio` is the bridge's. Two processes on 127.0.0.1: the server,
and one client process with a thread and a channel per hospital (as
bench.noop_client's hospitals, which are the clients of `server`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    Procs,
    add_child_flags,
    client_names,
    client_tls,
    make_bench_pki,
    median,
    print_header,
    table,
    wait_ready,
    workdir,
    write_ready,
)
from bench.rounds import Scenario, run_scenario, scenarios

SERVICE = "bench.Floor"
MODES = ("aio", "bridge")
FRONTS = (*MODES, "server")
HEADER_BYTES = 200  # about an update header's size (ids, manifest, metrics)
# issue 16's server CPU per hospital and round: item 2 (100k parameters), item 3 (100 MB)
ITEM_2_TARGET_MS = 3.0
ITEM_3_TARGET_MS = 350.0


# =========================================================================== server


def _warmup(rounds: int) -> int:
    """Untimed rounds first: connections, allocator and caches settle."""
    return max(1, min(20, rounds // 2))


def _parts(args: argparse.Namespace) -> list[bytes]:
    """The payload as the messages that carry it (one, or `--chunk` bytes each)."""
    payload = os.urandom(args.payload)
    size = args.chunk or args.payload
    return [payload[i:i + size] for i in range(0, args.payload, size)]


class _Measure:
    """Times the rounds after the warm-up ones, in the serving process."""

    def __init__(self, rounds: int, hospitals: int) -> None:
        self.rounds = rounds
        self.warmup = _warmup(rounds)
        self.hospitals = hospitals
        self.done = 0
        self._start = (0.0, 0.0)
        self.result: dict[str, float] = {}

    def round_done(self) -> bool:
        """Count a finished round; True once the measured rounds are all done."""
        self.done += 1
        if self.done == self.warmup:
            self._start = (time.perf_counter(), time.process_time())
        if self.done < self.warmup + self.rounds:
            return False
        wall = time.perf_counter() - self._start[0]
        cpu = time.process_time() - self._start[1]
        self.result = {"round_ms": wall / self.rounds * 1e3,
                       "cpu_ms_per_hospital": cpu / self.rounds / self.hospitals * 1e3}
        return True


def _credentials(work: Path) -> Any:
    from fl_core.tls import server_credentials
    from fl_server.keyfiles import load_server_tls

    return server_credentials(*load_server_tls(work / "keys"))


def _ready(path: Path, port: int) -> None:
    write_ready(path, {"port": port, "pid": os.getpid()})


def serve_aio(args: argparse.Namespace) -> dict[str, float]:
    import grpc
    import grpc.aio

    from fl_core.tls import SERVER_OPTIONS

    parts = _parts(args)
    measure = _Measure(args.rounds, args.hospitals)

    async def main() -> None:
        outboxes: list[asyncio.Queue[bytes]] = []
        uploads = 0
        round_over = asyncio.Event()

        async def tasks(request: bytes, context: Any) -> None:
            outbox: asyncio.Queue[bytes] = asyncio.Queue()
            outboxes.append(outbox)
            while True:
                message = await outbox.get()
                await context.write(message)
                if not message:
                    return

        def uploaded() -> bytes:
            nonlocal uploads
            uploads += 1
            if uploads == args.hospitals:
                round_over.set()
            return b"ok"

        async def upload(requests: Any, context: Any) -> bytes:
            async for _ in requests:
                pass
            return uploaded()

        async def upload_small(request: bytes, context: Any) -> bytes:
            return uploaded()

        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Tasks": grpc.unary_stream_rpc_method_handler(tasks),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "UploadSmall": grpc.unary_unary_rpc_method_handler(upload_small)})
        server = grpc.aio.server(handlers=[handler], options=SERVER_OPTIONS)
        port = server.add_secure_port("127.0.0.1:0", _credentials(args.work))
        await server.start()
        _ready(args.ready, port)
        deadline = time.monotonic() + 60
        while len(outboxes) < args.hospitals:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(outboxes)} of {args.hospitals} hospitals"
                                   " connected in 60 s")
            await asyncio.sleep(0.02)
        while True:
            round_over.clear()
            uploads = 0
            for outbox in outboxes:
                for part in parts:
                    outbox.put_nowait(part)
            await round_over.wait()
            if measure.round_done():
                break
        for outbox in outboxes:
            outbox.put_nowait(b"")
        await server.stop(2.0)

    asyncio.run(main())
    return measure.result


def serve_bridge(args: argparse.Namespace) -> dict[str, float]:
    import grpc

    from fl_core.tls import SERVER_OPTIONS
    from fl_server.idle import Idle
    from fl_server.serving import AioServer

    parts = _parts(args)
    measure = _Measure(args.rounds, args.hospitals)
    lock = threading.Lock()
    pending: list[list[bytes]] = []
    waiting: list[Idle] = []
    uploads = 0
    round_over = threading.Event()

    def tasks(request: bytes, context: Any) -> Iterator[bytes | Idle]:
        mine: list[bytes] = []
        with lock:
            pending.append(mine)
        while True:
            with lock:
                message = mine.pop(0) if mine else None
                if message is None:
                    idle = Idle(60.0)
                    waiting.append(idle)
            if message is None:
                yield idle
                continue
            yield message
            if not message:
                return

    def uploaded() -> bytes:
        nonlocal uploads
        with lock:
            uploads += 1
            if uploads == args.hospitals:
                round_over.set()
        return b"ok"

    def upload(requests: Iterator[bytes], context: Any) -> bytes:
        for _ in requests:
            pass
        return uploaded()

    def upload_small(request: bytes, context: Any) -> bytes:
        return uploaded()

    def push(messages: list[bytes]) -> None:
        with lock:
            for box in pending:
                box.extend(messages)
            woken = list(waiting)
            waiting.clear()
        for idle in woken:
            idle.wake()

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Tasks": grpc.unary_stream_rpc_method_handler(tasks),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "UploadSmall": grpc.unary_unary_rpc_method_handler(upload_small)})
    # as many workers as the real server starts for this load (they are made on demand)
    server = AioServer(max_workers=args.hospitals + 1, options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.run_on_loop_when_read(f"/{SERVICE}/UploadSmall", lambda messages: True)
    port = server.add_secure_port("127.0.0.1:0", _credentials(args.work))
    server.start()
    _ready(args.ready, port)
    try:
        deadline = time.monotonic() + 60
        while len(pending) < args.hospitals:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} of {args.hospitals} hospitals connected"
                                   " in 60 s")
            time.sleep(0.02)
        while True:
            round_over.clear()
            with lock:
                uploads = 0
            push(parts)
            if not round_over.wait(600):
                raise RuntimeError("a round did not finish in 600 s")
            if measure.round_done():
                break
        push([b""])
    finally:
        server.stop(2.0).wait(5)
    return measure.result


def serve(args: argparse.Namespace) -> int:
    result = (serve_aio if args.mode == "aio" else serve_bridge)(args)
    args.out.write_text(json.dumps(result))
    return 0


# =========================================================================== client


def client(args: argparse.Namespace) -> int:
    """One thread and channel per hospital: take each round's pushed messages, send them
    back behind a header: in one call when they are one message, as the hospitals'
    small updates go, else on a stream."""
    import grpc

    from fl_core.tls import channel_credentials, channel_options

    credentials = channel_credentials(*client_tls(args.work, "hospital_1"))
    header = b"h" * HEADER_BYTES
    failures: list[str] = []

    def hospital() -> None:
        # a channel of its own, as a hospital's daemon has (not one shared subchannel)
        options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(f"127.0.0.1:{args.port}", credentials,
                                 options=options) as channel:
            tasks = channel.unary_stream(f"/{SERVICE}/Tasks", None, None)
            upload = channel.stream_unary(f"/{SERVICE}/Upload", None, None)
            upload_small = channel.unary_unary(f"/{SERVICE}/UploadSmall", None, None)
            got: list[bytes] = []
            try:
                for message in tasks(b"", timeout=3600):
                    if not message:
                        return
                    got.append(message)
                    if len(got) < args.parts:
                        continue
                    if args.parts == 1:
                        upload_small(header + got[0], timeout=600)
                    else:
                        upload(iter((header, *got)), timeout=600)
                    got = []
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=hospital) for _ in range(args.hospitals)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for failure in failures:
        print(f"hospital failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


# =========================================================================== driver


def run(hospitals: int, payload: int, rounds: int, runs: int, chunk: int = 0,
        server_rounds: int = 61, target_ms: float = ITEM_2_TARGET_MS,
        keep: bool = False) -> dict[str, Any]:
    print_header("Transport floor of a round (issue 16 items 2 and 3)")
    # the real server's hospitals spread over processes as bench.rounds spreads them
    per_proc = next((sc.per_proc for sc in scenarios(False)
                     if sc.params == payload // 4 and sc.clients == hospitals),
                    min(5, hospitals))

    results: dict[str, list[dict[str, float]]] = {front: [] for front in FRONTS}
    with workdir("round-floor", keep) as work:
        make_bench_pki(work, client_names(hospitals))
        for run_no in range(runs):
            real = run_scenario(work, Scenario("floor reference", payload // 4, hospitals,
                                               server_rounds, per_proc))
            results["server"].append({"round_ms": real["round_wall_s"] * 1e3,
                                      "cpu_ms_per_hospital":
                                          real["server_cpu_per_hospital"] * 1e3})
            for mode in MODES:
                procs = Procs()
                try:
                    tag = f"{mode}-{run_no}"
                    ready, out = work / f"{tag}.ready", work / f"{tag}.json"
                    server = procs.start(
                        ["-m", "bench.round_floor", "--serve", "--mode", mode,
                         "--work", str(work), "--ready", str(ready), "--out", str(out),
                         "--hospitals", str(hospitals), "--payload", str(payload),
                         "--chunk", str(chunk), "--rounds", str(rounds)],
                        work / f"{tag}-server.log")
                    port = wait_ready(server, ready)["port"]
                    clients = procs.start(
                        ["-m", "bench.round_floor", "--client", "--work", str(work),
                         "--port", str(port), "--hospitals", str(hospitals),
                         "--parts", str(-(-payload // (chunk or payload)))],
                        work / f"{tag}-clients.log")
                    if server.wait(3600) != 0 or not out.exists():
                        raise RuntimeError(f"{mode} server failed:\n{server.tail()}")
                    if clients.wait(60) != 0:
                        raise RuntimeError(f"{mode} clients failed:\n{clients.tail()}")
                    results[mode].append(json.loads(out.read_text()))
                finally:
                    procs.stop_all()
            for front in FRONTS:
                last = results[front][-1]
                print(f"run {run_no + 1} {front:6s}: round {last['round_ms']:.1f} ms, server"
                      f" CPU {last['cpu_ms_per_hospital']:.2f} ms per hospital", flush=True)
    return report(results, hospitals, payload, chunk, rounds, server_rounds, runs, target_ms)


def report(results: dict[str, list[dict[str, float]]], hospitals: int, payload: int,
           chunk: int, rounds: int, server_rounds: int, runs: int,
           target_ms: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"hospitals": hospitals, "payload": payload, "chunk": chunk,
                               "rounds": rounds, "server_rounds": server_rounds,
                               "runs": runs}
    rows = []
    for front in FRONTS:
        cpu = median(r["cpu_ms_per_hospital"] for r in results[front])
        wall = median(r["round_ms"] for r in results[front])
        summary[front] = {"cpu_ms_per_hospital": cpu, "round_ms": wall,
                          "all_cpu": [r["cpu_ms_per_hospital"] for r in results[front]]}
        share = cpu / target_ms
        rows.append([front, f"{wall:.1f}", f"{cpu:.2f}", f"{share:.2f}",
                     ", ".join(f"{r['cpu_ms_per_hospital']:.2f}" for r in results[front])])
    messages = f"in {chunk:,}-byte messages" if chunk else "in one message"
    print(f"\n{hospitals} hospitals, {payload:,} bytes each way per hospital and round"
          f" {messages}; aio and bridge {rounds} rounds per run, server {server_rounds};"
          f" median of {runs} runs:\n")
    print(table(["front", "round ms", "server CPU ms/hospital/round",
                 f"of a {target_ms:g} ms target", "each run"], rows))
    each = {front: summary[front]["cpu_ms_per_hospital"] for front in FRONTS}
    summary["bridge_ms"] = each["bridge"] - each["aio"]
    summary["project_ms"] = each["server"] - each["bridge"]
    print(f"\n- per hospital and round: gRPC's own {each['aio']:.2f} ms, the serving bridge"
          f" {summary['bridge_ms']:.2f} ms more, the project's own work"
          f" {summary['project_ms']:.2f} ms more")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.round_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hospitals", type=int, default=10, help="connected hospitals (10)")
    p.add_argument("--payload", type=int, default=400_000,
                   help="bytes each way per hospital and round (400,000: 100k float32)")
    p.add_argument("--chunk", type=int, default=0,
                   help="bytes per message (0: the payload in one message, as a small"
                        " model's task and upload)")
    p.add_argument("--rounds", type=int, default=200,
                   help="measured rounds per run of aio and bridge (after a warm-up)")
    p.add_argument("--target_ms", type=float,
                   help="server CPU per hospital and round to compare with (default: item"
                        f" 2's {ITEM_2_TARGET_MS:g} ms, or item 3's {ITEM_3_TARGET_MS:g} ms"
                        " with --chunk)")
    p.add_argument("--server_rounds", type=int, default=61,
                   help="rounds of the real server per run (its first is not timed)")
    p.add_argument("--runs", type=int, default=3, help="runs of each front, alternating")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    add_child_flags(p)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--parts", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.client:
        return client(args)
    for name in ("hospitals", "payload", "rounds", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.server_rounds < 2:
        p.error("--server_rounds must be at least 2 (the first round is not timed)")
    if args.chunk < 0:
        p.error("--chunk must be 0 (one message) or a size in bytes")
    from fl_core.constants import MAX_MESSAGE_BYTES

    if (args.chunk or args.payload) > MAX_MESSAGE_BYTES - 1024:
        p.error(f"a message of {args.chunk or args.payload:,} bytes is over gRPC's limit here"
                f" ({MAX_MESSAGE_BYTES:,}): give --chunk, e.g. 1048576")
    target = args.target_ms or (ITEM_3_TARGET_MS if args.chunk else ITEM_2_TARGET_MS)
    summary = run(args.hospitals, args.payload, args.rounds, args.runs, args.chunk,
                  args.server_rounds, target, args.keep)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
