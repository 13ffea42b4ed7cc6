"""Receive buffers (fl_core/receive_buffers.py): the buffer a stream's tensors leave
when the last of them goes is the next same-sized stream's, already resident; a buffer
anything still reads is never handed out again, and at most one is kept."""

from __future__ import annotations

import mmap

import pytest
import torch

from fl_core import tensor_codec as tc
from fl_core.constants import HEAP_STREAM_MAX_BYTES
from fl_core.receive_buffers import RECEIVE_BUFFERS, ReceiveBuffers
from tests.memory_probe import MiB, thread_minor_faults


def model(seed: int) -> dict[str, torch.Tensor]:
    """Two tensors, 2 MiB in all: a stream above the heap's limit, so a mapped one."""
    gen = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(384, 1024, generator=gen), "b": torch.randn(128, 1024, generator=gen)}
    assert sum(t.numel() * t.element_size() for t in state.values()) > HEAP_STREAM_MAX_BYTES
    return state


def receive(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    manifest = tc.build_manifest(state, 256 * 1024)
    assembler = tc.StreamAssembler(manifest, expected=state)
    for sequence, chunk in enumerate(tc.iter_chunks(state, manifest)):
        assembler.add_chunk(sequence, chunk)
    return assembler.finish()


def address(tensors: dict[str, torch.Tensor]) -> int:
    return tensors["w"].untyped_storage().data_ptr()


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_the_last_streams_buffer_is_the_next_ones_and_holds_only_the_new_bytes() -> None:
    RECEIVE_BUFFERS.clear()
    reused = RECEIVE_BUFFERS.reused
    first = receive(model(1))
    where = address(first)
    assert RECEIVE_BUFFERS.spare_bytes == 0  # in use
    del first
    size = RECEIVE_BUFFERS.spare_bytes
    assert size == sum(t.numel() * 4 for t in model(1).values())

    second = receive(model(2))
    assert address(second) == where
    assert RECEIVE_BUFFERS.reused == reused + 1
    assert_equal(second, model(2))


def test_a_buffer_anything_still_reads_is_never_handed_out_again() -> None:
    RECEIVE_BUFFERS.clear()
    kept = receive(model(1))
    view = kept["b"][3:5]  # a view of a view: it too holds the buffer
    del kept
    second = receive(model(2))
    third = receive(model(3))
    assert address(second) != view.untyped_storage().data_ptr()
    assert torch.equal(view, model(1)["b"][3:5])  # untouched by the streams after it
    assert_equal(second, model(2))
    assert_equal(third, model(3))


def test_a_stream_that_fails_gives_its_buffer_back_and_the_next_overwrites_all_of_it() -> None:
    RECEIVE_BUFFERS.clear()
    state = model(1)
    manifest = tc.build_manifest(state, 256 * 1024)
    assembler = tc.StreamAssembler(manifest, expected=state)
    chunks = [bytes(c) for c in tc.iter_chunks(state, manifest)]
    for sequence, chunk in enumerate(chunks[:-1]):
        assembler.add_chunk(sequence, chunk)
    bad = bytearray(chunks[-1])
    bad[0] ^= 1
    assembler.add_chunk(len(chunks) - 1, bytes(bad))
    with pytest.raises(tc.IntegrityError):
        assembler.finish()
    assembler.close()
    del assembler
    assert RECEIVE_BUFFERS.spare_bytes == manifest.total_bytes

    other = model(2)
    assert_equal(receive(other), other)


def test_a_recycled_buffer_is_written_without_faulting_its_pages_in_again() -> None:
    pool = ReceiveBuffers()
    size = 8 * MiB
    pages = size // mmap.PAGESIZE

    def fill() -> None:
        torch.frombuffer(pool.take(size), dtype=torch.uint8).fill_(1)

    fresh = thread_minor_faults(lambda: None, fill)
    again = thread_minor_faults(lambda: None, fill)
    assert pool.reused == 1
    assert fresh >= pages // 2, fresh  # a fresh mapping's pages are faulted in
    assert again < pages // 20, again


def test_one_spare_at_most_none_above_the_limit_and_clear_lets_it_go() -> None:
    pool = ReceiveBuffers(max_spare_bytes=4 * MiB)
    small, middle = pool.take(2 * MiB), pool.take(3 * MiB)
    del small
    assert pool.spare_bytes == 2 * MiB
    del middle  # the later one freed replaces the earlier
    assert pool.spare_bytes == 3 * MiB
    large = pool.take(8 * MiB)
    del large
    assert pool.spare_bytes == 3 * MiB  # above the limit: not kept
    again = pool.take(2 * MiB)  # another size: a fresh one, the spare stays
    assert pool.reused == 0 and pool.spare_bytes == 3 * MiB
    del again
    pool.clear()
    assert pool.spare_bytes == 0
    with pytest.raises(ValueError, match="positive size"):
        pool.take(0)
