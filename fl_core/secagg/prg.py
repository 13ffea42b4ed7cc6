"""The mask generator: AES-256-CTR keystream read as little-endian uint32 words.

A mask is as long as the model (one word per parameter), so it is never built
whole: the keystream is produced into one reusable chunk (MASK_CHUNK_BYTES) and
added to (or subtracted from) the target buffer slice by slice, modulo 2^32 by
uint32 wrap-around. Memory beyond the target is one chunk whatever the model size.

Each seed is used for exactly one mask (seeds are derived per round and pair), so
a fixed zero counter block is safe: AES-CTR under a fresh key is a PRG. Measured
at about 2 GB/s per core with AES-NI (bench/secagg.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_core.constants import SECAGG_MASK_CHUNK_BYTES
from fl_core.secagg import SecAggError

SEED_BYTES = 32
_WORD = 4
_ZERO_IV = bytes(16)
_WORDS_PER_CHUNK = SECAGG_MASK_CHUNK_BYTES // _WORD
_ZEROS = memoryview(bytes(SECAGG_MASK_CHUNK_BYTES))

BAD_SEED = "BAD_SEED"


class MaskStream:
    """The masks of one vector as running keystreams: `apply` adds each mask's next
    words to a slice, so a vector may be masked slice by slice, in order, as it is
    produced (a hospital masks each quantized slice while it is still in cache) and
    the result is the same as one pass over the whole vector."""

    def __init__(self, masks: Sequence[tuple[bytes, int]]) -> None:
        for seed, sign in masks:
            if len(seed) != SEED_BYTES:
                raise SecAggError(BAD_SEED, f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
            if sign not in (1, -1):
                raise SecAggError(BAD_SEED, f"sign must be +1 or -1, got {sign}")
        self._streams = [(Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor(),
                          np.add if sign == 1 else np.subtract) for seed, sign in masks]
        # update_into may need block_size - 1 spare bytes after the output
        self._raw = bytearray(SECAGG_MASK_CHUNK_BYTES + 15)
        self._chunk = np.frombuffer(self._raw, dtype="<u4", count=_WORDS_PER_CHUNK)

    def apply(self, target: np.ndarray) -> None:
        """target += sum of sign * (the masks' next len(target) words), in place.

        Window by window (MASK_CHUNK_BYTES, small enough to stay in cache): every
        mask's next keystream block is generated and added, so a hospital's k + 1
        masks cost one trip through memory, not k + 1.
        """
        if target.dtype != np.uint32 or target.ndim != 1 or not target.flags.c_contiguous:
            raise SecAggError(BAD_SEED, "masks apply to a contiguous 1-D uint32 buffer")
        raw, chunk = self._raw, self._chunk
        total = target.shape[0]
        for start in range(0, total, _WORDS_PER_CHUNK):
            n = min(_WORDS_PER_CHUNK, total - start)
            view = target[start:start + n]
            zeros = _ZEROS[: n * _WORD]  # a memoryview: no copy of the zeros
            for encryptor, op in self._streams:
                encryptor.update_into(zeros, raw)
                op(view, chunk[:n], out=view)


def apply_masks(target: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """target += sum of sign * PRG(seed) over `masks` (mod 2^32), in place, in one pass."""
    MaskStream(masks).apply(target)


def apply_mask(target: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """target += sign * PRG(seed) (mod 2^32), in place, one chunk of keystream at a time."""
    apply_masks(target, [(seed, sign)])


def keystream_words(seed: bytes, out: np.ndarray) -> None:
    """Fills a uint32 buffer with PRG(seed) (e.g. uniform rounding noise)."""
    out.fill(0)
    apply_mask(out, seed)


def mask_words(seed: bytes, count: int) -> np.ndarray:
    """The first `count` words of a mask as a new array (tests and small vectors only)."""
    out = np.zeros(count, dtype=np.uint32)
    apply_mask(out, seed)
    return out
