"""The hospital daemon's allocator policy (fl_client.connection.keep_transfer_buffers):
a run of message-sized buffers taken and freed again, as a transfer's read-ahead and
sealed chunks are, reuses the same pages instead of handing them back to the system
and faulting them in again; a model-sized tensor still leaves the process when freed."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from fl_client.connection import keep_transfer_buffers
from fl_core.allocator import fix_thresholds
from fl_core.constants import (
    CLIENT_TRIM_THRESHOLD_BYTES,
    SERVER_MMAP_THRESHOLD_BYTES,
    SERVER_TRIM_THRESHOLD_BYTES,
)
from tests.memory_probe import (
    MiB,
    anon_growth_after_freeing_model_tensors,
    libc_heap,
    thread_minor_faults,
)

WINDOW = 16  # buffers alive at once: more than the server's trim threshold keeps
CYCLES = 10


def _window_faults() -> int:
    """Minor faults of a fresh thread that, CYCLES times, takes WINDOW 1 MiB buffers,
    writes them and frees them all, after one cycle to set its heap up."""
    libc = libc_heap()

    def cycle() -> None:
        buffers = [libc.malloc(MiB) for _ in range(WINDOW)]
        for address in buffers:
            ctypes.memset(address, 1, MiB)
        for address in buffers:
            libc.free(address)

    def cycles() -> None:
        for _ in range(CYCLES):
            cycle()

    return thread_minor_faults(cycle, cycles)


def test_a_window_of_freed_message_buffers_is_reused_without_faulting_in_again() -> None:
    assert WINDOW * MiB > SERVER_TRIM_THRESHOLD_BYTES
    assert WINDOW * MiB < CLIENT_TRIM_THRESHOLD_BYTES
    pages_per_cycle = WINDOW * MiB // mmap.PAGESIZE
    server_policy = (SERVER_MMAP_THRESHOLD_BYTES, SERVER_TRIM_THRESHOLD_BYTES)
    try:
        # the server's policy for contrast (glibc's dynamic one, which the daemon had,
        # cannot be restored once set): its trim threshold hands a freed window back
        # and the next cycle faults it in again
        if not fix_thresholds(*server_policy):
            pytest.skip("not glibc")
        before = _window_faults()
        assert keep_transfer_buffers()
        after = _window_faults()
    finally:  # the server's policy, as the server's tests in this process expect
        fix_thresholds(*server_policy)
    assert before > CYCLES * pages_per_cycle // 2, before  # the contrast is real here
    assert after < pages_per_cycle, (before, after)  # under one window in ten cycles


def test_a_freed_model_sized_tensor_still_leaves_the_process() -> None:
    if not keep_transfer_buffers():
        pytest.skip("not glibc")
    assert anon_growth_after_freeing_model_tensors() < 16 * MiB
