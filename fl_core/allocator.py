"""glibc's mmap threshold, fixed: large buffers mapped on their own and given back to
the system when freed.

By default glibc raises its mmap threshold to the size of every large block freed (up
to 32 MiB), so after the first model-sized buffer is freed every later one comes from
a per-thread heap that keeps the memory once it is freed, and small objects kept
between two such buffers pin the holes they leave. The server (fl_server/aggregator.py)
and the simulation's driver (fl_sim/engine.py) each fix the threshold at the size that
suits their buffers (fl_core/constants.py says which and why)."""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # mallopt()'s parameter number (malloc.h)


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Allocations of at least ``threshold_bytes`` get their own mapping, whatever
    was freed before; True where it took effect (False without glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc: its allocator has its own policy
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
