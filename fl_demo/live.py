"""Watch a running federation the way an operator would, and turn it into table rows.

The round table comes from the server's Status RPC, called with the admin
certificate (no token, no hospital identity), so the demo exercises the same path
an operator's dashboard would. Status carries each round's aggregate metrics and
each hospital's *current* epsilon; the epsilon a hospital had spent *after a given
round* is read (read-only) from the server's SQLite database, whose round summaries
and `reports` table record it per round. Once the server has exited (it does, with
--exit_when_done), the same database supplies any round the last poll missed.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc

STATUS_TIMEOUT_S = 5.0


@dataclass
class RoundRow:
    """One finished round, as the demo prints and reports it."""

    round: int
    state: str
    selected: int
    reported: int
    seconds: float
    metrics: dict[str, float]
    epsilon: dict[str, float] = field(default_factory=dict)  # hospital -> total after round

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "state": self.state, "selected": self.selected,
                "reported": self.reported, "seconds": self.seconds,
                "metrics": finite(self.metrics), "epsilon": finite(self.epsilon)}


def finite(values: Mapping[str, float]) -> dict[str, float | None]:
    """NaN and infinities as None, so report.json stays standard JSON."""
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


class StatusWatcher:
    """Polls Status over one reused admin channel and yields each round once, in order."""

    def __init__(self, channel: grpc.Channel, hospitals: Iterable[str], db_path: Path) -> None:
        self.channel = channel
        self.stub = cpb_grpc.CoordinatorStub(channel)
        self.hospitals = list(hospitals)
        self.db_path = db_path
        self.job_id = ""
        self.phase = ""
        self.current_round = 0
        self.total_rounds = 0
        self.last_error = ""
        self._emitted: set[int] = set()
        self._next_round = 1
        self._pending: dict[int, RoundRow] = {}
        self._live_epsilon: dict[str, float] = {}
        self._last_epsilon: dict[str, float] = dict.fromkeys(self.hospitals, 0.0)

    def close(self) -> None:
        self.channel.close()

    # sources ----------------------------------------------------------------------
    def poll(self) -> list[RoundRow]:
        """New rounds since the last call (empty when the server did not answer)."""
        try:
            # only rounds not yet released: a recorded round never changes
            reply: cpb.StatusReply = self.stub.Status(
                cpb.StatusRequest(rounds_after=self._next_round - 1), timeout=STATUS_TIMEOUT_S)
        except grpc.RpcError as exc:
            self.last_error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            return []
        self.last_error = ""
        self.job_id = reply.job_id or self.job_id
        self.phase = reply.phase
        self.current_round = int(reply.round)
        self.total_rounds = int(reply.total_rounds)
        self._live_epsilon = {c.client_id: float(c.epsilon_total) for c in reply.clients}
        for summary in reply.rounds:
            self._stage(RoundRow(round=int(summary.round), state=summary.state,
                                 selected=int(summary.selected), reported=int(summary.reported),
                                 seconds=float(summary.seconds),
                                 metrics={k: float(v) for k, v in summary.metrics.items()}))
        return self._release()

    def catch_up(self) -> list[RoundRow]:
        """Rounds the Status polls missed, read from the server's database."""
        for row in read_rounds(self.db_path, self.job_id):
            self._stage(row)
        return self._release()

    # ordering ---------------------------------------------------------------------
    def _stage(self, row: RoundRow) -> None:
        if row.round not in self._emitted:
            self._pending[row.round] = row

    def _release(self) -> list[RoundRow]:
        out: list[RoundRow] = []
        if not self._pending:
            return out
        epsilon_by_round = read_epsilon(self.db_path, self.job_id)
        while self._next_round in self._pending:
            row = self._pending.pop(self._next_round)
            row.epsilon = self._epsilon_after(row.round, epsilon_by_round)
            out.append(row)
            self._emitted.add(row.round)
            self._next_round += 1
        return out

    def _epsilon_after(self, round_no: int,
                       by_round: dict[int, dict[str, float]]) -> dict[str, float]:
        """Each hospital's total after `round_no`; a hospital not in that round keeps its
        previous total. Without database rows, Status's current totals stand in (exact
        for the latest round, which is the one being printed)."""
        recorded = by_round.get(round_no)
        for name in self.hospitals:
            if recorded is not None and name in recorded:
                self._last_epsilon[name] = recorded[name]
            elif recorded is None and name in self._live_epsilon:
                self._last_epsilon[name] = self._live_epsilon[name]
        return dict(self._last_epsilon)


def _connect_ro(db_path: Path) -> sqlite3.Connection | None:
    if not db_path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None
    return conn


def _job_clause(job_id: str) -> tuple[str, tuple[Any, ...]]:
    if job_id:
        return "job_id = ?", (job_id,)
    return "job_id = (SELECT job_id FROM jobs ORDER BY created DESC LIMIT 1)", ()


def read_epsilon(db_path: Path, job_id: str) -> dict[int, dict[str, float]]:
    """round -> hospital -> epsilon total it had spent after training that round.

    Two records say it: the round's summary (per accepted client, written when the
    round completes) and each hospital's TRAIN report; the summary wins where both do.
    """
    conn = _connect_ro(db_path)
    if conn is None:
        return {}
    where, args = _job_clause(job_id)
    out: dict[int, dict[str, float]] = {}
    try:
        with contextlib.suppress(sqlite3.Error):
            for round_no, client_id, epsilon in conn.execute(
                    f"SELECT round, client_id, epsilon_total FROM reports WHERE {where}"
                    " AND kind = 'TRAIN' AND status = 'OK' AND epsilon_total IS NOT NULL"
                    " ORDER BY received", args):
                out.setdefault(int(round_no), {})[str(client_id)] = float(epsilon)
        with contextlib.suppress(sqlite3.Error):
            for round_no, metrics_json in conn.execute(
                    f"SELECT round, metrics_json FROM rounds WHERE {where}", args):
                for client_id, epsilon in _summary_epsilon(metrics_json).items():
                    out.setdefault(int(round_no), {})[client_id] = epsilon
    finally:
        conn.close()
    return out


def _summary_epsilon(metrics_json: str) -> dict[str, float]:
    """{client: epsilon_total} from a round summary's "clients" entry, if it has one."""
    try:
        data = json.loads(metrics_json)
    except (TypeError, ValueError):
        return {}
    clients = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(clients, dict):
        return {}
    out = {}
    for client_id, info in clients.items():
        value = info.get("epsilon_total") if isinstance(info, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(client_id)] = float(value)
    return out


def read_rounds(db_path: Path, job_id: str) -> list[RoundRow]:
    """The recorded rounds of the job (its numeric metrics only)."""
    conn = _connect_ro(db_path)
    if conn is None:
        return []
    where, args = _job_clause(job_id)
    try:
        rows = conn.execute(
            "SELECT round, state, selected, reported, seconds, metrics_json FROM rounds"
            f" WHERE {where} ORDER BY round", args).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()
    out = []
    for round_no, state, selected, reported, seconds, metrics_json in rows:
        out.append(RoundRow(round=int(round_no), state=str(state), selected=int(selected),
                            reported=int(reported), seconds=float(seconds),
                            metrics=_numeric_metrics(metrics_json)))
    return out


def _numeric_metrics(metrics_json: str) -> dict[str, float]:
    """Numeric entries of a round's stored metrics (a nested "metrics" object if the
    store kept the whole round summary)."""
    try:
        data = json.loads(metrics_json)
    except (TypeError, ValueError):
        return {}
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
