"""Transfer throughput: the sealed mTLS model stream against plain gRPC on loopback.

    python -m bench.transfer [--mib 256] [--runs 5]

Two processes on 127.0.0.1: a server process and a client process. In every run,
interleaved so drift hits all alike, the client downloads and uploads a float32
state dict of `--mib` MiB three ways:

  plain   insecure gRPC, generic handlers moving raw bytes in the same 1 MiB chunks
          (each side copies every chunk into one preallocated buffer, as the codec does)
  mtls    the same raw handlers over mutual TLS (the project's credentials/options)
  sealed  the real path: fl_client.connection.ServerConnection (Join, key agreement,
          fetch_model / submit_update) against the real fl_server AggregatorService,
          CoordinatorService and AuthInterceptor: manifest + digests (BLAKE3, as
          negotiated at Join), AES-256-GCM
          STREAM sealing, mTLS, the server's spool file (kept for the next upload
          of its size, as the server keeps it between rounds: fl_server/spool_pool.py;
          the first sealed upload of a run writes a new one) and finiteness check

For `sealed` the server process is the real ServerApp; only its round engine loop is
replaced by one that keeps opening one-client TRAIN rounds, and its strategy by one
that discards updates, so a run measures the transfer and not aggregation (that is
bench.aggregation) or checkpointing (bench.rounds).

Receiver memory: the peak RSS growth of the receiving process over the transfer
(VmHWM after, minus VmRSS before, with VmHWM reset via /proc/<pid>/clear_refs just
before): the client for downloads, the server for uploads. The client lets go of the
buffer the last sealed download left for reuse (fl_core/receive_buffers.py) before each
one: every download here is a cold first fetch, whose buffer is counted in full.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    MB,
    MiB,
    Procs,
    add_child_flags,
    cpu_seconds,
    fmt,
    make_bench_pki,
    median,
    peak_rss,
    print_header,
    reset_peak,
    rss,
    table,
    verdict,
    wait_ready,
    workdir,
    write_ready,
)

TARGET_RATIO = 0.75
RSS_ALLOWANCE = 64 * MiB
CLIENT = "hospital_1"
RAW_SERVICE = "bench.Raw"


# =========================================================================== server


def _raw_handlers(source: memoryview) -> Any:
    import grpc

    def download(request: bytes, context: Any) -> Iterator[bytes]:
        total = int.from_bytes(request[:8], "little")
        chunk = int.from_bytes(request[8:12], "little")
        for start in range(0, total, chunk):
            yield bytes(source[start:min(start + chunk, total)])

    def upload(request_iterator: Iterator[bytes], context: Any) -> bytes:
        received = 0
        buffer: mmap.mmap | None = None
        for i, data in enumerate(request_iterator):
            if i == 0:
                total = int.from_bytes(data[:8], "little")
                buffer = mmap.mmap(-1, total)
                continue
            assert buffer is not None
            buffer[received:received + len(data)] = data
            received += len(data)
        if buffer is not None:
            buffer.close()
        return received.to_bytes(8, "little")

    return grpc.method_handlers_generic_handler(RAW_SERVICE, {
        "Download": grpc.unary_stream_rpc_method_handler(download),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
    })


def serve(args: argparse.Namespace) -> int:
    """The server process: the real ServerApp (sealed) + a raw bench service."""
    import os
    import signal
    from concurrent import futures

    import grpc
    import torch

    from bench.sized_model import SizedTask, make_state, register
    from fl_core.tls import SERVER_OPTIONS, server_credentials
    from fl_proto import coordinator_pb2 as cpb
    from fl_server.config import ServerConfig
    from fl_server.server import ServerApp
    from fl_server.strategies.base import Strategy

    work = args.work
    params = args.params
    SizedTask.params = params
    register()  # Join refuses model types it does not know

    class Discard(Strategy):
        """Takes nothing in: the benchmark measures transfers, not aggregation."""

        name = "discard"
        streaming = True

        def accept(self, client_id: str, delta: Any, num_examples: int,
                   release: Any = None) -> None:
            return None

        def _fold(self, *a: Any) -> None:
            return None

        def _aggregate(self) -> dict[str, torch.Tensor]:
            return {}

    cfg = ServerConfig(host="127.0.0.1", port=0, keys_dir=work / "keys",
                       state_dir=work / "server_state", model_type="sized", rounds=1_000_000,
                       min_clients=1, fed_eval=False, round_deadline_s=600.0)
    app = ServerApp(cfg, new_job=True)
    engine = app.engine
    engine.strategy = Discard()

    def rounds_forever() -> None:
        attempt = 0
        try:
            while not engine.stop_event.is_set():
                ready = app.registry.wait_for_connected(1, 1.0, engine.stop_event)
                if not ready or engine.stop_event.is_set():
                    continue
                attempt += 1
                rs = engine._open_round(1, attempt, cpb.TRAIN, ready[:1], 600.0)
                engine._wait_round(rs)
        finally:
            engine.done_event.set()

    engine.run = rounds_forever  # type: ignore[method-assign]
    sealed_port = app.start()

    # The raw baseline: its own gRPC server (no auth interceptor), plain and mTLS ports.
    flat = torch.cat([t.reshape(-1) for t in make_state(params).values()])
    raw_view = flat.view(torch.uint8).numpy().data
    raw = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=SERVER_OPTIONS)
    raw.add_generic_rpc_handlers((_raw_handlers(raw_view),))
    plain_port = raw.add_insecure_port("127.0.0.1:0")
    keys = work / "keys"
    creds = server_credentials((keys / "server.crt").read_bytes(),
                               (keys / "server.key").read_bytes(), (keys / "ca.crt").read_bytes())
    mtls_port = raw.add_secure_port("127.0.0.1:0", creds)
    raw.start()

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    write_ready(args.ready, {"pid": os.getpid(), "sealed": sealed_port, "plain": plain_port,
                             "mtls": mtls_port})
    stopping.wait()
    raw.stop(2).wait(3)
    app.stop(grace_s=2.0)
    return 0


# =========================================================================== client


class RawClient:
    def __init__(self, channel: Any) -> None:
        self._down = channel.unary_stream(f"/{RAW_SERVICE}/Download")
        self._up = channel.stream_unary(f"/{RAW_SERVICE}/Upload")

    def download(self, total: int, chunk: int) -> int:
        buffer = mmap.mmap(-1, total)
        got = 0
        for data in self._down(total.to_bytes(8, "little") + chunk.to_bytes(4, "little"),
                               timeout=600):
            buffer[got:got + len(data)] = data
            got += len(data)
        buffer.close()
        return got

    def upload(self, source: memoryview, chunk: int) -> int:
        total = len(source)

        def messages() -> Iterator[bytes]:
            yield total.to_bytes(8, "little")
            for start in range(0, total, chunk):
                yield bytes(source[start:min(start + chunk, total)])

        return int.from_bytes(self._up(messages(), timeout=600), "little")


_CPU_PIDS: list[int | str] = ["self"]


def _measure(fn: Any, pid: int | str) -> tuple[float, int, Any, float]:
    """(seconds, peak RSS growth of `pid` in bytes, result, CPU seconds of both ends)."""
    gc.collect()
    before = rss(pid)
    reset_peak(pid)
    cpu0 = sum(cpu_seconds(p) for p in _CPU_PIDS)
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    cpu = sum(cpu_seconds(p) for p in _CPU_PIDS) - cpu0
    return seconds, peak_rss(pid) - before, result, cpu


def client(args: argparse.Namespace) -> int:
    import grpc
    import torch

    from bench.common import client_tls
    from bench.sized_model import make_state
    from fl_client.connection import ServerConnection
    from fl_core.constants import CHUNK_SIZE
    from fl_core.receive_buffers import RECEIVE_BUFFERS
    from fl_core.tensor_codec import build_manifest
    from fl_core.tls import channel_credentials, channel_options
    from fl_proto import coordinator_pb2 as cpb

    info = json.loads(args.ready.read_text())
    server_pid = int(info["pid"])
    _CPU_PIDS.append(server_pid)
    ca, cert, key = client_tls(args.work, CLIENT)
    state = make_state(args.params, seed=1)
    total = sum(t.numel() * t.element_size() for t in state.values())
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    flat_view = flat.view(torch.uint8).numpy().data

    plain_ch = grpc.insecure_channel(f"127.0.0.1:{info['plain']}", options=channel_options())
    mtls_ch = grpc.secure_channel(f"127.0.0.1:{info['mtls']}",
                                  channel_credentials(ca, cert, key), options=channel_options())
    raws = {"plain": RawClient(plain_ch), "mtls": RawClient(mtls_ch)}
    conn = ServerConnection(f"127.0.0.1:{info['sealed']}", ca, cert, key, CLIENT, "sized", 100)
    conn.connect()
    conn.join()
    tasks = iter(conn.tasks())

    def next_train() -> cpb.Task:
        for task in tasks:
            if task.kind == cpb.TRAIN:
                return task
        raise RuntimeError("task stream ended")

    # Warm up every path once (connections, TLS handshakes, first allocations).
    for r in raws.values():
        r.download(8 * CHUNK_SIZE, CHUNK_SIZE)
        r.upload(flat_view[:8 * CHUNK_SIZE], CHUNK_SIZE)

    results: list[dict[str, Any]] = []
    for run in range(args.runs):
        for variant in ("plain", "mtls", "sealed"):
            if variant == "sealed":
                task = next_train()
                # a cold fetch, as the plain paths' are: without the buffer the last
                # run's model left (fl_core/receive_buffers.py) in RSS before and reused
                RECEIVE_BUFFERS.clear()
                s, grow, model, cpu = _measure(
                    lambda t=task: conn.fetch_model(t, t.model_manifest), "self")
                assert sum(t.numel() * t.element_size() for t in model.values()) == total
                del model
                results.append({"run": run, "variant": variant, "dir": "download",
                                "seconds": s, "rss_growth": grow, "cpu": cpu})
                t0 = time.perf_counter()
                # what hashing the update before its first byte would take (its digests
                # trail the data instead), in the digest this session uploads with
                assert conn.session is not None
                build_manifest(state, digest=conn.session.upload_digest)
                manifest_s = time.perf_counter() - t0
                s, grow, _, cpu = _measure(lambda t=task: conn.submit_update(t, state, 100, {}),
                                           server_pid)
                results.append({"run": run, "variant": variant, "dir": "upload", "cpu": cpu,
                                "seconds": s, "rss_growth": grow, "manifest_s": manifest_s})
            else:
                r = raws[variant]
                s, grow, got, cpu = _measure(lambda r=r: r.download(total, CHUNK_SIZE), "self")
                assert got == total
                results.append({"run": run, "variant": variant, "dir": "download",
                                "seconds": s, "rss_growth": grow, "cpu": cpu})
                s, grow, got, cpu = _measure(lambda r=r: r.upload(flat_view, CHUNK_SIZE),
                                             server_pid)
                assert got == total
                results.append({"run": run, "variant": variant, "dir": "upload",
                                "seconds": s, "rss_growth": grow, "cpu": cpu})
            print(f"run {run + 1}/{args.runs} {variant} done", file=sys.stderr, flush=True)
    conn.close()
    plain_ch.close()
    mtls_ch.close()
    args.out.write_text(json.dumps({"bytes": total, "results": results}))
    return 0


# =========================================================================== driver


def load_average() -> str:
    """The 1-minute load average now: the machine is shared, and figures mean little
    without it."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def run(mib: int = 256, runs: int = 5, keep: bool = False) -> dict[str, Any]:
    params = mib * MiB // 4
    procs = Procs()
    with workdir("transfer", keep) as work:
        make_bench_pki(work, [CLIENT])
        ready = work / "server.ready"
        out = work / "client.json"
        try:
            server = procs.start(["-m", "bench.transfer", "--serve", "--work", str(work),
                                  "--params", str(params), "--ready", str(ready)],
                                 work / "server.log", cwd=work)
            load_before = load_average()
            wait_ready(server, ready, timeout_s=300)
            client_proc = procs.start(
                ["-m", "bench.transfer", "--client", "--work", str(work), "--params",
                 str(params), "--ready", str(ready), "--runs", str(runs), "--out", str(out)],
                work / "client.log", cwd=work)
            rc = client_proc.wait(timeout_s=120 + runs * 120)
            if rc != 0:
                raise RuntimeError(f"transfer client failed ({rc}):\n{client_proc.tail()}\n"
                                   f"server:\n{server.tail()}")
            data = json.loads(out.read_text())
            data["load"] = f"{load_before} / {load_average()}"
        finally:
            procs.stop_all()
    return report(data, mib, runs)


