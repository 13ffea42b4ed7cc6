"""Durable server state: SQLite (WAL) for the record, safetensors for checkpoints.

The database is the truth. A round exists once its row is committed, and a row is
committed only after its checkpoint is safely on disk (temp file, fsync, rename,
fsync of the directory), so a server killed at any instant restarts into the
last recorded round with a checkpoint that matches it. Anything that does not
match on the way back (missing file, unparsable file, hash mismatch) raises
rather than quietly starting the job over: silently resetting a federation that
hospitals have spent privacy budget on would be the worst possible failure.

Every connection is shared between the gRPC server's threads behind one lock;
SQLite serialises writers anyway, and the lock makes the checkpoint-then-record
sequence atomic with respect to other callers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fl_core.constants import METRICS_CACHE_BYTES
from fl_server.checkpoint_file import write_tensors_file

SCHEMA_VERSION = 2  # 2: jobs.job_sha256 (issue 15); version 1 databases are migrated
DB_NAME = "server.db"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "fl-checkpoint/1"
DEFAULT_KEEP_CHECKPOINTS = 5
JOB_STATES = ("queued", "running", "paused", "completed", "failed", "cancelled", "aborted")
# A job in one of these states never runs again.
FINAL_JOB_STATES = ("completed", "failed", "cancelled", "aborted")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ROUND_FILE = re.compile(r"round_(\d+)\.safetensors")
_MODEL_PREFIX = "model/"
# where a checkpoint holds the model's tensors (fl_server/model_pages.py maps them)
CHECKPOINT_MODEL_PREFIX = _MODEL_PREFIX
_STRATEGY_PREFIX = "strategy/"

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    model_type TEXT NOT NULL,
    strategy TEXT NOT NULL,
    config_json TEXT NOT NULL,
    total_rounds INTEGER NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    initial_sha256 TEXT,
    initial_checkpoint TEXT,
    job_sha256 TEXT
);
CREATE TABLE rounds (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    round INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('completed', 'failed')),
    selected INTEGER NOT NULL,
    reported INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    seconds REAL NOT NULL,
    model_sha256 TEXT,
    checkpoint TEXT,
    recorded REAL NOT NULL,
    UNIQUE (job_id, round)
);
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    num_examples INTEGER,
    epsilon_total REAL,
    last_status TEXT
);
CREATE TABLE reports (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    epsilon_round REAL,
    epsilon_total REAL,
    received REAL NOT NULL,
    UNIQUE (job_id, round, client_id, task_id, kind)
);
CREATE TABLE events (
    ts REAL NOT NULL,
    job_id TEXT,
    kind TEXT NOT NULL,
    detail_json TEXT NOT NULL
);
CREATE INDEX events_by_job ON events (job_id, ts);
CREATE INDEX reports_by_round ON reports (job_id, round);
"""
# Every recorded round looks up the few rounds that still name a checkpoint (which to
# unreference, which files to keep): without this index that scanned every round of the
# job, metrics and all, so a round's cost grew with the job (5.5 against 3.3 ms of server
# CPU per hospital at 12,000 small rounds). Made, if missing, whenever a database opens.
_CHECKPOINT_INDEX = ("CREATE INDEX IF NOT EXISTS rounds_with_checkpoint ON rounds (job_id, round)"
                     " WHERE checkpoint IS NOT NULL")


class StoreError(Exception):
    """The state directory cannot be used as asked (corrupt, unwritable, misused)."""


class CheckpointError(StoreError):
    """A checkpoint the database names is missing, unreadable or does not match."""


class RoundAlreadyRecorded(StoreError):
    """A round (or a job's initial model) was recorded before; rounds are exactly-once."""


@dataclass(frozen=True)
class Job:
    job_id: str
    model_type: str
    strategy: str
    config: dict[str, Any]
    total_rounds: int
    state: str
    created: float
    job_sha256: str = ""  # of the submitted job file, or of the settings (flags)


@dataclass(frozen=True)
class RoundSummary:
    """What the round state machine knows about a finished round."""

    selected: int
    reported: int
    failed: int
    seconds: float
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    job_id: str
    round: int
    state: str
    selected: int
    reported: int
    failed: int
    metrics: dict[str, Any]
    seconds: float
    model_sha256: str | None
    checkpoint: str | None


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    first_seen: float
    last_seen: float
    num_examples: int | None
    epsilon_total: float | None
    last_status: str | None


