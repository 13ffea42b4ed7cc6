"""What the allocator tests measure in this process: its resident memory, a fresh
thread's minor faults, glibc's malloc and free, and what a round's freed model
tensors leave behind (the server's and the hospital daemon's allocator policies)."""

from __future__ import annotations

import ctypes
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20


def rss(field: str = "RssFile") -> int:
    """A field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def libc_heap() -> Any:
    """glibc with malloc and free typed, to take and free buffers as C code does."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def thread_minor_faults(setup: Callable[[], None], work: Callable[[], None]) -> int:
    """Minor faults of `work` on a fresh thread, after `setup` on the same thread."""
    faults: list[int] = []

    def run() -> None:
        setup()
        start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        work()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    assert faults, "the worker did not finish"
    return faults[0]


def anon_growth_after_freeing_model_tensors() -> int:
    """RssAnon growth after three threads each take and free, three times, a model's
    worth of 16 MiB tensors (as a round frees its old model and sums)."""
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(3):
                kept = [torch.ones(4 * MiB) for _ in range(4)]
                del kept
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before = rss("RssAnon")
    workers = [threading.Thread(target=churn) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    return rss("RssAnon") - before