def report(data: dict[str, Any], mib: int, runs: int) -> dict[str, Any]:
    total = data["bytes"]
    rows = []
    summary: dict[str, Any] = {"mib": mib, "runs": runs}
    for direction in ("download", "upload"):
        med: dict[str, float] = {}
        for variant in ("plain", "mtls", "sealed"):
            rs = [r for r in data["results"] if r["variant"] == variant and r["dir"] == direction]
            secs = median(r["seconds"] for r in rs)
            grow = median(r["rss_growth"] for r in rs)
            peak = max(r["rss_growth"] for r in rs)
            med[variant] = total / secs / MB
            extra = ""
            if variant == "sealed" and direction == "upload":
                extra = f"manifest {median(r['manifest_s'] for r in rs):.2f}s"
            cpu = median(r["cpu"] for r in rs)
            rows.append([direction, variant, f"{secs:.3f}", fmt(total / secs / MB),
                         fmt(med[variant] / med["plain"]), f"{cpu:.2f}", f"{grow / MiB:.0f}",
                         f"{peak / MiB:.0f}", extra])
            summary[f"{direction}_{variant}_MBps"] = total / secs / MB
            summary[f"{direction}_{variant}_rss_growth_max"] = peak
        summary[f"{direction}_ratio"] = med["sealed"] / med["plain"]
        # The same ratio run by run (each run's paths measured back to back), then the
        # median: steadier than a ratio of medians when the machine's load drifts.
        per_run = [p["seconds"] / s["seconds"]
                   for p in data["results"] for s in data["results"]
                   if p["dir"] == s["dir"] == direction and p["run"] == s["run"]
                   and p["variant"] == "plain" and s["variant"] == "sealed"]
        summary[f"{direction}_ratio_per_run"] = median(per_run)
    print_header(f"Transfer: {mib} MiB float32 state dict, loopback, median of {runs} runs")
    print(table(["direction", "path", "median s", "MB/s", "vs plain", "CPU s (both ends)",
                 "recv RSS +MiB (med)",
                 "recv RSS +MiB (max)", "note"], rows))
    limit = (mib * MiB + RSS_ALLOWANCE) / MiB
    print()
    for direction in ("download", "upload"):
        ratio = summary[f"{direction}_ratio"]
        grow = summary[f"{direction}_sealed_rss_growth_max"] / MiB
        print(f"- {direction}: sealed/plain = {ratio:.2f} (target >= {TARGET_RATIO}: "
              f"{verdict(ratio >= TARGET_RATIO)}; median of per-run ratios "
              f"{summary[f'{direction}_ratio_per_run']:.2f}); receiver peak RSS growth "
              f"{grow:.0f} MiB (target <= {limit:.0f} MiB: {verdict(grow <= limit)})")
    print(f"- load average (1 min) before / after the runs: {data.get('load', '?')}")
    sys.stdout.flush()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="model size in MiB")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    add_child_flags(p)
    p.add_argument("--params", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.client:
        return client(args)
    summary = run(args.mib, args.runs, args.keep)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
