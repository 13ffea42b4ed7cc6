"""The hospital daemon's allocator policy (fl_client.connection.keep_transfer_buffers):
a run of message-sized buffers taken and freed again, as a transfer's read-ahead and
sealed chunks are, reuses the same pages instead of handing them back to the system
and faulting them in again; a model-sized tensor still leaves the process when freed."""

from __future__ import annotations

import ctypes
import mmap
import resource
import threading
from pathlib import Path

import pytest
import torch

from fl_client.connection import keep_transfer_buffers
from fl_core.allocator import fix_mmap_threshold, fix_trim_threshold
from fl_core.constants import (
    CLIENT_TRIM_THRESHOLD_BYTES,
    SERVER_MMAP_THRESHOLD_BYTES,
    SERVER_TRIM_THRESHOLD_BYTES,
)

MiB = 1 << 20
WINDOW = 16  # buffers alive at once: more than the server's trim threshold keeps
CYCLES = 10


def _window_faults() -> int:
    """Minor faults of a fresh thread that, CYCLES times, takes WINDOW 1 MiB buffers,
    writes them and frees them all, after one cycle to set its heap up."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults: list[int] = []

    def cycle() -> None:
        buffers = [libc.malloc(MiB) for _ in range(WINDOW)]
        for address in buffers:
            ctypes.memset(address, 1, MiB)
        for address in buffers:
            libc.free(address)

    def churn() -> None:
        cycle()
        start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(CYCLES):
            cycle()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)

    worker = threading.Thread(target=churn)
    worker.start()
    worker.join(60)
    assert faults, "the worker did not finish"
    return faults[0]


def test_a_window_of_freed_message_buffers_is_reused_without_faulting_in_again() -> None:
    assert WINDOW * MiB > SERVER_TRIM_THRESHOLD_BYTES
    assert WINDOW * MiB < CLIENT_TRIM_THRESHOLD_BYTES
    pages_per_cycle = WINDOW * MiB // mmap.PAGESIZE
    server_policy = (SERVER_MMAP_THRESHOLD_BYTES, SERVER_TRIM_THRESHOLD_BYTES)
    try:
        # the server's policy for contrast (glibc's dynamic one, which the daemon had,
        # cannot be restored once set): its trim threshold hands a freed window back
        # and the next cycle faults it in again
        if not fix_mmap_threshold(server_policy[0]) or not fix_trim_threshold(server_policy[1]):
            pytest.skip("not glibc")
        before = _window_faults()
        assert keep_transfer_buffers()
        after = _window_faults()
    finally:  # the server's policy, as the server's tests in this process expect
        fix_mmap_threshold(server_policy[0])
        fix_trim_threshold(server_policy[1])
    assert before > CYCLES * pages_per_cycle // 2, before  # the contrast is real here
    assert after < pages_per_cycle, (before, after)  # under one window in ten cycles


def test_a_freed_model_sized_tensor_still_leaves_the_process() -> None:
    if not keep_transfer_buffers():
        pytest.skip("not glibc")

    def rss_anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssAnon in /proc/self/status")

    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(3):
                kept = [torch.ones(4 * MiB) for _ in range(4)]  # 16 MiB each
                del kept
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    before = rss_anon()
    workers = [threading.Thread(target=churn) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors
    assert rss_anon() - before < 16 * MiB
