"""Who is connected: sessions (keys and tokens) and each client's task feed.

A client's pending task lives here, not in its stream, so a client that drops and
reconnects is sent the same task again; only the newest task stream of a client is
served, older ones end as soon as they notice they were superseded.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fl_core.constants import MAX_UNSENT_STOPS, SESSION_TAKEOVER_GRACE_S
from fl_proto import coordinator_pb2 as cpb
from fl_server.idle import Idle


class SessionConflict(Exception):
    """A second live session for an identity whose task stream is still open."""

    def __init__(self, client_id: str, peer: str, since: float) -> None:
        age = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        super().__init__(
            f"{client_id} already has a live session from {peer or 'an unknown address'}"
            f" (its task stream open since {age}); a second daemon with the same identity is"
            " refused: stop the other one, or start this one with --replace_session")
        self.client_id = client_id
        self.peer = peer


@dataclass(slots=True)
class Session:
    session_id: str
    client_id: str
    secret: bytes
    created: float


@dataclass(slots=True)
class ClientEntry:
    client_id: str
    num_examples: int = 0
    last_seen: float = 0.0
    stream_generation: int = 0
    streams_open: int = 0
    pending: cpb.Task | None = None
    epsilon_total: float = 0.0
    epsilon_budget: float = 0.0
    last_status: str = ""
    last_reason: str = ""
    stream_peer: str = ""
    stream_since: float = 0.0
    # the digest algorithm of the model manifests this hospital is sent: SHA-256 unless
    # its Join declared a faster one this server has (tensors.proto Digest)
    digest: int = 0
    # model type -> training examples, for each study the hospital serves (issue 15);
    # empty for a client that declared only one (its num_examples above)
    studies: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    # A job's STOP not yet sent on any stream: the next job's first task replaces
    # `pending` at once, and must not swallow the STOP that carries the final model.
    unsent_stops: list[cpb.Task] = field(default_factory=list, repr=False)
    # The waits of this client's task streams (see fl_server/idle.py): woken when its
    # task changes or a newer stream replaces them.
    idle: list[Idle] = field(default_factory=list, repr=False, compare=False)


class ClientRegistry:
    """Thread-safe registry; the round engine and the gRPC handlers share it.

    One lock guards everything. Waiters on `_lock` itself are those interested in
    who is connected (the round engine). A client's task stream does not wait on a
    thread at all: it yields an `Idle` registered on its own entry, so handing one
    client a task wakes that one stream, not every connected client's (with N
    connected a round assigning k tasks would otherwise cost k x N wake-ups), and an
    idle connected client holds no thread (fl_server/serving.py).
    """

    MAX_SESSIONS_PER_CLIENT = 4

    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._clients: dict[str, ClientEntry] = {}
        self._closed = False
        self._model_type = ""  # the running job's: selection counts only its hospitals
        # (connected, connected and serving the model type), both sorted; None once a
        # stream opens or closes, a Join changes studies or the job's model type moves.
        # Every round's selection read them off all entries: 3.5 ms a round at 5,000
        # connected hospitals, on the round's critical path (issue 16 item 4).
        self._views: tuple[list[str], list[str]] | None = None

    def set_model_type(self, model_type: str) -> None:
        """The job now running trains `model_type`: only hospitals serving it are
        waited for and selected, and their example count is that study's."""
        with self._lock:
            self._model_type = model_type
            self._views = None
            self._lock.notify_all()

    def _serves(self, entry: ClientEntry) -> bool:
        return not self._model_type or not entry.studies or self._model_type in entry.studies

    def _connected_views(self) -> tuple[list[str], list[str]]:
        """(connected, connected and serving the job's model type), sorted; computed
        once per change (call with the lock held; callers copy before handing out)."""
        if self._views is None:
            connected = sorted(c.client_id for c in self._clients.values() if c.streams_open > 0)
            clients = self._clients
            self._views = (connected, [cid for cid in connected if self._serves(clients[cid])])
        return self._views

    def _entry(self, client_id: str) -> ClientEntry:
        """The client's entry, created if new (call with the lock held)."""
        entry = self._clients.get(client_id)
        if entry is None:
            entry = self._clients[client_id] = ClientEntry(client_id)
        return entry

    @staticmethod
    def _wake_streams(entry: ClientEntry) -> None:
        """Wake the client's waiting task streams (call with the lock held)."""
        waiting, entry.idle = entry.idle, []
        for idle in waiting:
            idle.wake()

    def _wake_all(self) -> None:
        """Wake every waiter, task streams included (call with the lock held)."""
        self._lock.notify_all()
        for entry in self._clients.values():
            self._wake_streams(entry)

    # sessions -----------------------------------------------------------------
    def new_session(self, client_id: str, secret: bytes, num_examples: int,
                    session_id: str | None = None, *, previous_session_id: str = "",
                    replace: bool = False, grace_s: float = SESSION_TAKEOVER_GRACE_S,
                    epsilon_budget: float = 0.0,
                    studies: dict[str, int] | None = None, digest: int = 0) -> Session:
        """A new session for `client_id`, refused (SessionConflict) while another process
        of the same identity holds a live task stream.

        A renewal (the caller names a session it already holds) always passes. A fresh
        Join waits up to `grace_s` for a stream whose connection died (a killed daemon
        restarted at once) to notice; `replace` displaces a live one by the operator's
        choice. A fresh Join also drops the identity's older sessions, so of two daemons
        started with one identity the displaced one cannot quietly come back.
        """
        session = Session(session_id or uuid.uuid4().hex, client_id, secret, time.time())
        with self._lock:
            entry = self._entry(client_id)
            renewal = bool(previous_session_id) and previous_session_id in entry.sessions
            if not renewal:
                if entry.streams_open > 0 and replace:
                    entry.stream_generation += 1  # the live stream ends at its next check
                    self._wake_streams(entry)
                deadline = time.monotonic() + (0.0 if replace else grace_s)
                while entry.streams_open > 0 and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(timeout=min(remaining, 0.25))
                if entry.streams_open > 0 and not replace:
                    raise SessionConflict(client_id, entry.stream_peer, entry.stream_since)
                entry.sessions.clear()
            if epsilon_budget:
                entry.epsilon_budget = epsilon_budget
            entry.num_examples = num_examples
            entry.studies = dict(studies or {})
            self._views = None
            entry.digest = digest
            entry.last_seen = time.time()
            entry.sessions[session.session_id] = session
            while len(entry.sessions) > self.MAX_SESSIONS_PER_CLIENT:
                oldest = min(entry.sessions.values(), key=lambda s: s.created)
                del entry.sessions[oldest.session_id]
            self._lock.notify_all()
        return session

    def session(self, client_id: str, session_id: str | None) -> Session | None:
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is None or session_id is None:
                return None
            return entry.sessions.get(session_id)

    def touch(self, client_id: str) -> None:
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is not None:
                entry.last_seen = time.time()

    # task feed ----------------------------------------------------------------
    @staticmethod
    def _set_pending(entry: ClientEntry, task: cpb.Task | None) -> None:
        """Call with the lock held. A STOP is also kept until a stream has sent it."""
        entry.pending = task
        if task is not None and task.kind == cpb.STOP:
            kept = [t for t in entry.unsent_stops if t.job_id != task.job_id]
            entry.unsent_stops = [*kept, task][-MAX_UNSENT_STOPS:]

    def assign(self, client_id: str, task: cpb.Task | None) -> None:
        with self._lock:
            entry = self._entry(client_id)
            self._set_pending(entry, task)
            self._wake_streams(entry)

    def clear_task(self, client_id: str, task_id: str) -> None:
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is not None and entry.pending is not None and entry.pending.task_id == task_id:
                entry.pending = None

    def pending_task(self, client_id: str) -> cpb.Task | None:
        with self._lock:
            entry = self._clients.get(client_id)
            return entry.pending if entry else None

    def broadcast(self, task_factory: Callable[[str], cpb.Task | None]) -> None:
        with self._lock:
            for entry in self._clients.values():
                self._set_pending(entry, task_factory(entry.client_id))
            self._wake_all()

    def task_stream(self, client_id: str, heartbeat_s: float,
                    is_active: Callable[[], bool], peer: str = "") -> Iterator[cpb.Task | Idle]:
        """Yields the client's pending task whenever it changes, heartbeats between,
        and an `Idle` whenever there is nothing to send yet (the caller waits on it:
        the serving bridge without a thread, a plain caller with `Idle.block`).

        `is_active` is checked after every wait; whoever ends the call, or revokes
        the client's certificate, wakes the stream (`wake_client`, `wake`)."""
        with self._lock:
            entry = self._entry(client_id)
            entry.stream_generation += 1
            entry.streams_open += 1
            self._views = None
            entry.stream_peer = peer
            entry.stream_since = time.time()
            generation = entry.stream_generation
            self._lock.notify_all()  # one more connected client
            self._wake_streams(entry)  # an older stream of this client ends
        sent_id = ""
        last_yield = time.monotonic()
        pending: cpb.Task | None
        try:
            while True:
                idle: Idle | None = None
                with self._lock:
                    if self._closed or entry.stream_generation != generation:
                        return
                    if entry.unsent_stops:
                        pending = entry.unsent_stops.pop(0)
                    else:
                        pending = entry.pending
                        if pending is None or pending.task_id == sent_id:
                            wait = heartbeat_s - (time.monotonic() - last_yield)
                            pending = None
                            if wait > 0:
                                idle = Idle(wait)
                                entry.idle.append(idle)
                    if idle is None:
                        entry.last_seen = time.time()
                if idle is not None:
                    yield idle
                    with self._lock:
                        if idle in entry.idle:
                            entry.idle.remove(idle)
                    if not is_active():
                        return
                    continue
                if pending is None:
                    yield cpb.Task(kind=cpb.HEARTBEAT)
                else:
                    # A STOP no longer ends the stream: a hospital daemon that serves
                    # several studies waits on it for the next job (one that exits on
                    # STOP cancels the call itself).
                    sent_id = pending.task_id
                    yield pending
                last_yield = time.monotonic()
        finally:
            with self._lock:
                entry.streams_open -= 1
                self._views = None
                entry.last_seen = time.time()
                self._lock.notify_all()

    def wake_client(self, client_id: str) -> None:
        """Wake one client's task streams (its call ended, so it re-checks)."""
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is not None:
                self._wake_streams(entry)

    # views ----------------------------------------------------------------------
    def connected(self) -> list[str]:
        with self._lock:
            return list(self._connected_views()[0])

    def wait_for_connected(self, minimum: int, timeout_s: float,
                           stop: threading.Event) -> list[str]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                ready = list(self._connected_views()[1])
                remaining = deadline - time.monotonic()
                if len(ready) >= minimum or remaining <= 0 or stop.is_set():
                    return ready
                self._lock.wait(timeout=min(remaining, 0.5))

    def entries(self) -> list[ClientEntry]:
        with self._lock:
            return [ClientEntry(**{k: getattr(c, k) for k in (
                "client_id", "num_examples", "last_seen", "stream_generation", "streams_open",
                "pending", "epsilon_total", "epsilon_budget", "last_status", "last_reason",
                "stream_peer", "stream_since", "studies")}) for c in self._clients.values()]

    def note_report(self, client_id: str, status: str, epsilon_total: float | None,
                    reason: str = "") -> None:
        with self._lock:
            entry = self._entry(client_id)
            entry.last_status = status
            entry.last_reason = reason
            if epsilon_total is not None:
                entry.epsilon_total = epsilon_total

    def digest_of(self, client_id: str) -> int:
        """The digest algorithm of the manifests `client_id` checks (0: SHA-256)."""
        with self._lock:
            entry = self._clients.get(client_id)
            return entry.digest if entry is not None else 0

    def num_examples(self, client_id: str) -> int:
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is None:
                return 0
            return entry.studies.get(self._model_type, entry.num_examples)

    def wake(self) -> None:
        """Wake every waiting task stream so each re-checks whether its call is alive."""
        with self._lock:
            self._wake_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake_all()

