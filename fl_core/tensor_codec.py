"""State dict <-> manifest + plaintext chunks, and the receiving assembler.

The wire format is deliberately dumb: a manifest (name, dtype, shape, byte length,
SHA-256 per tensor, SHA-256 of the whole stream) followed by the tensors' raw
little-endian bytes concatenated in manifest order and cut into fixed-size chunks.
Nothing is ever unpickled, so a hostile peer can at worst send wrong numbers, and
the hashes catch accidental corruption (the seal catches deliberate tampering).

Memory is the other driver. The sender yields memoryview slices over each tensor's
own storage, so streaming a model never holds a second copy of it; the receiver
writes every chunk straight into one preallocated buffer (in memory or a spool file)
and hands back tensors that are views over that buffer.

Hashing dominates the cost (one pass per end; the whole-stream digest is taken over
the per-tensor digests). The manifest names its algorithm: SHA-256 (fl.v1's default)
or BLAKE3, 2-2.5x faster, which a sender uses only towards a peer that declared it
checks it (issue 16 item 1). Hashing runs off the thread that moves the bytes: both
hashes release the GIL, so a receiver's hashing overlaps its network and
decryption work (a multi-chunk stream's hashing runs, in order, on a small shared
pool), and a sender hashes tensors in parallel. A sender may also let the digests
trail the data (`digests_trail`: issue 16): it starts sending at once and hashes
while it sends, and the digests travel, authenticated, in the final sealed chunk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import mmap
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch

from fl_core.constants import (
    ASYNC_HASH_MIN_CHUNKS,
    CHUNK_SIZE,
    GCM_TAG_BYTES,
    HASH_THREADS,
    HEAP_STREAM_MAX_BYTES,
    MAX_MESSAGE_BYTES,
    PARALLEL_HASH_MIN_BYTES,
    SPOOL_SCRATCH_CHUNKS,
)
from fl_core.file_writes import pwrite_all
from fl_core.receive_buffers import RECEIVE_BUFFERS
from fl_proto import tensors_pb2

if TYPE_CHECKING:
    from fl_core.sealing import StreamOpener, WireChunk

__all__ = [
    "MAX_CHUNK_SIZE",
    "SUPPORTED_DTYPES",
    "CodecError",
    "IntegrityError",
    "ManifestInvalid",
    "ManifestMismatch",
    "StreamAssembler",
    "StreamOrderError",
    "TrailingDigests",
    "EXTRA_DIGESTS",
    "FAST_DIGEST",
    "build_manifest",
    "check_manifest",
    "digest_name",
    "digests_of_state",
    "dtype_from_proto",
    "dtype_itemsize",
    "dtype_to_proto",
    "fill_digests",
    "has_non_finite",
    "iter_chunks",
    "manifest_of_state",
    "preferred_digest",
    "validate_manifest",
]

# A chunk travels inside one gRPC message with a small envelope (stream id,
# sequence, GCM tag, oneof framing); 64 KiB of headroom keeps it under the limit.
MAX_CHUNK_SIZE = MAX_MESSAGE_BYTES - (64 << 10)

# Hash in large pieces: per-call overhead vanishes and hashlib drops the GIL.
_HASH_PIECE = 4 << 20

# The digest algorithms this build checks (TensorManifest.digest), and the one it
# sends towards a peer that checks it too. BLAKE3 runs on one thread per hash: the
# tensors of a model are already hashed in parallel, and a receiver's hashing is one
# of several stages sharing the cores.
# Each algorithm: (its name in messages, a new hash object).
_ALGORITHMS: dict[tensors_pb2.Digest, tuple[str, Callable[[], Any]]] = {
    tensors_pb2.SHA256: ("SHA-256", hashlib.sha256),
    tensors_pb2.BLAKE3: ("BLAKE3", lambda: blake3.blake3(max_threads=1)),
}
FAST_DIGEST: tensors_pb2.Digest = tensors_pb2.BLAKE3
# What a peer is told this build checks besides SHA-256 (Join's `digests`).
EXTRA_DIGESTS: tuple[tensors_pb2.Digest, ...] = tuple(
    d for d in _ALGORITHMS if d != tensors_pb2.SHA256)


def preferred_digest(peer_checks: Iterable[int]) -> tensors_pb2.Digest:
    """The digest to hash with towards a peer that declared `peer_checks` (besides
    SHA-256, which every fl.v1 peer checks): the fast one when it is among them."""
    return FAST_DIGEST if FAST_DIGEST in set(peer_checks) else tensors_pb2.SHA256


def digest_name(algorithm: int) -> str:
    known = _ALGORITHMS.get(algorithm)  # type: ignore[call-overload]
    return known[0] if known is not None else f"digest #{algorithm}"


def _new_hash(algorithm: int) -> Any:
    known = _ALGORITHMS.get(algorithm)  # type: ignore[call-overload]
    if known is None:
        raise ManifestInvalid(MANIFEST_INVALID, f"unknown digest algorithm {algorithm}",
                              "digest")
    return known[1]()


_DTYPES: dict[torch.dtype, tensors_pb2.DType] = {
    torch.float32: tensors_pb2.FLOAT32,
    torch.float16: tensors_pb2.FLOAT16,
    torch.bfloat16: tensors_pb2.BFLOAT16,
    torch.float64: tensors_pb2.FLOAT64,
    torch.int64: tensors_pb2.INT64,
    torch.int32: tensors_pb2.INT32,
    torch.int16: tensors_pb2.INT16,
    torch.int8: tensors_pb2.INT8,
    torch.uint8: tensors_pb2.UINT8,
    torch.bool: tensors_pb2.BOOL,
}
_TORCH_DTYPES: dict[int, torch.dtype] = {int(v): k for k, v in _DTYPES.items()}
_ITEMSIZE: dict[int, int] = {
    int(v): torch.empty((), dtype=k).element_size() for k, v in _DTYPES.items()
}

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPES)


# --------------------------------------------------------------------------- errors


class CodecError(Exception):
    """Base of every codec failure; `code` is machine-readable (it goes into the
    wire's ErrorDetail), `field` names the tensor or manifest field concerned.

    Codes: MANIFEST_MISMATCH, MANIFEST_INVALID (manifests); HASH_MISMATCH,
    STREAM_OVERSIZE, CHUNK_LENGTH, INCOMPLETE, BAD_VALUE (IntegrityError);
    OUT_OF_ORDER, FINISHED (StreamOrderError); UNSUPPORTED_DTYPE,
    UNSUPPORTED_TENSOR, SPOOL_INVALID, BAD_ARGUMENT (plain CodecError).
    """

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field


class ManifestMismatch(CodecError):
    """The manifest describes a different model than the one expected."""


class ManifestInvalid(CodecError):
    """The manifest contradicts itself (lengths, counts, hashes, names)."""


class IntegrityError(CodecError):
    """The bytes do not match the manifest: hashes, lengths, stream size."""


class StreamOrderError(CodecError):
    """A chunk arrived out of sequence or after the stream was finished."""


# Codes, so callers can match without string typos.
MANIFEST_MISMATCH = "MANIFEST_MISMATCH"
MANIFEST_INVALID = "MANIFEST_INVALID"
UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
UNSUPPORTED_TENSOR = "UNSUPPORTED_TENSOR"
HASH_MISMATCH = "HASH_MISMATCH"
STREAM_OVERSIZE = "STREAM_OVERSIZE"
CHUNK_LENGTH = "CHUNK_LENGTH"
INCOMPLETE = "INCOMPLETE"
BAD_VALUE = "BAD_VALUE"
OUT_OF_ORDER = "OUT_OF_ORDER"
FINISHED = "FINISHED"
SPOOL_INVALID = "SPOOL_INVALID"
BAD_ARGUMENT = "BAD_ARGUMENT"


def _require_little_endian() -> None:
    # The wire is little-endian and tensors are sent as their in-memory bytes.
    if sys.byteorder != "little":
        raise CodecError("UNSUPPORTED_PLATFORM", "tensor codec requires a little-endian host")


# --------------------------------------------------------------------------- dtypes


def dtype_to_proto(dtype: torch.dtype, name: str = "") -> tensors_pb2.DType:
    """The wire dtype for a torch dtype; anything else is refused, never coerced."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
        where = f"tensor {name!r} has " if name else ""
        raise CodecError(
            UNSUPPORTED_DTYPE, f"{where}dtype {dtype} (supported: {supported})", name
        ) from None


def dtype_from_proto(dtype: int, name: str = "") -> torch.dtype:
    """The torch dtype of a wire dtype (DTYPE_UNSPECIFIED and unknown values refused)."""
    try:
        return _TORCH_DTYPES[int(dtype)]
    except KeyError:
        where = f"tensor {name!r} has " if name else ""
        raise ManifestInvalid(
            MANIFEST_INVALID, f"{where}unknown wire dtype {int(dtype)}", name
        ) from None


def dtype_itemsize(dtype: int) -> int:
    """Bytes per element of a wire dtype."""
    dtype_from_proto(dtype)
    return _ITEMSIZE[int(dtype)]


def _dtype_name(dtype: int) -> str:
    try:
        return tensors_pb2.DType.Name(dtype)
    except ValueError:
        return str(int(dtype))


# --------------------------------------------------------------------------- sender


def _raw_bytes(name: str, tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat byte view over its own storage.

    Only a non-contiguous (or non-CPU) tensor is copied, and only that one tensor,
    so the caller never holds more than one extra tensor at a time.
    """
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(UNSUPPORTED_TENSOR, f"{name!r} is a {type(tensor).__name__}", name)
    if tensor.layout != torch.strided:
        raise CodecError(
            UNSUPPORTED_TENSOR, f"tensor {name!r} has layout {tensor.layout}; send it dense", name
        )
    dtype_to_proto(tensor.dtype, name)
    t = tensor.detach().resolve_neg()  # a lazily negated view's memory is not its value
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def stream_digest(tensor_digests: Iterable[bytes], algorithm: int = tensors_pb2.SHA256
                  ) -> bytes:
    """The whole-stream digest: over the per-tensor digests in stream order.

    Each tensor's digest already covers its bytes, so hashing the ordered list of
    digests binds every byte and the order with one pass over the data instead of
    two (the second pass over a 256 MiB model cost as much as sealing it).
    """
    root = _new_hash(algorithm)
    root.update(b"fl.v1 stream digests\0")
    for digest in tensor_digests:
        root.update(digest)
    return bytes(root.digest())


def _check_chunk_size(chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestInvalid(
            MANIFEST_INVALID,
            f"chunk_size {chunk_size} outside 1..{MAX_CHUNK_SIZE} "
            f"(MAX_MESSAGE_BYTES minus 64 KiB envelope)",
            "chunk_size",
        )


def _chunk_count(total_bytes: int, chunk_size: int) -> int:
    # An empty model still sends one (empty, final) chunk so the stream has an end.
    return max(1, math.ceil(total_bytes / chunk_size))


_pool_lock = threading.Lock()
_hash_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The process's hashing threads (shared: many streams, few cores). Its tasks
    never wait for one another, so a small pool cannot deadlock."""
    global _hash_pool
    with _pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=_hash_threads(),
                                            thread_name_prefix="fl-hash")
        return _hash_pool


def _hash_threads() -> int:
    return max(1, min(HASH_THREADS, os.cpu_count() or 1))


def _digest(raw: memoryview, algorithm: int) -> bytes:
    digest = _new_hash(algorithm)
    for start in range(0, len(raw), _HASH_PIECE):
        digest.update(raw[start : start + _HASH_PIECE])
    return bytes(digest.digest())


def _tensor_digest(algorithm: int, item: tuple[str, torch.Tensor]) -> bytes:
    return _digest(_raw_bytes(*item), algorithm)


def digests_of_state(state: Mapping[str, torch.Tensor],
                     algorithm: int = tensors_pb2.SHA256) -> list[bytes]:
    """Per-tensor digests in the state dict's order; tensors are hashed in parallel
    when the model is large enough for threads to pay (both hashes drop the GIL).

    Must not be called from a hashing-pool thread (it waits for pool tasks).
    """
    items = list(state.items())
    size = sum(t.numel() * t.element_size() for _, t in items if isinstance(t, torch.Tensor))
    one = functools.partial(_tensor_digest, algorithm)
    if len(items) > 1 and size >= PARALLEL_HASH_MIN_BYTES and _hash_threads() > 1:
        return list(_pool().map(one, items))
    return [one(item) for item in items]


def build_manifest(
    state: Mapping[str, torch.Tensor], chunk_size: int = CHUNK_SIZE, *, digests: bool = True,
    digest: tensors_pb2.Digest | int = tensors_pb2.SHA256,
) -> tensors_pb2.TensorManifest:
    """Describe `state` (in its own order) for the receiver: shapes, dtypes, hashes.

    With `digests=False` nothing is hashed: the manifest has `digests_trail` set and
    empty digests, for a sender that hashes while it sends (`digests_of_state` on
    its own thread) and puts the digests in the final chunk. `digest`: the algorithm
    (SHA-256, fl.v1's default, or FAST_DIGEST towards a peer that checks it).
    """
    _require_little_endian()
    _check_chunk_size(chunk_size)
    _new_hash(digest)  # an unknown algorithm fails here, before any work
    manifest = tensors_pb2.TensorManifest(chunk_size=chunk_size, digests_trail=not digests,
                                          digest=digest)  # type: ignore[arg-type]  # an int
    total = 0
    for name, tensor in state.items():
        if not isinstance(name, str) or not name:
            raise CodecError(UNSUPPORTED_TENSOR, f"tensor name {name!r} is not a non-empty str")
        # checks the tensor (dtype, layout) before any hashing; no copy when contiguous
        length = len(_raw_bytes(name, tensor))
        manifest.tensors.append(
            tensors_pb2.TensorSpec(
                name=name,
                dtype=_DTYPES[tensor.dtype],
                shape=list(tensor.shape),
                byte_length=length,
            )
        )
        total += length
    if digests:
        for spec, value in zip(manifest.tensors, digests_of_state(state, digest), strict=True):
            spec.sha256 = value
        manifest.sha256 = stream_digest((spec.sha256 for spec in manifest.tensors), digest)
    manifest.total_bytes = total
    manifest.chunk_count = _chunk_count(total, chunk_size)
    return manifest


class TrailingDigests:
    """A sender's digests for a `digests_trail` stream, hashed on their own thread
    while the chunks are sealed and sent; `trailer()` waits for them (the final
    chunk carries them). Not a pool task: it waits for the pool's per-tensor work.

    `overlap=False` (a stream of one chunk, whose only chunk is the final one and
    cannot leave before the digests) hashes in `trailer()` on the caller's thread:
    a thread there would overlap nothing and cost its start and a GIL hand-off on
    every small model's upload (issue 16 item 2).
    """

    def __init__(self, state: Mapping[str, torch.Tensor],
                 digest: int = tensors_pb2.SHA256, overlap: bool = True) -> None:
        self._state: Mapping[str, torch.Tensor] | None = state
        self._algorithm = digest
        self._digests: list[bytes] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if overlap:
            self._thread = threading.Thread(target=self._run, name="fl-digests", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            assert self._state is not None
            self._digests = digests_of_state(self._state, self._algorithm)
        except BaseException as exc:  # re-raised by trailer()
            self._error = exc
        finally:
            self._state = None

    def trailer(self, timeout_s: float = 600.0) -> bytes:
        if self._thread is None:
            if self._state is not None:  # not hashed yet (`_run` lets go of it)
                self._run()
        else:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise CodecError(INCOMPLETE, f"hashing the model took over {timeout_s:.0f} s")
        if self._error is not None:
            raise self._error
        assert self._digests is not None
        return b"".join(self._digests)


def fill_digests(manifest: tensors_pb2.TensorManifest, digests: bytes) -> None:
    """Put trailing digests (32 bytes per tensor, manifest order) into `manifest`:
    what a `digests_trail` manifest would have carried, stream digest included."""
    count = len(manifest.tensors)
    if len(digests) != count * 32:
        raise IntegrityError(
            HASH_MISMATCH,
            f"{len(digests)} bytes of trailing digests for {count} tensors (32 bytes each)",
            "tensor_digests",
        )
    for index, spec in enumerate(manifest.tensors):
        spec.sha256 = digests[index * 32 : index * 32 + 32]
    manifest.sha256 = stream_digest((spec.sha256 for spec in manifest.tensors), manifest.digest)


def manifest_of_state(
    state: Mapping[str, torch.Tensor], chunk_size: int = CHUNK_SIZE
) -> tensors_pb2.TensorManifest:
    """Alias of `build_manifest`, for call sites that read better with it."""
    return build_manifest(state, chunk_size)


def iter_chunks(
    state: Mapping[str, torch.Tensor], manifest: tensors_pb2.TensorManifest, start: int = 0
) -> Iterator[bytes | memoryview]:
    """The stream's plaintext chunks, in manifest order, `manifest.chunk_size` each.

    Chunks inside one tensor are memoryviews over its storage (valid as long as the
    tensor is not modified); only a chunk straddling tensors is joined into bytes.
    `start` resumes a transfer at that chunk without touching the bytes before it.
    """
    validate_manifest(manifest)
    check_manifest(manifest, state)
    if not 0 <= start <= manifest.chunk_count:
        raise CodecError(BAD_ARGUMENT, f"start {start} outside 0..{manifest.chunk_count}", "start")
    chunk_size = manifest.chunk_size
    skip = start * chunk_size
    pieces: list[memoryview] = []
    pending = 0
    for spec in manifest.tensors:
        if skip >= spec.byte_length:
            skip -= spec.byte_length
            continue
        raw = _raw_bytes(spec.name, state[spec.name])
        pos, skip = skip, 0
        while pos < len(raw):
            if pending == 0 and len(raw) - pos >= chunk_size:
                yield raw[pos : pos + chunk_size]
                pos += chunk_size
                continue
            take = min(chunk_size - pending, len(raw) - pos)
            pieces.append(raw[pos : pos + take])
            pending += take
            pos += take
            if pending == chunk_size:
                yield b"".join(pieces)
                pieces, pending = [], 0
    if pending or (manifest.total_bytes == 0 and start == 0):
        yield b"".join(pieces)


# --------------------------------------------------------------------------- manifests


def validate_manifest(
    manifest: tensors_pb2.TensorManifest, max_total_bytes: int | None = None
) -> None:
    """Refuse a manifest that contradicts itself, before any byte is accepted.

    A hostile header must not make the receiver allocate more than it says it
    will send, or compute offsets from numbers that do not add up.
    """

    def bad(message: str, field: str) -> ManifestInvalid:
        return ManifestInvalid(MANIFEST_INVALID, message, field)

    _check_chunk_size(manifest.chunk_size)
    _new_hash(manifest.digest)
    seen: set[str] = set()
    total = 0
    for index, spec in enumerate(manifest.tensors):
        name = spec.name
        if not name:
            raise bad(f"tensor #{index} has an empty name", f"tensors[{index}].name")
        if name in seen:
            raise bad(f"tensor {name!r} appears twice", name)
        seen.add(name)
        itemsize = _ITEMSIZE.get(int(spec.dtype))
        if itemsize is None:
            raise bad(f"tensor {name!r} has unknown dtype {_dtype_name(spec.dtype)}", name)
        numel = 1
        for dim in spec.shape:
            if dim < 0:
                raise bad(f"tensor {name!r} has a negative dimension: {list(spec.shape)}", name)
            numel *= dim
        if spec.byte_length != numel * itemsize:
            raise bad(
                f"tensor {name!r} byte_length {spec.byte_length} != {numel} elements x "
                f"{itemsize} bytes ({_dtype_name(spec.dtype)}, shape {list(spec.shape)})",
                name,
            )
        want_digest = 0 if manifest.digests_trail else 32
        if len(spec.sha256) != want_digest:
            raise bad(f"tensor {name!r} sha256 is {len(spec.sha256)} bytes, not {want_digest}"
                      + (" (its digest trails the data)" if manifest.digests_trail else ""),
                      name)
        total += spec.byte_length
    if manifest.total_bytes != total:
        raise bad(
            f"total_bytes {manifest.total_bytes} != sum of tensor byte lengths {total}",
            "total_bytes",
        )
    want_stream = 0 if manifest.digests_trail else 32
    if len(manifest.sha256) != want_stream:
        raise bad(f"stream sha256 is {len(manifest.sha256)} bytes, not {want_stream}", "sha256")
    expected_chunks = _chunk_count(total, manifest.chunk_size)
    if manifest.chunk_count != expected_chunks:
        raise bad(
            f"chunk_count {manifest.chunk_count} != {expected_chunks} for {total} bytes "
            f"in chunks of {manifest.chunk_size}",
            "chunk_count",
        )
    if max_total_bytes is not None and total > max_total_bytes:
        raise bad(f"stream of {total} bytes exceeds the limit of {max_total_bytes}", "total_bytes")


def _layout(
    expected: tensors_pb2.TensorManifest | Mapping[str, torch.Tensor],
) -> dict[str, tuple[int, tuple[int, ...]]]:
    if isinstance(expected, tensors_pb2.TensorManifest):
        return {s.name: (int(s.dtype), tuple(s.shape)) for s in expected.tensors}
    return {
        name: (int(dtype_to_proto(t.dtype, name)), tuple(t.shape)) for name, t in expected.items()
    }


def check_manifest(
    manifest: tensors_pb2.TensorManifest,
    expected: tensors_pb2.TensorManifest | Mapping[str, torch.Tensor],
) -> None:
    """Refuse a stream whose tensors are not the expected model's (names, dtypes, shapes).

    Order is not compared: the receiver lays tensors out by the manifest's own
    order, so only the set of names and each tensor's type and shape matter.
    """
    want = _layout(expected)
    got = _layout(manifest)
    for name in want:
        if name not in got:
            raise ManifestMismatch(MANIFEST_MISMATCH, f"tensor {name!r} is missing", name)
    for name, (dtype, shape) in got.items():
        if name not in want:
            raise ManifestMismatch(MANIFEST_MISMATCH, f"unexpected tensor {name!r}", name)
        want_dtype, want_shape = want[name]
        if dtype != want_dtype:
            raise ManifestMismatch(
                MANIFEST_MISMATCH,
                f"tensor {name!r} has dtype {_dtype_name(dtype)}, expected "
                f"{_dtype_name(want_dtype)}",
                name,
            )
        if shape != want_shape:
            raise ManifestMismatch(
                MANIFEST_MISMATCH,
                f"tensor {name!r} has shape {list(shape)}, expected {list(want_shape)}",
                name,
            )


# --------------------------------------------------------------------------- receiver


class _HashQueue:
    """One stream's hashing, in arrival order, off the receiving thread.

    At most one pool task works on a stream at a time (it takes the stream's pieces
    until none is left), so the tensors' running hashes see their bytes in order and
    no thread is held by a stream that waits for its next chunk.
    """

    def __init__(self, work: Callable[[memoryview, int], None]) -> None:
        self._work = work
        self._items: deque[tuple[memoryview, int, Callable[[], None] | None]] = deque()
        self._cv = threading.Condition()
        self._running = False
        self._error: BaseException | None = None

    def submit(self, piece: memoryview, start: int,
               release: Callable[[], None] | None = None) -> None:
        with self._cv:
            self._items.append((piece, start, release))
            if self._running:
                return
            self._running = True
        try:
            _pool().submit(self._run)
        except RuntimeError:  # interpreter shutting down: hash here
            self._run()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._items:
                    self._running = False
                    self._cv.notify_all()
                    return
                piece, start, release = self._items.popleft()
                failed = self._error is not None
            try:
                if not failed:
                    self._work(piece, start)
            except BaseException as exc:  # kept for drain(): the stream cannot be trusted
                with self._cv:
                    self._error = exc
            finally:
                if release is not None:
                    release()

    def drain(self, timeout_s: float = 600.0) -> None:
        """Wait until every piece submitted is hashed; re-raise a hashing failure."""
        with self._cv:
            if not self._cv.wait_for(lambda: not self._running and not self._items, timeout_s):
                raise CodecError(INCOMPLETE, f"hashing did not finish within {timeout_s:.0f} s")
            if self._error is not None:
                raise self._error


class StreamAssembler:
    """Receives a stream's plaintext chunks into one preallocated buffer.

    Chunks must arrive in order (`next_sequence` says which is due); a refused
    chunk changes nothing, so after a reconnect the caller simply continues with
    `next_sequence`. Hashes are computed as chunks arrive and checked by `finish()`.

    The buffer is anonymous memory (mapped and populated at once: no zero-fill
    pass, fewer page faults than a bytearray) or, with `spool_path`, a file of
    `total_bytes` written in place, so a large update costs page cache rather than
    heap. To resume after a process restart, construct a new assembler over the
    same spool file with `resume_at=n`: the first n chunks are taken from the file
    and re-hashed (a read of n * chunk_size bytes), so the caller must have made
    them durable (`flush()`) before recording n as acknowledged. Without
    `resume_at` an existing spool file is overwritten in place, its size set to the
    stream's: a file kept from an earlier stream (`fl_server.spool_pool`) keeps its
    blocks and page cache, and a complete stream writes every byte of it, so nothing
    of the earlier stream can reach the tensors.

    Tensors returned by `finish()` are views over the buffer (possibly at unaligned
    addresses, which torch on CPU handles) and keep it alive. Spooled tensors are
    a private (copy-on-write) mapping of the file: changing them never changes it.
    Its pages that nothing has written still read the file, so the file must not be
    written again while that mapping lives (`spool_mapping`).

    Streams of `ASYNC_HASH_MIN_CHUNKS` chunks or more are hashed off the caller's
    thread (in order, on the shared hashing pool); `finish()` waits for the hashing
    and `close()` for any still running. `add_sealed` opens a sealed chunk straight
    into the buffer (no plaintext copy); a spooled stream decrypts into one of a few
    scratch chunks, writes it to the file and frees it once hashed.

    A stream whose manifest has `digests_trail` learns its digests from the final
    sealed chunk (`add_sealed`) or from `finish(digests)`; `manifest` has them once
    `finish()` verified them.

    Not thread-safe: one stream has one writer at a time.
    """

    def __init__(
        self,
        manifest: tensors_pb2.TensorManifest,
        expected: tensors_pb2.TensorManifest | Mapping[str, torch.Tensor] | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        *,
        resume_at: int = 0,
        max_total_bytes: int | None = None,
        measure: bool = False,
    ) -> None:
        _require_little_endian()
        if expected is not None:
            # Compare models first: a wrong model is the likelier, clearer error.
            check_manifest(manifest, expected)
        validate_manifest(manifest, max_total_bytes)
        self._manifest = tensors_pb2.TensorManifest()
        self._manifest.CopyFrom(manifest)
        self._chunk_size = manifest.chunk_size
        self._chunk_count = manifest.chunk_count
        self._total = manifest.total_bytes
        self._specs = list(self._manifest.tensors)
        self._ends: list[int] = []
        end = 0
        for spec in self._specs:
            end += spec.byte_length
            self._ends.append(end)
        if not 0 <= resume_at <= self._chunk_count:
            raise CodecError(
                BAD_ARGUMENT, f"resume_at {resume_at} outside 0..{self._chunk_count}", "resume_at"
            )
        self._tensor_hashes = [_new_hash(manifest.digest) for _ in self._specs]
        # per tensor: the dtype its pieces are measured in (None: not measured), and
        # the running sum of squares of its elements
        self._measure: list[torch.dtype | None] = [
            _measurable(spec, end - spec.byte_length, self._chunk_size) if measure else None
            for spec, end in zip(self._specs, self._ends, strict=True)
        ]
        self._squares = [0.0] * len(self._specs)
        self._tensor_index = 0
        self._next = 0
        self._received = 0
        self._finished = False
        self._closed = False
        self._trailer = b""
        self._hasher: _HashQueue | None = None
        self._scratch: list[bytearray] = []
        self._scratch_free: list[threading.Event] = []
        self._spool_path = Path(spool_path) if spool_path is not None else None
        self._fd: int | None = None
        self._memory: memoryview | bytearray | None = None
        self._view: memoryview | None = None
        self._mapping: weakref.ref[mmap.mmap] | None = None
        if self._spool_path is None:
            if resume_at:
                raise CodecError(
                    BAD_ARGUMENT, "resume_at needs a spool_path holding the earlier chunks"
                )
            self._memory = _anonymous_buffer(self._total)
            self._view = memoryview(self._memory)
        else:
            self._fd = self._open_spool(self._spool_path, resume_at)
            if resume_at:
                self._rehash(resume_at)
        if self._chunk_count >= ASYNC_HASH_MIN_CHUNKS:
            self._hasher = _HashQueue(self._hash_tensors)

    # -- buffer

    def _open_spool(self, path: Path, resume_at: int) -> int:
        try:
            if resume_at:
                fd = os.open(path, os.O_RDWR)
                size = os.fstat(fd).st_size
                if size != self._total:
                    os.close(fd)
                    raise CodecError(
                        SPOOL_INVALID,
                        f"spool {path} holds {size} bytes, the manifest says {self._total}",
                    )
                return fd
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            kept = os.fstat(fd).st_size == self._total  # a pooled file of this size
            if not kept:
                os.ftruncate(fd, self._total)
        except OSError as exc:
            raise CodecError(SPOOL_INVALID, f"cannot open spool {path}: {exc}") from exc
        if not kept:
            _reserve(fd, self._total)
        return fd

    def _rehash(self, chunks: int) -> None:
        assert self._fd is not None
        end = min(chunks * self._chunk_size, self._total)
        if end:
            # a private mapping, only read: ACCESS_COPY because torch refuses (warns
            # about) read-only buffers when the pieces are measured
            with mmap.mmap(self._fd, self._total, access=mmap.ACCESS_COPY) as mapped:
                view = memoryview(mapped)
                try:
                    for start in range(0, end, _HASH_PIECE):
                        piece = view[start : min(start + _HASH_PIECE, end)]
                        self._hash_tensors(piece, start)
                        piece.release()
                finally:
                    view.release()
        self._next = chunks
        self._received = end

    def _hash_tensors(self, piece: memoryview, start: int) -> None:
        """Feed `piece` (at stream offset `start`) to the hashes of the tensors it spans."""
        pos, size, index, ends = 0, len(piece), self._tensor_index, self._ends
        while pos < size:
            while ends[index] <= start + pos:  # skips empty tensors too
                index += 1
            take = min(size - pos, ends[index] - start - pos)
            self._tensor_hashes[index].update(piece[pos : pos + take])
            dtype = self._measure[index]
            if dtype is not None:
                self._squares[index] += _sum_of_squares(piece[pos : pos + take], dtype)
            pos += take
        self._tensor_index = index

    def _store(self, view: memoryview, start: int) -> None:
        if self._view is not None:
            self._view[start : start + len(view)] = view
            return
        assert self._fd is not None
        pwrite_all(self._fd, view, start)

    def _store_and_hash(self, view: memoryview, start: int) -> None:
        self._store(view, start)
        if self._hasher is None:
            self._hash_tensors(view, start)
        elif self._view is not None:  # hash the stored copy: `view` may be reused
            self._hasher.submit(self._view[start : start + len(view)], start)
        else:  # a spooled plain chunk: keep the running hashes in order, hash it here
            self._hasher.drain()
            self._hash_tensors(view, start)

    def _scratch_slot(self, sequence: int) -> tuple[bytearray, threading.Event]:
        """A spooled stream's chunk buffer, free again once its chunk is hashed."""
        if not self._scratch:
            self._scratch = [bytearray(self._chunk_size) for _ in range(SPOOL_SCRATCH_CHUNKS)]
            self._scratch_free = [threading.Event() for _ in self._scratch]
            for free in self._scratch_free:
                free.set()
        index = sequence % len(self._scratch)
        free = self._scratch_free[index]
        if not free.wait(600.0):
            raise CodecError(INCOMPLETE, "hashing fell 10 minutes behind the stream")
        free.clear()
        return self._scratch[index], free

    # -- state

    @property
    def manifest(self) -> tensors_pb2.TensorManifest:
        return self._manifest

    @property
    def norms(self) -> dict[str, float]:
        """L2 norms of the floating tensors, measured from the bytes as they arrived
        (`measure=True`; complete once `finish()` returned). A finite norm means every
        element is finite, so a receiver that checks updates for NaN/Inf and takes
        their norms needs no further pass over them (issue 16 item 3). A tensor whose
        elements straddle chunks (it starts at an offset that is not a multiple of its
        element size) is left out: measure it the usual way."""
        return {spec.name: math.sqrt(squares)
                for spec, squares, dtype in zip(self._specs, self._squares, self._measure,
                                                strict=True)
                if dtype is not None}

    @property
    def next_sequence(self) -> int:
        """The sequence number of the chunk expected next (= chunks accepted so far)."""
        return self._next

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def complete(self) -> bool:
        """Every chunk has been accepted (hashes are checked by `finish()`)."""
        return self._next == self._chunk_count

    @property
    def finished(self) -> bool:
        """`finish()` returned: every byte is written and verified, and nothing of the
        assembler writes or reads its buffer any more (only its tensors read it)."""
        return self._finished

    def expected_length(self, sequence: int) -> int:
        """Plaintext length of chunk `sequence`: chunk_size except for the last."""
        return min(self._chunk_size, self._total - sequence * self._chunk_size)

    # -- receiving

    def add_chunk(self, sequence: int, data: bytes | bytearray | memoryview) -> None:
        """Accept the next chunk; anything out of place is refused without effect.

        `data` is only read during the call, so it may be a reused buffer.
        """
        if self._finished or self._closed:
            raise StreamOrderError(FINISHED, f"chunk {sequence} after the stream was finished")
        if sequence >= self._chunk_count:
            raise IntegrityError(
                STREAM_OVERSIZE,
                f"chunk {sequence} beyond the manifest's {self._chunk_count} chunks",
                "chunk_count",
            )
        if sequence != self._next:
            raise StreamOrderError(
                OUT_OF_ORDER, f"chunk {sequence} arrived, expected chunk {self._next}", "sequence"
            )
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        want = self.expected_length(sequence)
        if len(view) > want:
            raise IntegrityError(
                STREAM_OVERSIZE,
                f"chunk {sequence} has {len(view)} bytes, more than the {want} the manifest "
                "leaves for it",
                "chunk_size",
            )
        if len(view) < want:
            raise IntegrityError(
                CHUNK_LENGTH,
                f"chunk {sequence} has {len(view)} bytes, expected {want}",
                "chunk_size",
            )
        start = sequence * self._chunk_size
        self._store_and_hash(view, start)
        self._next += 1
        self._received += want

    def add_sealed(self, opener: StreamOpener,
                   chunk: tensors_pb2.SealedChunk | WireChunk) -> None:
        """Open the next sealed chunk with `opener` straight into the stream's buffer.

        Refusals are those of `opener.open` then `add_chunk`, in that order, and
        leave both unchanged: a chunk that fails to open counts as never received
        (the bytes it left in the buffer are overwritten by the next one that opens).
        A final chunk's `tensor_digests` are kept for `finish()`.
        """
        ciphertext = chunk.ciphertext
        opener.check(chunk, len(ciphertext))
        sequence = chunk.sequence
        size = len(ciphertext) - GCM_TAG_BYTES
        if (self._finished or self._closed
                or sequence != self._next or sequence >= self._chunk_count
                or size != self.expected_length(sequence)
                or (self._hasher is None and self._view is None)):
            # anything out of place, and a short spooled stream: the plain path decides
            self.add_chunk(sequence, opener.open(chunk))
        else:
            start = sequence * self._chunk_size
            if self._view is not None:
                place = self._view[start : start + size]
                opener.open_into(chunk, place, ciphertext)
                if self._hasher is None:
                    # A short stream (a small model's one-chunk upload) is hashed and
                    # measured here, in its buffer: opened apart, its plaintext was
                    # copied into the buffer and, read-only, copied again to be
                    # measured (issue 16 item 2).
                    self._hash_tensors(place, start)
                else:
                    self._hasher.submit(place, start)
            else:
                assert self._hasher is not None
                slot, free = self._scratch_slot(sequence)
                try:
                    place = memoryview(slot)[:size]
                    opener.open_into(chunk, place, ciphertext)
                    self._store(place, start)
                except BaseException:
                    free.set()
                    raise
                self._hasher.submit(place, start, free.set)
            self._next += 1
            self._received += size
        if chunk.final:
            self._trailer = bytes(chunk.tensor_digests)

    def flush(self) -> None:
        """Make the chunks accepted so far durable in the spool file (no-op in memory)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def finish(self, digests: bytes | None = None) -> dict[str, torch.Tensor]:
        """Verify every hash and return the tensors as views over the buffer.

        `digests`: the trailing per-tensor digests of a `digests_trail` stream, when
        they did not come in through `add_sealed`'s final chunk.
        """
        if self._finished or self._closed:
            raise StreamOrderError(FINISHED, "finish() after the stream was finished or closed")
        if not self.complete:
            raise IntegrityError(
                INCOMPLETE,
                f"stream ended after {self._next} of {self._chunk_count} chunks",
                "chunk_count",
            )
        if self._hasher is not None:
            self._hasher.drain()
        trailer = self._trailer if digests is None else digests
        if self._manifest.digests_trail:
            fill_digests(self._manifest, trailer)
            self._specs = list(self._manifest.tensors)
        elif trailer:
            raise IntegrityError(
                HASH_MISMATCH, "trailing digests after a manifest that carried its own",
                "tensor_digests",
            )
        algorithm = self._manifest.digest
        name = digest_name(algorithm)
        for spec, tensor_hash in zip(self._specs, self._tensor_hashes, strict=True):
            if tensor_hash.digest() != spec.sha256:
                raise IntegrityError(
                    HASH_MISMATCH, f"tensor {spec.name!r} does not match its {name}", spec.name
                )
        if stream_digest((spec.sha256 for spec in self._specs), algorithm) \
                != self._manifest.sha256:
            raise IntegrityError(HASH_MISMATCH, f"stream does not match its {name}", "sha256")
        buffer = self._result_buffer()
        tensors: dict[str, torch.Tensor] = {}
        start = 0
        for spec in self._specs:
            tensors[spec.name] = _tensor_view(buffer, spec, start)
            start += spec.byte_length
        self._finished = True
        self._release()
        return tensors

    def _result_buffer(self) -> mmap.mmap | memoryview | bytearray:
        if self._memory is not None:
            return self._memory
        if self._total == 0:
            return bytearray()
        assert self._fd is not None
        mapping = mmap.mmap(self._fd, self._total, access=mmap.ACCESS_COPY)
        self._mapping = weakref.ref(mapping)
        return mapping

    def spool_mapping(self) -> mmap.mmap | None:
        """The spool file's mapping that `finish()`'s tensors are views of, while any of
        them (or anything else) still holds it; None before `finish()`, in memory, and
        once it is gone. Whoever writes the file again must wait for it to go."""
        return self._mapping() if self._mapping is not None else None

    def _release(self) -> None:
        # The hasher's work is a method of this assembler: a reference cycle, which the
        # daemons' collector (fl_core/gc_policy.py) reaches only every few rounds, so
        # the scratch chunks (megabytes per stream) go here, not with the cycle.
        self._hasher = None
        self._scratch = []
        self._scratch_free = []
        if self._view is not None:
            self._view.release()
            self._view = None
        self._memory = None  # tensors handed out keep it alive; else it is freed
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Abandon the stream (a spool file stays on disk for the caller to remove)."""
        if not self._finished and not self._closed:
            self._closed = True
            if self._hasher is not None:
                # nothing may still read the buffer when it goes
                with contextlib.suppress(CodecError):
                    self._hasher.drain()
            self._release()

    def __enter__(self) -> StreamAssembler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Only the descriptor needs explicit release; memory goes with the object.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def _reserve(fd: int, size: int) -> None:
    """Allocate a new spool's blocks in one call: each chunk's write then only copies
    (writes into a sparse file allocated blocks as they came: ~1.5x the CPU per chunk
    on ext4). Where that fails (no space, a file system without it) the file stays
    sparse, and a write that cannot be stored fails as it always did (the server
    answers SERVER_STORAGE), not the opening."""
    if size and hasattr(os, "posix_fallocate"):
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)


def _measurable(spec: tensors_pb2.TensorSpec, start: int, chunk_size: int) -> torch.dtype | None:
    """The dtype to measure a tensor's pieces in, where every piece holds whole
    elements (the tensor starts at a multiple of its element size, and chunks are a
    multiple of it); None for non-floating tensors and any other layout."""
    dtype = _TORCH_DTYPES.get(int(spec.dtype))
    if dtype is None or not dtype.is_floating_point or not spec.byte_length:
        return None
    itemsize = _ITEMSIZE[int(spec.dtype)]
    if start % itemsize or chunk_size % itemsize:
        return None
    return dtype


def _sum_of_squares(piece: memoryview, dtype: torch.dtype) -> float:
    """Sum of squares of a piece's elements, as `strategies.base.tensor_norm` takes it:
    float32 (float64 for float64 tensors), redone in float64 if that overflows; NaN or
    Inf when an element is. The product, not `** 2`: a float overflows to inf, where
    `**` raises."""
    if piece.readonly:  # a plain chunk handed in as bytes; torch wants a writable buffer
        piece = memoryview(bytearray(piece))
    x = torch.frombuffer(piece, dtype=dtype)
    norm = float(torch.linalg.vector_norm(x, dtype=torch.float64 if dtype == torch.float64
                                          else torch.float32))
    if not math.isfinite(norm) and dtype != torch.float64:
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
    return norm * norm


def _anonymous_buffer(size: int) -> memoryview | bytearray:
    """Memory for a whole stream, its pages committed in one go.

    Populating a mapping up front costs about half of what faulting each page in as
    chunks land does, and no zero-fill pass is needed (unlike a bytearray); the last
    mapping freed is reused, resident, for the next stream of its size
    (fl_core/receive_buffers.py). A small stream's buffer comes from the heap instead
    (HEAP_STREAM_MAX_BYTES): the mapping's system calls cost far more than zeroing a
    few hundred KB.
    """
    if size <= HEAP_STREAM_MAX_BYTES:
        return bytearray(size)
    return RECEIVE_BUFFERS.take(size)


def _tensor_view(
    buffer: mmap.mmap | memoryview | bytearray, spec: tensors_pb2.TensorSpec, start: int
) -> torch.Tensor:
    dtype = dtype_from_proto(spec.dtype, spec.name)
    shape = tuple(spec.shape)
    if spec.byte_length == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=spec.byte_length, offset=start)
    if dtype == torch.bool and int(raw.max()) > 1:
        # Any byte but 0/1 in a bool tensor is undefined behaviour in torch.
        raise IntegrityError(
            BAD_VALUE, f"bool tensor {spec.name!r} holds bytes other than 0 and 1", spec.name
        )
    return raw.view(dtype).reshape(shape)


# --------------------------------------------------------------------------- values


def has_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or Inf, else None.

    A sum is non-finite if any element is, so one (allocation-free) sum per tensor
    settles the common, all-finite case at ~7x less than an elementwise test; only
    a non-finite sum (a bad element, or finite values that overflow) pays for the
    exact test, which scans in blocks so its boolean mask stays small.
    """
    block = 1 << 20
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(flat.sum(dtype=acc))):
            continue
        for start in range(0, flat.numel(), block):
            if not bool(torch.isfinite(flat[start : start + block]).all()):
                return name
    return None
