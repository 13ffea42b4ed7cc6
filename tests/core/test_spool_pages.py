"""The server's memory in a round (issue 16 item 3): after each pass over a spooled
update the server drops the pages it read from the update's spool mapping, so a fold
keeps about one tensor of the update resident, and every value still reads back
from the file unchanged; freed model tensors leave the process; the new model's step
is measured a chunk at a time, with the new model's norm in the same pass."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import pytest
import torch

from fl_core import tensor_codec as tc
from fl_core.allocator import can_drop_pages, fix_trim_threshold
from fl_server.aggregator import _SpoolPages, return_freed_tensors_to_the_os
from fl_server.rounds import step_and_size
from fl_server.strategies import make_strategy
from tests.memory_probe import (
    anon_growth_after_freeing_model_tensors,
    libc_heap,
    rss,
    thread_minor_faults,
)

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not can_drop_pages(),
                                reason="no madvise(MADV_DONTNEED) here: pages are kept")


def rss_file() -> int:
    return rss()


def spooled(tmp_path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as the aggregator holds a finished upload: a mapping of its spool."""
    manifest = tc.build_manifest(state, chunk_size=MiB)
    asm = tc.StreamAssembler(manifest, spool_path=tmp_path / "u.spool")
    for seq, chunk in enumerate(tc.iter_chunks(state, manifest)):
        asm.add_chunk(seq, chunk)
    return asm.finish()


def update(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # 4 x 8 MiB, sizes that leave the tensors off page boundaries
    return {f"t{i}": torch.randn(2 * MiB + 3 * i + 1, generator=gen) for i in range(4)}


def test_released_pages_leave_rss_and_read_back(tmp_path: Path) -> None:
    original = update(1)
    tensors = spooled(tmp_path, original)
    pages = _SpoolPages(tensors)
    before = rss_file()
    sums = [float(t.sum()) for t in tensors.values()]  # every page of the update mapped
    resident = rss_file()
    assert resident - before > 24 * MiB
    for name in tensors:
        pages.release(name)
    assert rss_file() - before < 2 * MiB
    for name, t in tensors.items():  # mapped again from the file: the same values
        assert torch.equal(t, original[name])
    assert [float(t.sum()) for t in tensors.values()] == sums


def test_fedavg_fold_with_release_keeps_one_tensor_resident(tmp_path: Path) -> None:
    deltas = [update(2), update(3)]
    global_state = {name: torch.zeros_like(t) for name, t in deltas[0].items()}
    strategy = make_strategy("fedavg")
    strategy.begin_round(global_state)
    for i, delta in enumerate(deltas):
        tensors = spooled(tmp_path, delta)
        pages = _SpoolPages(tensors)
        before = rss_file()
        strategy.accept(f"h{i}", tensors, 1 + i, pages.release)
        # the checks and the fold read all 32 MiB; at most a page or two stays mapped
        assert rss_file() - before < 2 * MiB
        del tensors, pages
    result = strategy.finish_round()
    for name, t in result.items():
        expected = (deltas[0][name] + 2 * deltas[1][name]) / 3
        torch.testing.assert_close(t, expected)


def test_freed_model_tensors_leave_the_process() -> None:
    """With the server's mmap threshold, a model's worth of 16 MiB tensors freed on
    other threads (as a round frees its old model and sums) is given back to the OS
    instead of staying in glibc's per-thread heaps."""
    if not return_freed_tensors_to_the_os():
        pytest.skip("not glibc")
    assert anon_growth_after_freeing_model_tensors() < 16 * MiB


def test_freed_message_buffers_are_reused_without_faulting_their_pages_in_again() -> None:
    """With the server's allocator policy, a worker that takes and frees one chunk-sized
    buffer after another (every upload's and download's messages) reuses the same
    pages; with only the mmap threshold fixed, glibc's trim threshold stayed at 128 KiB
    and each freed buffer's pages went back to the system, to be faulted in and zeroed
    again by the next (~256 minor faults per 1 MiB buffer). glibc's own start value
    first: a process that has freed a large mapping already has a higher one."""
    if not fix_trim_threshold(128 << 10) or not return_freed_tensors_to_the_os():
        pytest.skip("not glibc")
    libc = libc_heap()
    buffers = 100

    def churn() -> None:
        for _ in range(buffers):
            address = libc.malloc(MiB)
            ctypes.memset(address, 1, MiB)
            libc.free(address)

    faults = thread_minor_faults(lambda: libc.free(libc.malloc(MiB)), churn)  # its heap, once
    pages_per_buffer = MiB // mmap.PAGESIZE
    assert faults < 10 * pages_per_buffer, faults  # ~1, not ~100, buffers


def test_step_and_size_match_float64_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fl_server.rounds.NORM_CHUNK_ELEMS", 64)  # tensors span chunks
    gen = torch.Generator().manual_seed(4)
    old = {"w": torch.randn(1000, generator=gen), "h": torch.randn(50, generator=gen).half(),
           "m": torch.randn(3, 70, generator=gen).double(), "steps": torch.tensor(3)}
    new = {"w": old["w"] + 0.1, "h": old["h"] - 0.5, "m": old["m"] * 2,
           "steps": torch.tensor(9)}
    floating = ("w", "h", "m")
    step = torch.cat([(new[n].double() - old[n].double()).reshape(-1) for n in floating])
    size = torch.cat([new[n].double().reshape(-1) for n in floating])
    released: list[str] = []
    got_step, got_size = step_and_size(new, old, released.append)
    assert got_step == pytest.approx(float(step.norm()), rel=1e-5)
    assert got_size == pytest.approx(float(size.norm()), rel=1e-5)
    assert released == list(floating)  # each old tensor let go once read, ints skipped
    # a difference beyond float32 (each side finite) is still measured, in float64
    huge = {"w": torch.full((2,), 3e38)}
    got_step, got_size = step_and_size(huge, {"w": -huge["w"]})
    assert got_step == pytest.approx(6e38 * 2 ** 0.5, rel=1e-6)
    assert got_size == pytest.approx(3e38 * 2 ** 0.5, rel=1e-6)
