"""Whole-stream receive buffers, the last one freed kept for the next stream of its size.

Why: a hospital receives the global model every round into one buffer the size of the
model (`fl_core.tensor_codec.StreamAssembler`), a fresh anonymous mapping. Freed, that
mapping went back to the system, and the next round faulted every page of a new one
in again: 25,600 pages per 100 MB. On a virtual machine whose host takes freed guest
memory back, as these Firecracker guests do, a fresh page costs microseconds (issue 16:
about 25,000 of a no-op hospital's 27,700 minor faults and ~10% of its CPU in a 100 MB
round). So the last buffer freed is kept, already resident, for the next stream of the
same size.

A buffer is handed out as a memoryview of its mapping, and only that view: a consumer
that keeps the stream's data (`torch.frombuffer` holds the view it was given, and every
tensor made from it holds its storage) keeps the view alive, so the mapping comes back
only once the last tensor over it is gone. Nothing that still reads it can see the next
stream's bytes. Views derived from the view (slices, `memoryview(view)`) do not keep it
alive: the assembler that owns the buffer keeps the view for as long as it uses them.

One spare at most, and none above RECEIVE_SPARE_MAX_BYTES: between rounds a hospital
holds one model's worth of memory more, the buffer its next download lands in. A buffer
of another size freed later replaces the spare, so a daemon that changes models does not
keep the old one's.
"""

from __future__ import annotations

import mmap
import threading
import weakref

from fl_core.constants import RECEIVE_SPARE_MAX_BYTES


def _populated(size: int) -> mmap.mmap:
    """A private anonymous mapping with its pages committed in one go (where the system
    offers MAP_POPULATE): about half the cost of faulting each page in as chunks land."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return mmap.mmap(-1, size)


class ReceiveBuffers:
    """Hands out populated anonymous buffers and keeps the last one freed as a spare.

    Thread-safe. The lock is re-entrant because a buffer is given back by a finalizer,
    which runs wherever its last reference goes, a garbage collection inside `take` on
    the same thread included.
    """

    def __init__(self, max_spare_bytes: int = RECEIVE_SPARE_MAX_BYTES) -> None:
        self._max_spare = max_spare_bytes
        self._lock = threading.RLock()
        self._spare: mmap.mmap | None = None
        self.reused = 0  # buffers handed out again rather than mapped afresh

    def take(self, size: int) -> memoryview:
        """A writable buffer of exactly `size` bytes (size > 0). A recycled one still holds
        the last stream's bytes: the caller must write every byte it exposes."""
        if size <= 0:
            raise ValueError(f"a receive buffer needs a positive size, not {size}")
        mapping: mmap.mmap | None = None
        with self._lock:
            if self._spare is not None and len(self._spare) == size:
                mapping, self._spare = self._spare, None
                self.reused += 1
        if mapping is None:
            mapping = _populated(size)
        view = memoryview(mapping)
        if size <= self._max_spare:
            back = weakref.finalize(view, self._give_back, mapping)
            back.atexit = False  # nothing to keep once the process is exiting
        return view

    def _give_back(self, mapping: mmap.mmap) -> None:
        with self._lock:
            self._spare = mapping  # any other spare is unmapped as it goes

    @property
    def spare_bytes(self) -> int:
        """Bytes held for the next stream (0 or one buffer's size)."""
        with self._lock:
            return len(self._spare) if self._spare is not None else 0

    def clear(self) -> None:
        """Let the spare go back to the system (a measurement that wants a cold fetch)."""
        with self._lock:
            self._spare = None


# The process's one pool: every in-memory stream above HEAP_STREAM_MAX_BYTES comes from it.
RECEIVE_BUFFERS = ReceiveBuffers()
