"""No-op clients: real hospital connections that do not train.

    python -m bench.noop_client --server 127.0.0.1:PORT --work DIR \
        --clients hospital_1,hospital_2 [--stats_file out.json]

Each client is a real `fl_client.connection.ServerConnection` (its own certificate
from DIR/sites/<name>/keys, its own mTLS channel, Join with an X25519 key agreement,
the pushed task stream, sealed resumable transfers). For a TRAIN task it fetches the
global model and returns it "slightly perturbed" without training: small fixed noise
as the update when the task asks for a DELTA, the fetched weights plus that noise
for WEIGHTS. EVALUATE tasks are fetched and answered with a constant metric. So a
round costs exactly the system's own work (transfers, sealing, hashing,
aggregation, checkpoint) and nothing of torch training, and many clients fit in
one process as threads.

The noise is generated once per client (per model layout) and reused, so the
clients' own CPU use is the connection's work, not the random generator's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.common import write_json
from fl_client.connection import ServerConnection, TransferError
from fl_core.tensor_codec import dtype_from_proto
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb

log = logging.getLogger("bench.noop_client")

NOISE_SCALE = 1e-3
NUM_EXAMPLES = 100


def _layout_key(manifest: tpb.TensorManifest) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    return tuple((s.name, int(s.dtype), tuple(s.shape)) for s in manifest.tensors)


class NoopClient:
    """One no-op hospital: run() serves tasks until STOP (or stop()), reconnecting."""

    def __init__(self, name: str, server: str, tls: tuple[bytes, bytes, bytes],
                 model_type: str = "sized", seed: int = 0, keep_running: bool = False,
                 max_failures: int = 20) -> None:
        ca, cert, key = tls
        self.name = name
        self.conn = ServerConnection(server, ca, cert, key, name, model_type, NUM_EXAMPLES)
        self.seed = seed
        self.keep_running = keep_running
        self.max_failures = max_failures
        self.stop_event = threading.Event()
        self.noise: dict[str, torch.Tensor] = {}
        self._noise_key: Any = None
        self._call: Any = None
        self.joined = threading.Event()
        self.finished = False
        self.error = ""
        self.records: list[dict[str, Any]] = []
        self.failures = 0

    # ------------------------------------------------------------------- update
    def _noise_for(self, manifest: tpb.TensorManifest) -> dict[str, torch.Tensor]:
        key = _layout_key(manifest)
        if key != self._noise_key:
            g = torch.Generator().manual_seed(self.seed)
            noise: dict[str, torch.Tensor] = {}
            for spec in manifest.tensors:
                dtype = dtype_from_proto(spec.dtype, spec.name)
                if dtype.is_floating_point:
                    noise[spec.name] = (torch.randn(tuple(spec.shape), generator=g)
                                        .mul_(NOISE_SCALE).to(dtype))
            self.noise, self._noise_key = noise, key
        return self.noise

    def _update(self, task: cpb.Task, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        noise = self._noise_for(task.model_manifest)
        if task.config.update_kind == cpb.WEIGHTS:
            for name, t in noise.items():
                model[name].add_(t)  # the fetched tensors are this client's own buffer
            return model
        # DELTA: floating tensors are the noise; other tensors keep the global value.
        return {name: noise.get(name, t) for name, t in model.items()}

    # --------------------------------------------------------------------- tasks
    def _train(self, task: cpb.Task) -> None:
        t0 = time.perf_counter()
        model = self.conn.fetch_model(task, task.model_manifest)
        t1 = time.perf_counter()
        update = self._update(task, model)
        t2 = time.perf_counter()
        self.conn.submit_update(task, update, NUM_EXAMPLES, {"train_loss": 0.0},
                                stop=self.stop_event)
        t3 = time.perf_counter()
        self.records.append({"round": task.round, "kind": "train", "fetch_s": t1 - t0,
                             "perturb_s": t2 - t1, "upload_s": t3 - t2,
                             "bytes": task.model_manifest.total_bytes, "end": time.time(),
                             "process_cpu": time.process_time()})

    def _evaluate(self, task: cpb.Task) -> None:
        t0 = time.perf_counter()
        self.conn.fetch_model(task, task.model_manifest)
        self.conn.report(cpb.ReportRequest(
            task_id=task.task_id, job_id=task.job_id, round=task.round, kind=task.kind,
            status=cpb.OK, metrics={"accuracy": 0.5}, num_examples=NUM_EXAMPLES))
        self.records.append({"round": task.round, "kind": "evaluate",
                             "fetch_s": time.perf_counter() - t0, "end": time.time()})

    def handle(self, task: cpb.Task) -> None:
        """Answer one TRAIN or EVALUATE task (blocking; a failed transfer is counted)."""
        try:
            if task.kind == cpb.TRAIN:
                self._train(task)
            elif task.kind == cpb.EVALUATE:
                self._evaluate(task)
        except TransferError as exc:
            self.failures += 1
            log.warning("%s: task failed: %s", self.name, exc)

    def _serve(self) -> bool:
        call = self.conn.tasks()
        self._call = call
        self.joined.set()
        try:
            for task in call:
                if self.stop_event.is_set():
                    return True
                if task.kind == cpb.HEARTBEAT:
                    continue
                if task.kind == cpb.STOP:
                    if not self.keep_running:
                        return True
                    continue
                self.handle(task)
        finally:
            self._call = None
            call.cancel()
        return self.stop_event.is_set()

    def run(self) -> None:
        delay = 0.2
        try:
            while not self.stop_event.is_set() and self.failures <= self.max_failures:
                try:
                    self.conn.connect()
                    self.conn.join()
                    if self._serve():
                        self.finished = True
                        return
                except grpc.RpcError as exc:
                    if self.stop_event.is_set():
                        return
                    self.failures += 1
                    self.error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
                    log.warning("%s: %s; reconnecting", self.name, self.error)
                except TransferError as exc:
                    self.failures += 1
                    self.error = str(exc)
                self.stop_event.wait(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        call = self._call
        if call is not None:
            call.cancel()


def run_clients(server: str, work: Path, names: Sequence[str], model_type: str = "sized",
                keep_running: bool = False) -> tuple[list[NoopClient], list[threading.Thread]]:
    """Start one thread per client; returns the clients and their threads."""
    from bench.common import client_tls

    clients = [NoopClient(n, server, client_tls(work, n), model_type, seed=i,
                          keep_running=keep_running) for i, n in enumerate(names)]
    threads = [threading.Thread(target=c.run, name=f"noop-{c.name}", daemon=True)
               for c in clients]
    for t in threads:
        t.start()
    return clients, threads


def client_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The flags every no-op client process takes (this one and bench.light_clients)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="host:port of the server")
    p.add_argument("--work", type=Path, required=True,
                   help="bench work dir holding sites/<name>/keys for every client")
    p.add_argument("--clients", required=True, help="comma-separated client names")
    p.add_argument("--keep_running", action="store_true", help="ignore STOP tasks")
    p.add_argument("--timeout_s", type=float, default=3600.0, help="give up after this long")
    return p


def parse_client_args(p: argparse.ArgumentParser,
                      argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags and the client names; logging set up for a client process."""
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return args, [n for n in args.clients.split(",") if n]


def main(argv: list[str] | None = None) -> int:
    p = client_parser("bench.noop_client", __doc__)
    p.add_argument("--model_type", default="sized")
    p.add_argument("--stats_file", type=Path, help="write per-task timings here at exit")
    args, names = parse_client_args(p, argv)
    clients, threads = run_clients(args.server, args.work, names, args.model_type,
                                   args.keep_running)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + args.timeout_s
    try:
        while not stopping.is_set() and time.monotonic() < deadline:
            if not any(t.is_alive() for t in threads):
                break
            stopping.wait(0.2)
    finally:
        for c in clients:
            c.stop()
        for t in threads:
            t.join(timeout=10)
        if args.stats_file:
            stats = {c.name: {"records": c.records, "failures": c.failures,
                              "error": c.error, "finished": c.finished,
                              "resumes": c.conn.resumes} for c in clients}
            write_json(args.stats_file, stats)
    return 0 if all(c.failures == 0 for c in clients) else 1


if __name__ == "__main__":
    sys.exit(main())
