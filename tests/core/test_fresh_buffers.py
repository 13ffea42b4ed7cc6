"""Where fresh buffers written whole land. A received stream: a small one in a heap
buffer, a large one in an anonymous mapping committed at once, and from
HUGE_PAGE_MIN_BYTES one advised for transparent huge pages (committing 100 MB in 4 KiB
pages cost 60 ms of CPU on every download of a large model); where the advice cannot
be given the mapping is committed as before. A round's running sums: the same
mapping from that size, given back with the sum."""

from __future__ import annotations

import ctypes
import mmap
import re
from pathlib import Path

import pytest
import torch

from fl_core import tensor_codec as tc
from fl_core.allocator import MADV_POPULATE_WRITE
from fl_core.constants import HEAP_STREAM_MAX_BYTES, HUGE_PAGE_MIN_BYTES

linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(),
                                reason="needs /proc/self/smaps (Linux)")


def smaps_at(address: int) -> tuple[str, dict[str, str]]:
    """The address range and smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    found = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            if found:
                break
            if int(span.group(1), 16) <= address < int(span.group(2), 16):
                found = line.split()[0]
        elif found:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    assert found, f"no mapping holds {address:#x}"
    return found, fields


def mapping_of(buffer: mmap.mmap) -> dict[str, str]:
    """The smaps fields of the mapping that holds `buffer`."""
    return smaps_at(ctypes.addressof(ctypes.c_char.from_buffer(buffer)))[1]


def kib(value: str) -> int:
    return int(value.split()[0])


def test_a_small_stream_lands_on_the_heap() -> None:
    assert isinstance(tc._anonymous_buffer(HEAP_STREAM_MAX_BYTES), bytearray)


@linux_only
def test_a_large_stream_is_committed_in_a_mapping_advised_for_huge_pages() -> None:
    size = HUGE_PAGE_MIN_BYTES * 2 + 12345
    buffer = tc._anonymous_buffer(size)
    try:
        assert isinstance(buffer, mmap.mmap) and len(buffer) == size
        fields = mapping_of(buffer)
        assert "hg" in fields["VmFlags"].split()  # MADV_HUGEPAGE given
        assert kib(fields["Rss"]) * 1024 >= size  # committed before any chunk lands
        assert buffer[:16] == bytes(16) and buffer[-16:] == bytes(16)
        view = torch.frombuffer(buffer, dtype=torch.uint8)
        view.fill_(7)  # writable, private
        assert buffer[size // 2] == 7
        del view
    finally:
        buffer.close()


@linux_only
def test_below_the_huge_page_size_the_mapping_is_committed_without_the_advice() -> None:
    buffer = tc._anonymous_buffer(HUGE_PAGE_MIN_BYTES - mmap.PAGESIZE)
    try:
        fields = mapping_of(buffer)
        assert "hg" not in fields["VmFlags"].split()
        assert kib(fields["Rss"]) * 1024 >= len(buffer)
    finally:
        buffer.close()


@linux_only
def test_without_the_advice_a_large_stream_is_committed_as_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 5.14 refuses MADV_POPULATE_WRITE (EINVAL): the mapping it made
    is closed and the stream gets a populated mapping of 4 KiB pages."""
    given: list[int] = []

    class OldKernel(mmap.mmap):
        def madvise(self, option: int, *args: int) -> None:
            given.append(option)
            if option == MADV_POPULATE_WRITE:
                raise OSError(22, "Invalid argument")
            super().madvise(option, *args)

    monkeypatch.setattr(tc.mmap, "mmap", OldKernel)
    buffer = tc._anonymous_buffer(HUGE_PAGE_MIN_BYTES)
    try:
        assert given == [mmap.MADV_HUGEPAGE, MADV_POPULATE_WRITE]
        fields = mapping_of(buffer)
        assert "hg" not in fields["VmFlags"].split()
        assert kib(fields["Rss"]) * 1024 >= len(buffer)
    finally:
        buffer.close()


def mapped_ranges() -> set[str]:
    return {line.split()[0] for line in Path("/proc/self/maps").read_text().splitlines()}


@linux_only
def test_a_large_rounds_sums_live_in_huge_pages_and_leave_with_the_sum() -> None:
    from fl_server.strategies import make_strategy

    rows = HUGE_PAGE_MIN_BYTES // 4 // 1024 + 1
    gen = torch.Generator().manual_seed(1)
    model = {"big": torch.zeros(rows, 1024), "small": torch.zeros(8)}
    deltas = [{"big": torch.randn(rows, 1024, generator=gen),
               "small": torch.randn(8, generator=gen)} for _ in range(2)]
    strategy = make_strategy("fedavg")
    strategy.begin_round(model)
    strategy.accept("a", deltas[0], 10)
    strategy.accept("b", deltas[1], 30)
    new = strategy.finish_round()
    for name in ("big", "small"):
        expected = (deltas[0][name] * 10 + deltas[1][name] * 30) / 40
        assert torch.allclose(new[name], expected, atol=1e-6)
    span, fields = smaps_at(new["big"].data_ptr())
    assert "hg" in fields["VmFlags"].split()
    assert "hg" not in smaps_at(new["small"].data_ptr())[1]["VmFlags"].split()
    del new
    assert span not in mapped_ranges()  # unmapped with the last reference
