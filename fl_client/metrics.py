"""The hospital daemon's Prometheus metrics and its audit hooks, behind one object.

Why together: every point the daemon reports (a phase begins, an update left, a
report was sent, the server refused a transfer) is both a metric and, when something
left the site, an audit record; the daemon makes one call per point into
`ClientWatch` and knows nothing of either format.

Metrics are off unless `--metrics_port` is given (a hospital exposes nothing by
default), and bind to 127.0.0.1 unless `--metrics_host` says otherwise. States (epsilon
spent, budget left, bytes moved, certificate expiry) are read at scrape time from
the ledger and the connection, so they never go stale.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fl_client.audit import ClientAudit, _tls_file
from fl_core.cert_expiry import ExpiryCache
from fl_core.constants import METRICS_HOST
from fl_core.logs import log_event
from fl_proto import coordinator_pb2 as cpb

log = logging.getLogger("fl_client.metrics")

PHASES = ("idle", "download", "train", "upload", "evaluate")
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics_port", type=int, default=0,
                   help="serve Prometheus /metrics on this port (0: off, the default)")
    p.add_argument("--metrics_host", default=METRICS_HOST,
                   help="address the metrics endpoint listens on")


class _Live(Collector):
    def __init__(self, watch: ClientWatch) -> None:
        self.watch = watch
        self._certs = ExpiryCache()

    def collect(self) -> Iterator[Metric]:
        daemon = self.watch.daemon
        ledger = daemon.ledger
        for name, doc, value in (
                ("fl_client_epsilon_spent", "Cumulative epsilon spent (privacy ledger)",
                 ledger.spent()),
                ("fl_client_epsilon_budget", "The hospital's total epsilon budget",
                 ledger.total_epsilon_budget),
                ("fl_client_epsilon_budget_remaining", "Epsilon budget left",
                 ledger.remaining())):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        conn = daemon.conn
        for name, doc, value in (
                ("fl_client_sent_bytes", "Sealed update bytes sent", conn.bytes_sent),
                ("fl_client_received_bytes", "Sealed model bytes received",
                 conn.bytes_received),
                ("fl_client_transfers_resumed", "Transfers resumed after a cut connection",
                 conn.resumes)):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        g = GaugeMetricFamily("fl_client_phase", "1 for what the daemon is doing now",
                              labels=["phase"])
        current = self.watch.current_phase
        for phase in PHASES:
            g.add_metric([phase], 1.0 if phase == current else 0.0)
        yield g
        g = GaugeMetricFamily("fl_client_certificate_expiry_timestamp_seconds",
                              "Unix time the hospital's certificate and its CA expire",
                              labels=["kind"])
        keys_dir = Path(daemon.args.keys_dir)
        for kind, path in (("client", _tls_file(keys_dir, f"{daemon.client_id}.crt")),
                           ("ca", _tls_file(keys_dir, "ca.crt"))):
            expiry = self._certs.expiry(path)
            if expiry is not None:
                g.add_metric([kind], expiry)
        yield g


class ClientWatch:
    """Metrics registry, audit trail and current phase of one client daemon."""

    def __init__(self, daemon: Any) -> None:
        args = daemon.args
        self.daemon = daemon
        self.registry = CollectorRegistry()
        self.tasks = Counter("fl_client_tasks", "Tasks handled, by kind and outcome",
                             ["kind", "outcome"], registry=self.registry)
        self.refusals = Counter("fl_client_refusals",
                                "Refusals, by who refused (hospital or server)",
                                ["by"], registry=self.registry)
        self.phase_seconds = Histogram("fl_client_phase_seconds", "Time spent in each phase",
                                       ["phase"], buckets=PHASE_BUCKETS,
                                       registry=self.registry)
        self.registry.register(_Live(self))
        self._lock = threading.Lock()
        self.current_phase = "idle"
        self._since = time.monotonic()
        self._outcome = ""
        self.audit = ClientAudit(daemon.ledger.state_dir, args.server_url, Path(args.keys_dir),
                                 daemon.client_id, args.server_name)
        self.audit.started(client=daemon.client_id, model_type=",".join(daemon.studies),
                           server_url=args.server_url,
                           epsilon_budget=daemon.ledger.total_epsilon_budget,
                           delta=daemon.ledger.delta,
                           accountant=getattr(daemon.ledger, "accountant", ""))
        self.port = 0
        port = int(getattr(args, "metrics_port", 0) or 0)
        if port:
            host = getattr(args, "metrics_host", METRICS_HOST)
            server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = int(server.server_address[1])
            log_event(log, "metrics_serving", address=f"{host}:{self.port}")

    def phase(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            previous, since = self.current_phase, self._since
            self.current_phase, self._since = name, now
        if previous != "idle":
            self.phase_seconds.labels(previous).observe(now - since)

    def task_done(self, task: cpb.Task) -> None:
        with self._lock:
            outcome, self._outcome = self._outcome or "ok", ""
        self.tasks.labels(cpb.TaskKind.Name(task.kind), outcome).inc()
        self.phase("idle")

    def update_sent(self, task: cpb.Task, receipt: Any, result: Any) -> None:
        self.audit.update_sent(task.job_id, task.round, receipt.stream_id, receipt.sha256,
                               int(receipt.bytes_received), float(result.epsilon_round),
                               bool(result.dp_enabled))

    def report(self, request: cpb.ReportRequest) -> None:
        status = cpb.ReportStatus.Name(request.status)
        with self._lock:
            self._outcome = status.lower()
        if status == "REFUSED":
            self.refusals.labels("hospital").inc()
        self.audit.report_sent(request.job_id, request.round, cpb.TaskKind.Name(request.kind),
                               status, request.reason, dict(request.metrics))

    def refused_by_server(self, task: cpb.Task, reason: str) -> None:
        if "refused" in reason:
            self.refusals.labels("server").inc()
            self.audit.refused_by_server(task.job_id, task.round, reason)


def watch_client(daemon: Any) -> ClientWatch:
    """The daemon's one call at start."""
    return ClientWatch(daemon)