@dataclass(frozen=True)
class Report:
    """One client report (training or evaluation result, or a refusal)."""

    job_id: str
    round: int
    client_id: str
    task_id: str
    kind: str
    status: str
    reason: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    num_examples: int = 0
    epsilon_round: float | None = None
    epsilon_total: float | None = None


@dataclass(frozen=True)
class Event:
    ts: float
    job_id: str | None
    kind: str
    detail: dict[str, Any]


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and raw bytes, in the mapping's order.

    A JSON header line per tensor frames the bytes, so no two different states
    (e.g. a byte moved from one tensor to the next) hash alike.
    """
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().contiguous()
        header = [name, str(t.dtype).removeprefix("torch."), list(t.shape), t.numel()]
        h.update(json.dumps(header, separators=(",", ":")).encode() + b"\n")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A checkpoint written ahead of its model's hash (PendingCheckpoint) holds this in
# place of the hex digest, which is written over it, same length, before the rename.
_SHA_PLACEHOLDER = "0" * 64
_SHA_FIELD = b'"model_sha256":"'


def _write_temp_checkpoint(final: Path, job_id: str, round: int,
                           model_state: Mapping[str, torch.Tensor],
                           strategy_state: Mapping[str, torch.Tensor], model_sha: str) -> str:
    """The checkpoint as a flushed temp file beside `final` (its name returned); the
    caller renames it into place (`_install`) or removes it."""
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "job_id": job_id,
        "round": str(round),
        "model_sha256": model_sha,
        "strategy_sha256": state_sha256(strategy_state),
        # safetensors stores tensors sorted; the model's own order is part of its hash.
        "model_order": json.dumps(list(model_state)),
        "strategy_order": json.dumps(list(strategy_state)),
    }
    tensors = {
        **_savable(model_state, _MODEL_PREFIX),
        **_savable(strategy_state, _STRATEGY_PREFIX),
    }
    job_dir = final.parent
    if not job_dir.is_dir():
        job_dir.mkdir(parents=True)
        _fsync_dir(job_dir.parent)
    fd, tmp_name = tempfile.mkstemp(dir=job_dir, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_tensors_file(tensors, tmp_name, metadata=metadata)
        fd = os.open(tmp_name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp_name)
        raise
    return tmp_name


def _fill_in_model_sha(tmp_name: str, model_sha: str) -> None:
    """Writes `model_sha` over the placeholder in the header of a checkpoint written
    ahead, and flushes it: one page, the data is on disk already."""
    if len(model_sha) != len(_SHA_PLACEHOLDER):
        raise StoreError(f"model hash {model_sha!r} is not a SHA-256 hex digest")
    fd = os.open(tmp_name, os.O_RDWR)
    try:
        size = int.from_bytes(os.pread(fd, 8, 0), "little")
        header = os.pread(fd, size, 8)
        field = _SHA_FIELD + _SHA_PLACEHOLDER.encode() + b'"'
        at = header.find(field)
        if at < 0 or header.find(field, at + 1) >= 0:
            raise StoreError(f"{tmp_name}: no single model_sha256 placeholder in its header")
        os.pwrite(fd, model_sha.encode("ascii"), 8 + at + len(_SHA_FIELD))
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """The same names in the same order, each over the same memory and layout (views
    of one model: `detach()`, a contiguous tensor's `contiguous()`)."""
    if list(a) != list(b):
        return False
    return all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.dtype == y.dtype
               and x.stride() == y.stride() for x, y in zip(a.values(), b.values(), strict=True))


def _install(tmp_name: str, final: Path) -> None:
    """Renames a flushed temp checkpoint into place, durably."""
    os.replace(tmp_name, final)
    _fsync_dir(final.parent)


def _checkpoint_error(final: Path, exc: BaseException) -> StoreError:
    hint = ""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # safetensors reports I/O errors as "... (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code == errno.ENOSPC:
        hint = " (disk full)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = " (read-only or not writable)"
    return StoreError(
        f"cannot write checkpoint {final}{hint}: {exc}; the round is not recorded and "
        "earlier checkpoints are untouched"
    )


