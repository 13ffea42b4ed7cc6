"""The checkpoint writer: the same bytes as safetensors' own save_file, in pieces."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fl_core.constants import FILE_WRITE_PIECE_BYTES
from fl_server.checkpoint_file import write_tensors_file


def layout(path: Path) -> tuple[list[tuple[str, Any]], dict[str, str] | None, int, bytes]:
    """A file's tensor entries in order, its metadata, its header's length, its data.
    (safetensors writes the metadata's keys in a hash map's order, which varies.)"""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", None)
    return list(header.items()), metadata, n, raw[8 + n:]


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    big = FILE_WRITE_PIECE_BYTES * 2 // 4 + 3  # three pieces, the last one short
    state = {
        "model/fc.weight": torch.randn(big, generator=g),
        "model/fc.bias": torch.randn(7, generator=g),
        "b16": torch.randn(5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "c64": torch.randn(2, dtype=torch.complex64, generator=g),
        "i64": torch.arange(4, dtype=torch.int64),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(3, dtype=torch.int8),
        "u8": torch.arange(3, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "négatif/ü": torch.ones(2, 2),
    }
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            state[name] = torch.arange(3, dtype=torch.int32).to(getattr(torch, name))
    return state


@pytest.mark.parametrize("metadata", [None, {}, {"round": "3", "format": "fl-checkpoint/1"}])
def test_the_same_bytes_as_safetensors(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    state = every_dtype()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_tensors_file(state, str(ours), metadata=metadata)
    save_file(state, str(theirs), metadata=metadata)
    assert layout(ours) == layout(theirs)
    if not metadata:  # no keys to order: byte for byte
        assert ours.read_bytes() == theirs.read_bytes()
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == metadata
        for name, tensor in state.items():
            assert torch.equal(f.get_tensor(name), tensor), name


def test_written_in_pieces_through_short_writes(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    state = every_dtype()
    lengths: list[int] = []
    real_pwrite = os.pwrite

    def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
        lengths.append(len(data))
        return real_pwrite(fd, data[: max(1, len(data) - 1000)], offset)  # short

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    out = tmp_path / "ours.safetensors"
    write_tensors_file(state, str(out), metadata={"a": "b"})
    monkeypatch.undo()
    save_file(state, str(tmp_path / "theirs.safetensors"), metadata={"a": "b"})
    assert layout(out) == layout(tmp_path / "theirs.safetensors")
    assert max(lengths) == FILE_WRITE_PIECE_BYTES  # the big tensor, never more


def test_a_dtype_outside_the_table_is_written_by_safetensors(tmp_path: Path) -> None:
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    state = {"w": torch.randn(4, 4).to(f8), "b": torch.randn(4)}
    write_tensors_file(state, str(tmp_path / "ours.safetensors"))
    save_file(state, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == \
        (tmp_path / "theirs.safetensors").read_bytes()


def test_an_io_error_propagates_with_its_errno(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        write_tensors_file({"w": torch.ones(3)}, str(tmp_path / "x.safetensors"))
    assert caught.value.errno == 28


def test_a_write_that_moves_nothing_is_an_error_not_a_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(OSError, match="wrote nothing") as caught:
        write_tensors_file({"w": torch.ones(3)}, str(tmp_path / "x.safetensors"))
    assert caught.value.errno == errno.EIO
