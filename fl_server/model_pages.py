"""The global model read from its checkpoint file instead of held in anonymous memory.

Why (issue 16 item 3): during a round the server holds the global model (downloads
read it, the new model is built on it) and FedAvg's running sums, two models of
anonymous memory, plus the transfers. Once a model's checkpoint is written and
fsynced, its bytes are on disk; mapping that file read-only and serving the model
from the mapping makes the global model page cache, which the kernel can reclaim,
and whose pages a reader drops once it has passed them (`release`), so the server's
resident memory is about one model plus what is in flight, not two.

The mapping is read-only and shared: a write to the model through it faults (the
global model is never changed in place; a new one replaces it), and dropping pages
is always safe (they are read again from the page cache, never lost).

The checkpoint is a safetensors file (fl_server/store.py writes it with the
safetensors library); this reads its documented layout (an 8-byte little-endian
header length, a JSON header of dtypes, shapes and data offsets, then the data) to
map it without copying, and checks every tensor against the model's manifest.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import warnings
from pathlib import Path

import torch

from fl_core.tensor_codec import dtype_from_proto
from fl_proto import tensors_pb2

_PAGE = mmap.PAGESIZE
_HEADER_MAX = 100 << 20  # a header larger than this is not one we wrote
# safetensors' dtype names for the dtypes a manifest carries
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class MappedModelError(ValueError):
    """The checkpoint does not hold the model it should (the caller keeps its copy)."""


class MappedModel:
    """A model's tensors as read-only views of its checkpoint file, in manifest order."""

    def __init__(self, path: Path, prefix: str, manifest: tensors_pb2.TensorManifest) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise MappedModelError(f"checkpoint {path} is too short")
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        header_len = int.from_bytes(self._map[:8], "little")
        if not 0 < header_len <= min(_HEADER_MAX, size - 8):
            raise MappedModelError(f"checkpoint {path} has a bad header length")
        try:
            header = json.loads(self._map[8 : 8 + header_len])
        except (UnicodeDecodeError, ValueError):
            raise MappedModelError(f"checkpoint {path} has no readable header") from None
        if not isinstance(header, dict):
            raise MappedModelError(f"checkpoint {path} has no readable header")
        base = 8 + header_len
        self.state: dict[str, torch.Tensor] = {}
        self._spans: list[tuple[int, int]] = []  # per tensor, manifest order: file [lo, hi)
        self._ends: list[int] = []  # per tensor: where its bytes end in the model's stream
        self._index: dict[str, int] = {}  # name -> its place in _spans and _ends
        stream = 0
        for spec in manifest.tensors:
            entry = header.get(prefix + spec.name)
            dtype = dtype_from_proto(spec.dtype, spec.name)
            if not isinstance(entry, dict) or _DTYPES.get(str(entry.get("dtype"))) != dtype \
                    or list(entry.get("shape", ())) != list(spec.shape):
                raise MappedModelError(
                    f"checkpoint {path}: tensor {spec.name!r} is not the model's")
            try:
                lo, hi = (base + int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MappedModelError(
                    f"checkpoint {path}: tensor {spec.name!r} has no data offsets") from None
            if hi - lo != spec.byte_length or not base <= lo <= hi <= size:
                raise MappedModelError(
                    f"checkpoint {path}: tensor {spec.name!r} has the wrong length")
            self.state[spec.name] = self._view(lo, spec.byte_length, dtype, tuple(spec.shape))
            self._index[spec.name] = len(self._spans)
            self._spans.append((lo, hi))
            stream += spec.byte_length
            self._ends.append(stream)

    def _view(self, offset: int, length: int, dtype: torch.dtype,
              shape: tuple[int, ...]) -> torch.Tensor:
        if length == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            # read-only on purpose: nothing writes the global model in place
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=length, offset=offset)
        return raw.view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor `name` (a reader has passed it)."""
        self._drop(*self._spans[self._index[name]])

    def release_stream(self, lo: int, hi: int) -> None:
        """Drop the pages of every tensor whose bytes end in (lo, hi] of the model's
        stream (manifest order): a download has just sent them."""
        first = bisect.bisect_right(self._ends, lo)
        for index in range(first, len(self._ends)):
            if self._ends[index] > hi:
                break
            self._drop(*self._spans[index])

    def release_all(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)

    def _drop(self, lo: int, hi: int) -> None:
        start = lo - lo % _PAGE
        end = min(-(-hi // _PAGE) * _PAGE, len(self._map))
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
