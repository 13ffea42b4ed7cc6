"""Rate-limited logging of refusals, per peer.

Every refused call used to write one log line, so one client refusing itself in a
loop could write hundreds of MiB an hour and bury what matters. A `RefusalLog`
writes at most `burst` lines per peer per `interval_s`; the lines it drops are
counted, and the next line written for that peer says how many were dropped
(``suppressed=N``), so nothing is lost from the totals, only repeated words.

Memory is bounded too: at most `max_peers` peers are tracked; when a flood comes from
more addresses than that, the extra ones share one bucket (``peer="*"``), so a scan
from many addresses costs one bucket, not one per address.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fl_core.constants import REFUSAL_LOG_BURST, REFUSAL_LOG_INTERVAL_S, REFUSAL_LOG_MAX_PEERS
from fl_core.logs import log_event

OVERFLOW_PEER = "*"


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0


class RefusalLog:
    """At most `burst` refusal lines per peer per `interval_s` (see module docstring)."""

    def __init__(self, logger: logging.Logger, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 burst: int = REFUSAL_LOG_BURST, max_peers: int = REFUSAL_LOG_MAX_PEERS,
                 clock: Any = time.monotonic) -> None:
        self._log = logger
        self.interval_s = interval_s
        self.burst = burst
        self.max_peers = max_peers
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, peer: str) -> int | None:
        """None when this line must be dropped, else how many lines for this peer were
        dropped since its last written one (0 usually)."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(peer)
            if window is None:
                if len(self._windows) >= self.max_peers:
                    self._expire(now)
                if len(self._windows) >= self.max_peers:
                    peer = OVERFLOW_PEER
                    window = self._windows.get(peer)
                if window is None:
                    window = self._windows[peer] = _Window(now)
            if now - window.start >= self.interval_s:
                window.start, window.written = now, 0
            if window.written >= self.burst:
                window.suppressed += 1
                return None
            window.written += 1
            dropped, window.suppressed = window.suppressed, 0
            return dropped

    def _expire(self, now: float) -> None:
        """Forget peers whose window is over and who have nothing left to report."""
        for key in [k for k, w in self._windows.items()
                    if now - w.start >= self.interval_s and not w.suppressed]:
            del self._windows[key]

    def event(self, peer: str, event: str, level: int = logging.WARNING,
              **fields: Any) -> bool:
        """Log `event` for `peer` unless its budget is spent; True when written."""
        dropped = self.admit(peer)
        if dropped is None:
            return False
        if dropped:
            fields["suppressed"] = dropped
        log_event(self._log, event, level, peer=peer, **fields)
        return True


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:127.0.0.1:5123" -> "127.0.0.1",
    "ipv6:[::1]:5123" -> "::1"): a client reconnecting gets a new port each time."""
    _, _, rest = peer.partition(":")
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    host, _, _ = rest.rpartition(":")
    return host or rest or peer
