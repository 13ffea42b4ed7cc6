"""The server's Prometheus metrics and the live per-hospital view the dashboard reads.

Why one module: the same few events (a chunk received, an update accepted, a call
refused, a phase changed) feed both the scrape endpoint and the extra Status fields,
so the daemon's code calls one function per event and nothing else.

Counters and histograms are updated where things happen (one-line calls from the
services and the round engine). Everything that is a state rather than an event
(who is connected, last seen, the model's round, certificate expiry) is read from the
live objects at scrape time by `_LiveCollector`, so it can never go stale.

The registry is this process's own (not prometheus_client's global one); the
endpoint serves only what is registered here, bound to 127.0.0.1 unless the
operator names another address.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fl_core.cert_expiry import ExpiryCache
from fl_core.logs import log_event
from fl_proto import coordinator_pb2 as cpb

if TYPE_CHECKING:
    from fl_server.clients import ClientRegistry
    from fl_server.rounds import RoundEngine
    from fl_server.store import RoundRecord

log = logging.getLogger("fl_server.metrics")

REGISTRY = CollectorRegistry()
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

ROUNDS = Counter("fl_server_rounds", "Rounds by outcome (completed, failed; attempt_failed"
                 " counts retried attempts)", ["outcome"], registry=REGISTRY)
PHASE_SECONDS = Histogram("fl_server_round_phase_seconds", "Time spent in each round phase",
                          ["phase"], buckets=PHASE_BUCKETS, registry=REGISTRY)
ROUND_SECONDS = Histogram("fl_server_round_duration_seconds", "Wall time of completed rounds",
                          buckets=PHASE_BUCKETS, registry=REGISTRY)
BYTES_SENT = Counter("fl_server_sent_bytes", "Sealed model bytes streamed to hospitals",
                     registry=REGISTRY)
BYTES_RECEIVED = Counter("fl_server_received_bytes", "Sealed update bytes received",
                         registry=REGISTRY)
RESUMED = Counter("fl_server_transfers_resumed", "Transfers resumed after a cut connection",
                  ["direction"], registry=REGISTRY)
SPOOLS_REUSED = Counter("fl_server_spool_files_reused",
                        "Uploads written into a spool file kept from an earlier upload"
                        " (fl_server/spool_pool.py)", registry=REGISTRY)
REFUSALS = Counter("fl_server_refusals", "Calls refused, by error code", ["code"],
                   registry=REGISTRY)
UPDATES = Counter("fl_server_updates_accepted", "Updates accepted into a round", ["client"],
                  registry=REGISTRY)


@dataclass
class _Transfer:
    task_id: str = ""
    down_done: bool = False
    up_done: int = 0
    up_total: int = 0


@dataclass
class _Hospital:
    """What the dashboard shows about one hospital beyond the registry's entry."""

    updates_accepted: int = 0
    refusals: int = 0
    epsilon_budget: float = 0.0
    transfer: _Transfer | None = None


