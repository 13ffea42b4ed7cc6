"""What the server and the simulation ask of the C library about memory: glibc's mmap
threshold fixed, so large buffers are mapped on their own and given back to the system
when freed; a mapping's pages dropped once read (madvise MADV_DONTNEED); the heaps'
free pages handed back between rounds (malloc_trim).

By default glibc raises its mmap threshold to the size of every large block freed (up
to 32 MiB), so after the first model-sized buffer is freed every later one comes from
a per-thread heap that keeps the memory once it is freed, and small objects kept
between two such buffers pin the holes they leave. The server (fl_server/aggregator.py)
and the simulation's driver (fl_sim/engine.py) each fix the threshold at the size that
suits their buffers (fl_core/constants.py says which and why).

A fixed mmap threshold also freezes glibc's trim threshold at its initial 128 KiB: a
freed buffer above that size at the top of a thread's heap is handed back at once, and
the next one faults its pages in again and has them zeroed. The server raises it
(`fix_trim_threshold`) and gives its heaps back between rounds instead."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

_M_TRIM_THRESHOLD = -1  # mallopt()'s parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)
_madvise: Any = None  # libc's madvise once looked up; False where there is none


def _mallopt(parameter: int, value: int) -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc: its allocator has its own policy
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(parameter, value))


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Allocations of at least ``threshold_bytes`` get their own mapping, whatever
    was freed before; True where it took effect (False without glibc)."""
    return _mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def fix_trim_threshold(threshold_bytes: int) -> bool:
    """A heap keeps up to ``threshold_bytes`` free at its top before handing pages back
    to the system; True where it took effect (False without glibc)."""
    return _mallopt(_M_TRIM_THRESHOLD, threshold_bytes)


def fix_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """`fix_mmap_threshold` and `fix_trim_threshold` together, as a process's policy;
    True where both took effect (False without glibc)."""
    fixed = fix_mmap_threshold(mmap_bytes)
    return fix_trim_threshold(trim_bytes) and fixed


def release_free_heap() -> bool:
    """Hand the free pages of every malloc heap back to the system (glibc's
    malloc_trim(0)): True where something was released. Memory freed by many threads
    stays in their heaps otherwise, resident, until reused."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False  # not glibc
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def _libc_madvise() -> Any:
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise or None


def can_drop_pages() -> bool:
    """True where `drop_pages` does something (else pages are simply kept)."""
    return _MADV_DONTNEED is not None and _libc_madvise() is not None


def drop_pages(address: int, length: int) -> None:
    """Drop the resident pages of [address, address + length) (page-aligned). Only for
    a clean file mapping nothing writes to: a later read maps the pages again from the
    page cache; on anonymous or written pages it would discard data. Advice: a failure
    costs memory only."""
    madvise = _libc_madvise()
    if madvise is not None and _MADV_DONTNEED is not None:
        madvise(address, length, _MADV_DONTNEED)