class PendingCheckpoint:
    """A round's checkpoint written and flushed on a thread of its own while the round's
    last steps run (the new model's hashes, its step bound, a federated evaluation). On
    a 100 MB model the write and its fsync were ~0.2 s of the round's serial tail, the
    disk busy and the cores idle (BENCHMARKS.md, issue 16 item 3). The model's SHA-256
    is not known yet: the header holds a placeholder of the same length, which
    `Store.complete_round` writes over before the file is renamed into place, so no
    checkpoint path ever names a file without its hash. `discard` removes the file of a
    round that is not recorded (an unusable model, a failure); a crash leaves a temp
    file, removed at the next start like any other."""

    def __init__(self, final: Path, job_id: str, round: int,
                 model_state: Mapping[str, torch.Tensor],
                 strategy_state: Mapping[str, torch.Tensor]) -> None:
        self.final = final
        self.round = round
        self.model_state = model_state
        self._tmp: str | None = None
        self._error: BaseException | None = None
        self._claimed = False
        self._thread = threading.Thread(
            target=self._write, args=(job_id, strategy_state), daemon=True,
            name=f"checkpoint-{round}")
        self._thread.start()

    def _write(self, job_id: str, strategy_state: Mapping[str, torch.Tensor]) -> None:
        try:
            self._tmp = _write_temp_checkpoint(self.final, job_id, self.round, self.model_state,
                                               strategy_state, _SHA_PLACEHOLDER)
        except BaseException as exc:  # noqa: BLE001 - raised again by claim()
            self._error = exc

    def claim(self) -> str:
        """The written temp file, once flushed; the writer's error if it failed. The
        caller owns the file from then on."""
        self._thread.join()
        if self._claimed:
            raise StoreError(f"checkpoint of round {self.round} already claimed")
        self._claimed = True
        if self._error is not None:
            raise self._error
        assert self._tmp is not None
        return self._tmp

    def discard(self) -> None:
        """Removes the file unless `claim` took it (idempotent)."""
        self._thread.join()
        if not self._claimed and self._tmp is not None:
            with suppress(OSError):
                os.unlink(self._tmp)
        self._claimed = True


