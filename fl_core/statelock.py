"""One daemon per state folder: an exclusive, advisory lock held for the process's life.

Two servers on one state folder would both write rounds into the same SQLite job;
two client daemons on one folder would charge the privacy ledger twice for a round.
The kernel drops a `flock` when its process dies (even by SIGKILL), so a crash never
leaves a stale lock behind that an operator has to delete by hand.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "daemon.lock"


class StateLockError(Exception):
    """The folder is held by another live process (or cannot be locked at all)."""


class StateLock:
    """`StateLock(folder, who).acquire()`; released by `release()` or process exit."""

    def __init__(self, folder: Path, who: str) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.who = who
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise StateLockError(f"state directory {self.folder} is not a directory (a file"
                                 " is in its place): move it away or choose another folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateLockError(f"cannot use state folder {self.folder}: {exc.strerror}"
                                 f" ({self.path})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StateLockError(
                f"state folder {self.folder} is in use by another {self.who}{holder}; stop"
                " it first, or give this one its own folder") from None
        except OSError as exc:
            os.close(fd)
            raise StateLockError(f"cannot lock {self.path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