class Observatory:
    """Per-hospital counters and the current phase's start; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hospitals: dict[str, _Hospital] = {}
        self.phase = "idle"
        self.phase_since = time.monotonic()

    def _h(self, client_id: str) -> _Hospital:
        return self._hospitals.setdefault(client_id, _Hospital())

    def phase_changed(self, phase: str) -> None:
        now = time.monotonic()
        with self._lock:
            previous, since = self.phase, self.phase_since
            self.phase, self.phase_since = phase, now
        if previous not in ("idle", "completed", "failed"):
            PHASE_SECONDS.labels(previous).observe(now - since)

    def download(self, client_id: str, task_id: str, done: bool, nbytes: int = 0,
                 resumed: bool = False) -> None:
        if resumed:
            RESUMED.labels("down").inc()
        BYTES_SENT.inc(nbytes)
        with self._lock:
            h = self._h(client_id)
            if h.transfer is None or h.transfer.task_id != task_id:
                h.transfer = _Transfer(task_id)
            h.transfer.down_done = h.transfer.down_done or done

    def chunk_received(self, client_id: str, task_id: str, done: int, total: int,
                       nbytes: int) -> None:
        BYTES_RECEIVED.inc(nbytes)
        with self._lock:
            h = self._h(client_id)
            if h.transfer is None or h.transfer.task_id != task_id:
                h.transfer = _Transfer(task_id, down_done=True)
            h.transfer.up_done, h.transfer.up_total = done, total

    def update_accepted(self, client_id: str, metrics: dict[str, float]) -> None:
        UPDATES.labels(client_id).inc()
        with self._lock:
            h = self._h(client_id)
            h.updates_accepted += 1
            if "epsilon_budget" in metrics:
                h.epsilon_budget = float(metrics["epsilon_budget"])

    def refused(self, code: str, client_id: str = "") -> None:
        REFUSALS.labels(code or "UNKNOWN").inc()
        if client_id:
            with self._lock:
                self._h(client_id).refusals += 1

    def snapshot(self) -> dict[str, _Hospital]:
        with self._lock:
            return {cid: _Hospital(h.updates_accepted, h.refusals, h.epsilon_budget,
                                   _Transfer(**vars(h.transfer)) if h.transfer else None)
                    for cid, h in self._hospitals.items()}


OBSERVED = Observatory()
_LIVE: Collector | None = None


def round_outcome(outcome: str, seconds: float | None = None) -> None:
    ROUNDS.labels(outcome).inc()
    if seconds is not None:
        ROUND_SECONDS.observe(seconds)


def client_phase(rs: Any, client_id: str, transfer: _Transfer | None) -> str:
    """Where a hospital stands in the open round, as the server sees it."""
    if rs is None or client_id not in getattr(rs, "selected", ()):
        return "idle"
    evaluating = rs.kind == cpb.EVALUATE
    if client_id in rs.accepted:
        return "update accepted"
    if client_id in rs.failed:
        return "failed"
    if evaluating and client_id in rs.evaluations:
        return "evaluated"
    if not rs.open:
        return "idle"
    task = rs.tasks.get(client_id)
    ours = transfer is not None and task is not None and transfer.task_id == task.task_id
    if ours and transfer is not None and transfer.up_total:
        return "uploading"
    if ours and transfer is not None and transfer.down_done:
        return "evaluating" if evaluating else "training"
    if ours:
        return "downloading"
    return "selected"


def fill_status(reply: cpb.StatusReply, engine: RoundEngine,
                rounds: list[RoundRecord]) -> None:
    """Add the dashboard's fields (ClientStatus/StatusReply/RoundSummary 20-29);
    `rounds` are the records the reply's rounds were made from."""
    from fl_server.audit import recent_events

    reply.now_unix_ms = int(time.time() * 1000)
    reply.phase_seconds = max(0.0, time.monotonic() - OBSERVED.phase_since)
    hospitals = OBSERVED.snapshot()
    declared = {e.client_id: float(getattr(e, "epsilon_budget", 0.0) or 0.0)
                for e in engine.registry.entries()}
    rs = engine.current
    for client in reply.clients:
        h = hospitals.get(client.client_id, _Hospital())
        client.phase = client_phase(rs, client.client_id, h.transfer)
        if h.transfer is not None and client.phase == "uploading":
            client.upload_chunks_done = h.transfer.up_done
            client.upload_chunks_total = h.transfer.up_total
        client.updates_accepted = h.updates_accepted
        client.refusals = h.refusals
        client.epsilon_budget = declared.get(client.client_id) or h.epsilon_budget
        client.selected = rs is not None and rs.open and client.client_id in rs.selected
    per_round = {row.round: row.metrics.get("clients") for row in rounds}
    for summary in reply.rounds:
        clients = per_round.get(summary.round)
        if isinstance(clients, dict):
            for cid, info in clients.items():
                eps = info.get("epsilon_total") if isinstance(info, dict) else None
                if isinstance(eps, int | float) and not isinstance(eps, bool):
                    summary.client_epsilon[cid] = float(eps)
    for event in recent_events():
        reply.events.add(**event)


