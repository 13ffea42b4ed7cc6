"""Upload spool files kept, with their blocks and page cache, for the next uploads.

Why: a large upload is written into a spool file (`fl_core.tensor_codec.StreamAssembler`)
and the file used to be deleted once the update was folded. Every upload then wrote
into new page cache, which is fresh memory: on a virtual machine whose host takes freed
guest memory back, as these Firecracker guests do (`page_reporting`), the kernel's copy
into those pages cost up to five times the copy itself. `perf` put 29% of the server's
CPU in it during sealed 256 MiB uploads, and the same upload took 0.43-0.54 s into a
kept file against 0.55-1.42 s into a new one (issue 16 items 1 and 3). That is the
price of memory a guest fresh from boot has to get from its host; once its memory is
warm a new file costs no more. A file whose upload is done is therefore renamed into
this pool, and the next upload of its size overwrites it in place.

What a kept file must never do is change bytes something still reads. A finished
upload's tensors are a private mapping of its file, and a private mapping's pages that
nothing wrote still read the file. So a file given back with its mapping alive waits
until that mapping is gone (a `weakref.finalize` on it: every tensor over the mapping
keeps it alive) before any upload may take it. Only files whose assembler has finished
come here: an upload that is cancelled or refused mid-stream may still have a write in
flight, and its file is deleted as before.

The cost: up to SPOOL_POOL_MAX_FILES / SPOOL_POOL_MAX_BYTES of disk, kept only while
the file system has SPOOL_POOL_MIN_FREE_BYTES free besides room for two more such files
(a checkpoint must never fail for a kept spool), and their page cache while the system
has no better use for it (it is reclaimable, written back first). A kept file's pages
are dirty, so the kernel writes them back within its writeback interval (30 s by
default); a deleted spool's never reached the disk when the round ended sooner. The
disk full, `clear()` gives every kept file back. The server deletes all of them when
it stops and when it starts (`*.spool`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import weakref
from pathlib import Path

from fl_core.constants import SPOOL_POOL_MAX_BYTES, SPOOL_POOL_MAX_FILES, SPOOL_POOL_MIN_FREE_BYTES

log = logging.getLogger(__name__)


class SpoolPool:
    """Kept spool files in `directory`: taken by `claim`, returned by `give_back`.

    Thread-safe. The lock is re-entrant because a held file becomes free in a finalizer,
    which runs wherever the mapping's last reference goes, a garbage collection inside
    this class's own methods included.
    """

    def __init__(self, directory: Path, max_files: int = SPOOL_POOL_MAX_FILES,
                 max_bytes: int = SPOOL_POOL_MAX_BYTES,
                 min_free_bytes: int = SPOOL_POOL_MIN_FREE_BYTES) -> None:
        self._dir = directory
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._min_free = min_free_bytes
        self._lock = threading.RLock()
        # path -> size; dicts keep the order files came in, so the oldest go first
        self._free: dict[Path, int] = {}
        self._held: dict[Path, int] = {}  # given back, their mapping still alive
        self._names = itertools.count()
        self.reused = 0  # uploads written into a kept file

    def claim(self, path: Path, size: int) -> bool:
        """Move a free kept file of exactly `size` bytes to `path`, where a new upload's
        assembler will overwrite it in place. True when one was; False: the assembler
        creates the file as before."""
        with self._lock:
            kept = next((p for p, n in self._free.items() if n == size), None)
            if kept is None:
                return False
            del self._free[kept]
        try:
            os.replace(kept, path)
        except OSError as exc:
            log.warning("could not reuse the kept spool %s (%s): a new file is written", kept,
                        exc)
            with contextlib.suppress(OSError):
                kept.unlink()
            return False
        with self._lock:
            self.reused += 1
        return True

    def give_back(self, path: Path, size: int, mapping: object | None = None) -> None:
        """The upload spooled at `path` is done with its file, which nothing writes any
        more. It is renamed at once, so the name is free, and taken by a later upload
        once `mapping`, the spool's mapping its tensors read, is gone (None: nothing
        reads it). Deleted instead when keeping it would pass the pool's limits. A
        path that is no longer there (given back already) is left alone."""
        with self._lock:  # held throughout: two files given back at once both count
            kept = self._dir / f"pool-{next(self._names)}.spool"
            try:
                os.replace(path, kept)
            except FileNotFoundError:
                return
            except OSError as exc:
                log.warning("could not keep the spool %s (%s): deleted", path, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
                return
            if not (self._disk_has_room(size) and self._make_room(size)):
                with contextlib.suppress(OSError):
                    kept.unlink()
                return
            if mapping is None:
                self._free[kept] = size
                return
            self._held[kept] = size
        freed = weakref.finalize(mapping, self._mapping_gone, kept)
        freed.atexit = False  # the server sweeps its spools when it starts

    def _disk_has_room(self, size: int) -> bool:
        """The file system keeps `min_free_bytes` besides two more files of `size` with
        this one kept; False also where it cannot say."""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= self._min_free + 2 * size

    def _make_room(self, size: int) -> bool:
        """Delete the oldest free files until one more of `size` bytes fits (lock held);
        False when it cannot, held files and its own size counted."""
        if size > self._max_bytes or self._max_files < 1:
            return False
        while self._free and (self._count() >= self._max_files
                              or self._bytes() + size > self._max_bytes):
            oldest = next(iter(self._free))
            del self._free[oldest]
            with contextlib.suppress(OSError):
                oldest.unlink()
        return self._count() < self._max_files and self._bytes() + size <= self._max_bytes

    def _count(self) -> int:
        return len(self._free) + len(self._held)

    def _bytes(self) -> int:
        return sum(self._free.values()) + sum(self._held.values())

    def _mapping_gone(self, kept: Path) -> None:
        with self._lock:
            size = self._held.pop(kept, None)
            if size is not None:
                self._free[kept] = size

    def clear(self) -> int:
        """Delete every kept file (a held one's mapping keeps its data until it goes);
        the number deleted. For a disk that filled up."""
        with self._lock:
            files = [*self._free, *self._held]
            self._free.clear()
            self._held.clear()
        for kept in files:
            with contextlib.suppress(OSError):
                kept.unlink()
        return len(files)

    @property
    def free_files(self) -> int:
        """Kept files an upload can take now."""
        with self._lock:
            return len(self._free)

    @property
    def held_files(self) -> int:
        """Kept files waiting for their mapping to go."""
        with self._lock:
            return len(self._held)