def _savable(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous tensors that share no storage; tied weights are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise StoreError(f"state entry {name!r} is {type(tensor).__name__}, not a tensor")
        t = tensor.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[prefix + name] = t
    return out


class Store:
    """The server's jobs, rounds, clients, reports, events and checkpoints under one directory."""

    def __init__(self, state_dir: Path, keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS) -> None:
        if keep_checkpoints < 1:
            raise StoreError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        self.state_dir = Path(state_dir)
        self.keep_checkpoints = keep_checkpoints
        self.db_path = self.state_dir / DB_NAME
        self.checkpoint_dir = self.state_dir / CHECKPOINT_DIR
        self._lock = threading.RLock()
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {self.checkpoint_dir}: {exc}") from exc
        self._conn = self._open()
        self._remove_stale_temp_files()

    # ------------------------------------------------------------------ opening
    def _open(self) -> sqlite3.Connection:
        path = self.db_path
        try:
            conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"state database {path} refused WAL mode (got {mode!r})")
            # FULL: a committed round survives power loss, not only a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            check = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise StoreError(
                    f"state database {path} is corrupt (quick_check: {'; '.join(check[:3])}); "
                    "restore it from a backup, do not delete it: it holds the privacy and "
                    "round history"
                )
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"state database {path} is corrupt or not a SQLite database: {exc}"
            ) from exc
        except StoreError:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        has_version = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if has_version is None:
            tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
            if tables:
                raise StoreError(
                    f"state database {self.db_path} has tables but no schema_version; "
                    "it was not created by this server"
                )
            statements = [s for s in _SCHEMA.split(";") if s.strip()]
            _run_atomically(conn, [*statements, "INSERT INTO schema_version (version)"
                                   f" VALUES ({SCHEMA_VERSION})"])
        else:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = None if row is None else row[0]
            if version == 1:  # before the job queue: one column more, nothing else changes
                _run_atomically(conn, ["ALTER TABLE jobs ADD COLUMN job_sha256 TEXT",
                                       f"UPDATE schema_version SET version={SCHEMA_VERSION}"])
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"state database {self.db_path} has schema version {version}, "
                    f"this server understands {SCHEMA_VERSION}"
                )
        conn.execute(_CHECKPOINT_INDEX)  # an index only: the schema version is the same

    def _remove_stale_temp_files(self) -> None:
        """Temp files are leftovers of a crash mid-write; they were never recorded."""
        for tmp in self.checkpoint_dir.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            with suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite failures (disk full, I/O) become StoreError."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        with suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.db_path}: {exc}; nothing recorded") from exc

    @staticmethod
    def _insert(conn: sqlite3.Connection, table: str, values: Mapping[str, Any]) -> int:
        """INSERT OR IGNORE of named values; returns the number of rows inserted (0 or 1)."""
        names = ", ".join(values)
        marks = ", ".join(f":{n}" for n in values)
        sql = f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})"
        return conn.execute(sql, dict(values)).rowcount

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # --------------------------------------------------------------------- jobs
    def create_job(
        self,
        job_id: str,
        model_type: str,
        strategy: str,
        config: Mapping[str, Any],
        total_rounds: int,
        state: str = "running",
        job_sha256: str = "",
    ) -> Job:
        """A new job: `running` (its initial model follows), or `queued` behind the others
        (its initial model is made when it starts)."""
        if state not in ("running", "queued"):
            raise StoreError(f"a new job is running or queued, not {state!r}")
        if not _JOB_ID.fullmatch(job_id):
            raise StoreError(
                f"job id {job_id!r} must be 1-128 characters of letters, digits, '.', '_', '-' "
                "(it names the checkpoint directory)"
            )
        if total_rounds < 1:
            raise StoreError(f"job {job_id}: total_rounds must be >= 1, got {total_rounds}")
        created = time.time()
        config_json = json.dumps(dict(config), sort_keys=True)
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE job_id=?", (job_id,)).fetchone():
                raise StoreError(f"job {job_id!r} already exists")
            conn.execute(
                "INSERT INTO jobs (job_id, model_type, strategy, config_json, total_rounds, "
                "state, created, job_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, model_type, strategy, config_json, total_rounds, state, created,
                 job_sha256),
            )
            self._insert_event(conn, job_id, "job_created",
                               {"model_type": model_type, "state": state})
        return Job(job_id, model_type, strategy, json.loads(config_json), total_rounds, state,
                   created, job_sha256)

    def get_job(self, job_id: str) -> Job | None:
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def latest_job(self) -> Job | None:
        """The most recently created job (the one a restarted server resumes)."""
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created DESC, rowid DESC")
        return _job(rows[0]) if rows else None

    def jobs(self, states: tuple[str, ...] | None = None) -> list[Job]:
        """Every job (or those in `states`), oldest first: the queue's order. The states
        are filtered by SQLite: every Join asks for the queue, and parsing every finished
        job of a long-lived server cost 1.7 ms a Join at 300 jobs, under the store's lock."""
        if states is None:
            rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created, rowid")
        else:
            marks = ", ".join("?" * len(states))
            rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) "
                               "ORDER BY created, rowid", tuple(states))
        return [_job(r) for r in rows]

    def running_job(self) -> Job | None:
        """The job a (re)started server resumes: the newest one left running."""
        running = self.jobs(("running",))
        return running[-1] if running else None

    def next_queued(self) -> Job | None:
        queued = self.jobs(("queued",))
        return queued[0] if queued else None

    def set_job_state(self, job_id: str, state: str) -> None:
        if state not in JOB_STATES:
            raise StoreError(f"job state {state!r} is not one of {JOB_STATES}")
        with self._transaction() as conn:
            cur = conn.execute("UPDATE jobs SET state=? WHERE job_id=?", (state, job_id))
            if cur.rowcount != 1:
                raise StoreError(f"unknown job {job_id!r}")
            self._insert_event(conn, job_id, "job_state", {"state": state})

    # ------------------------------------------------------------------- rounds
    def save_initial_model(self, job_id: str, state: Mapping[str, torch.Tensor]) -> Path:
        """Checkpoints the job's starting model as round 0 (once: restarts must reuse it)."""
        with self._lock:
            row = self._job_row(job_id)
            if row[7] is not None:
                raise RoundAlreadyRecorded(f"job {job_id!r} already has an initial model")
            sha, path = self._write_checkpoint(job_id, 0, state, {})
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE jobs SET initial_sha256=?, initial_checkpoint=? WHERE job_id=?",
                    (sha, self._relative(path), job_id),
                )
                self._insert_event(conn, job_id, "initial_model", {"sha256": sha})
            return path

    def complete_round(
        self,
        job_id: str,
        round: int,
        summary: RoundSummary,
        model_state: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, torch.Tensor],
        model_sha256: str | None = None,
        pending: PendingCheckpoint | None = None,
    ) -> RoundRecord:
        """Checkpoints the new global model, then records the round (exactly once).

        `model_sha256`, when the caller already holds `state_sha256(model_state)`,
        spares hashing the whole model a second time. `pending`: the same checkpoint,
        already being written (`write_ahead`); it is finished here instead of written
        again (the strategy state is the one it was started with).
        """
        with self._lock:
            self._check_new_round(job_id, round)
            if pending is not None:
                if pending.final != self.checkpoint_path(job_id, round) \
                        or not _same_tensors(pending.model_state, model_state):
                    raise StoreError(f"the checkpoint written ahead is not job {job_id!r}"
                                     f" round {round}'s model")
                sha, path = self._install_pending(pending, model_sha256)
            else:
                sha, path = self._write_checkpoint(job_id, round, model_state, strategy_state,
                                                   model_sha256)
            with self._transaction() as conn:
                self._insert_round(conn, job_id, round, summary, sha, self._relative(path))
                self._insert_event(conn, job_id, "round_completed", {"round": round, "sha256": sha})
                self._unreference_old_checkpoints(conn, job_id)
            self._delete_unreferenced_checkpoints(job_id, below=round)
            return self._round_record(job_id, round)

    def write_ahead(self, job_id: str, round: int, model_state: Mapping[str, torch.Tensor],
                    strategy_state: Mapping[str, torch.Tensor]) -> PendingCheckpoint:
        """Starts writing round `round`'s checkpoint on a thread (PendingCheckpoint): pass
        it to `complete_round`, or `discard` it."""
        return PendingCheckpoint(self.checkpoint_path(job_id, round), job_id, round,
                                 model_state, strategy_state)

    def record_failed_round(
        self, job_id: str, round: int, summary: RoundSummary, reason: str
    ) -> RoundRecord:
        """Records a round that produced no model (no quorum, aggregation error...)."""
        failed = replace(summary, metrics={**summary.metrics, "reason": reason})
        with self._lock:
            self._check_new_round(job_id, round)
            with self._transaction() as conn:
                self._insert_round(conn, job_id, round, failed, None, None)
                self._insert_event(conn, job_id, "round_failed", {"round": round, "reason": reason})
            return self._round_record(job_id, round)

    def rounds(self, job_id: str, after: int = 0) -> list[RoundRecord]:
        """The job's recorded rounds numbered above `after`, in order."""
        rows = self._query(
            f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE job_id=? AND round>? ORDER BY round",
            (job_id, after),
        )
        return [_round(r) for r in rows]

    def last_completed_round(self, job_id: str) -> int:
        """The latest round with a model (0: none, start from the initial model)."""
        rows = self._query(
            "SELECT MAX(round) FROM rounds WHERE job_id=? AND state='completed'", (job_id,)
        )
        return int(rows[0][0] or 0)

    def last_model_sha256(self, job_id: str) -> str:
        """The hash of the latest recorded model ("" before the first), read from that one
        row: listing a job must not cost a parse of every round it has run."""
        rows = self._query(
            "SELECT model_sha256 FROM rounds WHERE job_id=? AND state='completed'"
            " AND model_sha256 IS NOT NULL AND model_sha256 != '' ORDER BY round DESC LIMIT 1",
            (job_id,),
        )
        return str(rows[0][0]) if rows else ""

    def last_round(self, job_id: str) -> int:
        """The latest round recorded in any state; the next round is this plus one."""
        rows = self._query("SELECT MAX(round) FROM rounds WHERE job_id=?", (job_id,))
        return int(rows[0][0] or 0)

    def load_checkpoint(
        self, job_id: str, round: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(model state, strategy state) of a recorded round, verified against the database."""
        expected_sha, relative = self._checkpoint_record(job_id, round)
        return self._read_checkpoint(self.state_dir / relative, job_id, round, expected_sha)

    def recorded_checkpoint(self, job_id: str, round: int) -> Path:
        """The checkpoint file recorded for a round (0: the initial model), as written:
        not re-verified (load_checkpoint does that)."""
        return self.state_dir / self._checkpoint_record(job_id, round)[1]

    def _checkpoint_record(self, job_id: str, round: int) -> tuple[str, str]:
        """(model SHA-256, checkpoint path relative to the state directory) on record."""
        with self._lock:
            if round == 0:
                job = self._job_row(job_id)
                expected_sha, relative = job[7], job[8]
                if expected_sha is None:
                    raise CheckpointError(f"job {job_id!r} has no initial model (round 0)")
            else:
                rows = self._conn.execute(
                    "SELECT state, model_sha256, checkpoint FROM rounds WHERE job_id=? AND round=?",
                    (job_id, round),
                ).fetchall()
                if not rows or rows[0][0] != "completed":
                    raise CheckpointError(f"job {job_id!r} has no completed round {round}")
                expected_sha, relative = rows[0][1], rows[0][2]
                if relative is None:
                    raise CheckpointError(
                        f"the checkpoint of job {job_id!r} round {round} was pruned "
                        f"(only the last {self.keep_checkpoints} and round 0 are kept)"
                    )
        return str(expected_sha), str(relative)

    def checkpoint_path(self, job_id: str, round: int) -> Path:
        return self.checkpoint_dir / job_id / f"round_{round:06d}.safetensors"

    # ------------------------------------------------------- clients and reports
    def upsert_client(
        self,
        client_id: str,
        *,
        num_examples: int | None = None,
        epsilon_total: float | None = None,
        status: str | None = None,
    ) -> None:
        """Notes a sighting of a client; None fields keep their previous value."""
        with self._transaction() as conn:
            self._upsert_client(conn, client_id, num_examples, epsilon_total, status)

    def record_report(self, report: Report) -> bool:
        """Stores a report once (False: a retried duplicate, ignored) and updates the client."""
        values = asdict(report)
        values["metrics_json"] = json.dumps(values.pop("metrics"), sort_keys=True)
        values["received"] = time.time()
        with self._transaction() as conn:
            if self._insert(conn, "reports", values) != 1:
                return False
            self._upsert_client(
                conn,
                report.client_id,
                report.num_examples or None,
                report.epsilon_total,
                report.status,
            )
            return True

    def reports(self, job_id: str, round: int | None = None) -> list[Report]:
        sql = (
            "SELECT job_id, round, client_id, task_id, kind, status, reason, metrics_json, "
            "num_examples, epsilon_round, epsilon_total FROM reports WHERE job_id=?"
        )
        args: tuple[Any, ...] = (job_id,)
        if round is not None:
            sql += " AND round=?"
            args += (round,)
        rows = self._query(sql + " ORDER BY rowid", args)
        return [
            Report(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9], r[10])
            for r in rows
        ]

    def clients(self) -> list[ClientRecord]:
        rows = self._query(
            "SELECT client_id, first_seen, last_seen, num_examples, epsilon_total, last_status "
            "FROM clients ORDER BY client_id"
        )
        return [ClientRecord(*r) for r in rows]

    def record_event(
        self, kind: str, detail: Mapping[str, Any] | None = None, job_id: str | None = None
    ) -> None:
        with self._transaction() as conn:
            self._insert_event(conn, job_id, kind, detail or {})

    def events(self, job_id: str | None = None, limit: int = 1000) -> list[Event]:
        """The most recent events (all jobs when job_id is None), oldest first."""
        if job_id is None:
            rows = self._query(
                "SELECT ts, job_id, kind, detail_json FROM events ORDER BY rowid DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = self._query(
                "SELECT ts, job_id, kind, detail_json FROM events WHERE job_id=? "
                "ORDER BY rowid DESC LIMIT ?",
                (job_id, limit),
            )
        return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in reversed(rows)]

    # ---------------------------------------------------------------- internals
    def _job_row(self, job_id: str) -> tuple[Any, ...]:
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id=?", (job_id,))
        if not rows:
            raise StoreError(f"unknown job {job_id!r}")
        return rows[0]

    def _insert_round(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        round: int,
        summary: RoundSummary,
        sha: str | None,
        checkpoint: str | None,
    ) -> None:
        values = {
            "job_id": job_id,
            "round": round,
            "state": "failed" if sha is None else "completed",
            "selected": summary.selected,
            "reported": summary.reported,
            "failed": summary.failed,
            "metrics_json": json.dumps(dict(summary.metrics), sort_keys=True),
            "seconds": summary.seconds,
            "model_sha256": sha,
            "checkpoint": checkpoint,
            "recorded": time.time(),
        }
        if self._insert(conn, "rounds", values) != 1:
            raise RoundAlreadyRecorded(f"job {job_id!r} round {round} is already recorded")

    def _round_record(self, job_id: str, round: int) -> RoundRecord:
        rows = self._query(
            f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE job_id=? AND round=?", (job_id, round)
        )
        return _round(rows[0])

    def _check_new_round(self, job_id: str, round: int) -> None:
        """Refuses a duplicate or out-of-order round before any file is touched."""
        self._job_row(job_id)
        if round < 1:
            raise StoreError(f"job {job_id!r}: rounds are numbered from 1, got {round}")
        existing = self._query(
            "SELECT state FROM rounds WHERE job_id=? AND round=?", (job_id, round)
        )
        if existing:
            raise RoundAlreadyRecorded(
                f"job {job_id!r} round {round} is already recorded ({existing[0][0]})"
            )
        last = self.last_round(job_id)
        if round <= last:
            raise StoreError(
                f"job {job_id!r}: round {round} is older than the last recorded round {last}"
            )

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.state_dir).as_posix()

    def _write_checkpoint(
        self,
        job_id: str,
        round: int,
        model_state: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, torch.Tensor],
        model_sha: str | None = None,
    ) -> tuple[str, Path]:
        """Writes a checkpoint so that the final path holds either the old file or the new."""
        model_sha = model_sha or state_sha256(model_state)
        final = self.checkpoint_path(job_id, round)
        tmp_name: str | None = None
        try:
            tmp_name = _write_temp_checkpoint(final, job_id, round, model_state, strategy_state,
                                              model_sha)
            _install(tmp_name, final)
        except Exception as exc:
            if tmp_name is not None:
                with suppress(OSError):
                    os.unlink(tmp_name)
            raise _checkpoint_error(final, exc) from exc
        return model_sha, final

    def _install_pending(self, pending: PendingCheckpoint, model_sha: str | None
                         ) -> tuple[str, Path]:
        """`pending`'s file, its model hash written in, flushed and renamed into place."""
        final = pending.final
        try:
            tmp_name = pending.claim()
        except Exception as exc:  # the writer's own failure, raised again here
            raise _checkpoint_error(final, exc) from exc
        try:
            model_sha = model_sha or state_sha256(pending.model_state)
            _fill_in_model_sha(tmp_name, model_sha)
            _install(tmp_name, final)
        except Exception as exc:
            with suppress(OSError):
                os.unlink(tmp_name)
            raise _checkpoint_error(final, exc) from exc
        return model_sha, final

    def _read_checkpoint(
        self, path: Path, job_id: str, round: int, expected_sha: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} for job {job_id!r} round {round} is missing; "
                "refusing to start the job over"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                model_order = json.loads(meta["model_order"])
                strategy_order = json.loads(meta["strategy_order"])
                model = {n: f.get_tensor(_MODEL_PREFIX + n) for n in model_order}
                strategy = {n: f.get_tensor(_STRATEGY_PREFIX + n) for n in strategy_order}
                stored = set(f.keys())
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
        expected_keys = {_MODEL_PREFIX + n for n in model} | {
            _STRATEGY_PREFIX + n for n in strategy
        }
        problems = []
        if meta.get("format") != CHECKPOINT_FORMAT:
            problems.append(f"format {meta.get('format')!r}")
        if meta.get("job_id") != job_id or meta.get("round") != str(round):
            problems.append(f"it belongs to job {meta.get('job_id')!r} round {meta.get('round')}")
        if stored != expected_keys:
            problems.append("its tensor list does not match its metadata")
        sha = state_sha256(model)
        if sha != expected_sha or meta.get("model_sha256") != expected_sha:
            problems.append(f"model sha256 {sha} != recorded {expected_sha}")
        if state_sha256(strategy) != meta.get("strategy_sha256"):
            problems.append("strategy state sha256 does not match")
        if problems:
            raise CheckpointError(f"checkpoint {path} is not valid: {'; '.join(problems)}")
        return model, strategy

    def _unreference_old_checkpoints(self, conn: sqlite3.Connection, job_id: str) -> None:
        """Drops all but the newest K round checkpoints from the record (files go after)."""
        conn.execute(
            "UPDATE rounds SET checkpoint=NULL WHERE job_id=? AND round IN ("
            "SELECT round FROM rounds WHERE job_id=? AND checkpoint IS NOT NULL "
            "ORDER BY round DESC LIMIT -1 OFFSET ?)",
            (job_id, job_id, self.keep_checkpoints),
        )

    def _delete_unreferenced_checkpoints(self, job_id: str, below: int) -> None:
        """Deletes round files the database no longer names.

        Scanning (rather than deleting just what this commit pruned) also sweeps
        files orphaned by a crash between a commit and its deletions, or written
        for a round that was never recorded. Only rounds before ``below`` are
        touched, and never round 0.
        """
        referenced = {
            row[0]
            for row in self._query(
                "SELECT checkpoint FROM rounds WHERE job_id=? AND checkpoint IS NOT NULL",
                (job_id,),
            )
        }
        for path in (self.checkpoint_dir / job_id).glob("round_*.safetensors"):
            match = _ROUND_FILE.fullmatch(path.name)
            if match is None:
                continue
            rnd = int(match.group(1))
            if 0 < rnd < below and self._relative(path) not in referenced:
                path.unlink(missing_ok=True)

    @staticmethod
    def _insert_event(
        conn: sqlite3.Connection, job_id: str | None, kind: str, detail: Mapping[str, Any]
    ) -> None:
        conn.execute(
            "INSERT INTO events (ts, job_id, kind, detail_json) VALUES (?, ?, ?, ?)",
            (time.time(), job_id, kind, json.dumps(dict(detail), sort_keys=True)),
        )

    @staticmethod
    def _upsert_client(
        conn: sqlite3.Connection,
        client_id: str,
        num_examples: int | None,
        epsilon_total: float | None,
        status: str | None,
    ) -> None:
        now = time.time()
        conn.execute(
            "INSERT INTO clients (client_id, first_seen, last_seen, num_examples, epsilon_total, "
            "last_status) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (client_id) DO UPDATE SET last_seen=excluded.last_seen, "
            "num_examples=COALESCE(excluded.num_examples, clients.num_examples), "
            "epsilon_total=COALESCE(excluded.epsilon_total, clients.epsilon_total), "
            "last_status=COALESCE(excluded.last_status, clients.last_status)",
            (client_id, now, now, num_examples, epsilon_total, status),
        )


_JOB_COLUMNS = (
    "job_id, model_type, strategy, config_json, total_rounds, state, created, "
    "initial_sha256, initial_checkpoint, job_sha256"
)


_ROUND_COLUMNS = (
    "job_id, round, state, selected, reported, failed, metrics_json, seconds, model_sha256, "
    "checkpoint"
)


def _run_atomically(conn: sqlite3.Connection, statements: list[str]) -> None:
    """Schema statements in one transaction: all of them, or none (a migration cut
    short must not leave a half-built schema)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def held_size(value: Any) -> int:
    """Bytes of the Python objects behind a decoded JSON value: its containers, keys,
    strings and numbers (shared small ints counted as if they were not: an upper bound).

    Why not the text's length: decoded, a round's metrics (a dict per hospital, a float
    per figure) take five to seven times their JSON text (10 hospitals, by tracemalloc
    and by RSS); this count says about eight."""
    size = 0
    pending = [value]
    while pending:
        item = pending.pop()
        size += sys.getsizeof(item)
        if isinstance(item, dict):
            size += sum(sys.getsizeof(k) for k in item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return size


class DecodedMetrics:
    """Recorded rounds' metrics, decoded once: Status lists every round of the job each
    time it is asked, and a job of months has thousands. Bounded by the memory the
    entries hold (the text each is keyed by and its decoded objects, `held_size`), not by
    entries: a round's metrics carry a summary per hospital (METRICS_CACHE_BYTES).
    The decoded dicts are shared: callers copy before changing them."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def held_bytes(self) -> int:
        """What the kept entries hold, as `held_size` counts it, their keys' text included."""
        return self._bytes

    def get(self, text: str) -> dict[str, Any]:
        with self._lock:
            hit = self._items.get(text)
            if hit is not None:
                self._items.move_to_end(text)
                return hit[0]
        decoded: dict[str, Any] = json.loads(text)
        if len(text) > self._max:
            return decoded  # its text alone is over the budget: not measured, not kept
        cost = sys.getsizeof(text) + held_size(decoded)
        if cost > self._max:
            return decoded  # larger than the whole cache: decoded each time it is asked
        with self._lock:
            if text not in self._items:
                self._items[text] = (decoded, cost)
                self._bytes += cost
                while self._bytes > self._max:
                    _, (_, old_cost) = self._items.popitem(last=False)
                    self._bytes -= old_cost
        return decoded


_metrics_cache = DecodedMetrics(METRICS_CACHE_BYTES)


def _metrics(text: str) -> dict[str, Any]:
    return _metrics_cache.get(text)


def _round(r: tuple[Any, ...]) -> RoundRecord:
    return RoundRecord(r[0], r[1], r[2], r[3], r[4], r[5], dict(_metrics(r[6])), r[7], r[8],
                       r[9])


def _job(row: tuple[Any, ...]) -> Job:
    return Job(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[9] or "")