class _LiveCollector(Collector):
    """States read at scrape time from the running server."""

    def __init__(self, engine: RoundEngine, registry: ClientRegistry, keys_dir: Path) -> None:
        self.engine = engine
        self.registry = registry
        self.keys_dir = keys_dir
        self._certs = ExpiryCache()

    def collect(self) -> Iterator[Metric]:
        entries = self.registry.entries()
        connected = set(self.registry.connected())
        g = GaugeMetricFamily("fl_server_clients_connected",
                              "Hospitals with an open task stream")
        g.add_metric([], len(connected))
        yield g
        g = GaugeMetricFamily("fl_server_client_last_seen_timestamp_seconds",
                              "Unix time each hospital was last heard from", labels=["client"])
        for e in entries:
            g.add_metric([e.client_id], e.last_seen)
        yield g
        g = GaugeMetricFamily("fl_server_client_connected",
                              "1 while the hospital's task stream is open", labels=["client"])
        for e in entries:
            g.add_metric([e.client_id], 1.0 if e.client_id in connected else 0.0)
        yield g
        g = GaugeMetricFamily("fl_server_client_epsilon_spent",
                              "Epsilon each hospital reported as spent", labels=["client"])
        for e in entries:
            g.add_metric([e.client_id], e.epsilon_total)
        yield g
        fields = self.engine.status_fields()
        model = self.engine.model
        g = GaugeMetricFamily("fl_server_model_round",
                              "Round of the global model (0: the initial model)")
        g.add_metric([], model.version if model else 0)
        yield g
        g = GaugeMetricFamily("fl_server_round", "The round the job is in")
        g.add_metric([], fields["round"])
        yield g
        g = GaugeMetricFamily("fl_server_rounds_planned", "Rounds in the job")
        g.add_metric([], self.engine.cfg.rounds)
        yield g
        g = GaugeMetricFamily("fl_server_job_info", "1 for the job being served (or the last)",
                              labels=["job", "model_type", "strategy", "state"])
        if self.engine.job_id:
            g.add_metric([self.engine.job_id, self.engine.cfg.model_type,
                          self.engine.cfg.strategy, fields["job_state"]], 1.0)
        yield g
        g = GaugeMetricFamily("fl_server_phase", "1 for the round phase the server is in",
                              labels=["phase"])
        from fl_server.rounds import PHASES
        for phase in PHASES:
            g.add_metric([phase], 1.0 if phase == fields["phase"] else 0.0)
        yield g
        g = GaugeMetricFamily("fl_server_certificate_expiry_timestamp_seconds",
                              "Unix time each certificate expires", labels=["kind", "name"])
        certs = [("ca", "ca", self.keys_dir / "ca.crt"),
                 ("server", "server", self.keys_dir / "server.crt")]
        certs += [("client", p.stem, p) for p in sorted((self.keys_dir / "issued").glob("*.crt"))]
        for kind, name, path in certs:
            expiry = self._certs.expiry(path)
            if expiry is not None:
                g.add_metric([kind, name], expiry)
        yield g


def start(host: str, port: int, engine: RoundEngine, registry: ClientRegistry,
          keys_dir: Path) -> int:
    """Serve /metrics on host:port (port 0: off); returns the port or 0."""
    global _LIVE
    if _LIVE is not None:  # a second app in one process (tests) replaces the first
        REGISTRY.unregister(_LIVE)
    _LIVE = _LiveCollector(engine, registry, keys_dir)
    REGISTRY.register(_LIVE)
    if not port:
        return 0
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_address[1])
    log_event(log, "metrics_serving", address=f"{host}:{bound}")
    return bound


def observe(app: Any, host: str, port: int, port_explicit: bool) -> int:
    """The daemon's one call: open the audit trail in the state dir and serve /metrics.
    A metrics port the operator typed must bind (OSError, exit 2 at start); the default
    one only warns when taken, so a second server on one machine still starts."""
    from fl_server.audit import open_server_trail

    open_server_trail(app.cfg.state_dir)
    try:
        return start(host, port, app.engine, app.registry, app.cfg.keys_dir)
    except OSError as exc:
        if port_explicit:
            raise OSError(f"--metrics_port {port} on {host}: {exc}") from exc
        log_event(log, "metrics_off", logging.WARNING, port=port, host=host, reason=str(exc),
                  fix="pass --metrics_port with a free port, or 0 to turn metrics off")
        return 0
