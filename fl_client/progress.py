"""Progress for a person at a terminal, log lines for everyone else.

A hospital's engineer watching a client wants to see a download creep forward;
a service manager's journal wants one line per step, not carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("fl_client.progress")


class Progress:
    def __init__(self, label: str, total: int, unit: str = "", stream: TextIO | None = None,
                 min_interval_s: float = 0.2) -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._last = 0.0
        self._min_interval = min_interval_s if self.tty else 5.0
        self._started = time.monotonic()

    def update(self, done: int, note: str = "") -> None:
        self.done = min(done, self.total)
        now = time.monotonic()
        if now - self._last < self._min_interval and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total
        if self.tty:
            width = 28
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            self.stream.write(f"\r{self.label:<10} [{bar}] {frac:6.1%} {self.done}/{self.total}"
                              f"{self.unit} {note}   ")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info("%s %d/%d%s (%.0f%%) %s", self.label, self.done, self.total, self.unit,
                     frac * 100, note)

    def close(self) -> None:
        if self.done < self.total and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        elapsed = time.monotonic() - self._started
        log.debug("%s finished in %.2fs", self.label, elapsed)
