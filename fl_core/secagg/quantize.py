"""Fixed-point quantization of weighted updates into Z_2^32, and back.

Masks are uniform in Z_2^32, so what they hide must be integers mod 2^32. Each
hospital sends q = round_stoch(w * clip(x, -c, c) * s) mod 2^32 per coordinate, with
- c the declared clipping range (--secagg_clip), x a coordinate of its delta,
- w = its weight in the sum, at most 1 (n_i / D for example weighting, where D is
  the server's declared divisor, at least the sum of the weights it accepts),
- s = 2^(bits-1) / c the scale, so |w * clip(x) * s| <= 2^(bits-1),
- round_stoch(y) = floor(y + u), u ~ U[0, 1): unbiased (E = y) and |error| < 1.
Summed over m hospitals whose weights add to at most 1, |sum| <= 2^(bits-1) + m,
below 2^31 for bits <= 30, so the sum read as a signed 32-bit integer is exact.

Error bound (per coordinate, documented in docs/SECURITY.md): the dequantized sum
differs from sum_i w_i clip(x_i) by less than m / s = m c / 2^(bits-1); it is
unbiased. Clipping itself changes only coordinates beyond +-c.

The rounding noise is AES-CTR keystream under a key from the OS's random source
(never the job's seed): fast (~2 GB/s) and uniform to 2^-32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_core.constants import SECAGG_MAX_BITS, SECAGG_MIN_BITS
from fl_core.secagg import SecAggError
from fl_core.secagg.prg import SEED_BYTES

BAD_QUANTIZATION = "BAD_QUANTIZATION"
_SLICE = 1 << 15  # elements quantized at a time: the float64 temporaries stay in cache


@dataclass(frozen=True)
class QuantParams:
    bits: int
    clip: float

    def __post_init__(self) -> None:
        if not SECAGG_MIN_BITS <= self.bits <= SECAGG_MAX_BITS:
            raise SecAggError(BAD_QUANTIZATION, f"quantization bits must be in"
                              f" {SECAGG_MIN_BITS}..{SECAGG_MAX_BITS}, got {self.bits}")
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise SecAggError(BAD_QUANTIZATION, f"clip range must be > 0, got {self.clip}")

    @property
    def scale(self) -> float:
        return float(1 << (self.bits - 1)) / self.clip

    def error_bound(self, count: int) -> float:
        """Upper bound on |dequantized sum - weighted clipped sum| per coordinate."""
        return count / self.scale

    def max_count(self) -> int:
        """Most hospitals whose sum cannot wrap: 2^(bits-1) + m < 2^31."""
        return (1 << 31) - 1 - (1 << (self.bits - 1))


def quantize_into(out: np.ndarray, tensors: Iterable[torch.Tensor], weight: float,
                  params: QuantParams, noise_key: bytes | None = None,
                  then: Callable[[np.ndarray], None] | None = None) -> None:
    """Writes the quantized, weighted, clipped coordinates of `tensors` (flattened in
    order) into `out` (uint32, exactly as long as all of them together).

    The rounding noise u is AES-CTR keystream under `noise_key` (fresh from the OS
    when None; tests pass one to reproduce a quantization), read as 32-bit fractions.
    `then` is called on each finished slice of `out`, in order, while it is still in
    cache (the hospital adds its masks there: one trip through memory, not two).
    """
    if not 0.0 <= weight <= 1.0:
        raise SecAggError(BAD_QUANTIZATION, f"a hospital's weight must be in [0, 1], got {weight}")
    if out.dtype != np.uint32 or out.ndim != 1:
        raise SecAggError(BAD_QUANTIZATION, "the output must be a 1-D uint32 buffer")
    key = noise_key or os.urandom(SEED_BYTES)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    factor = weight * params.scale
    bound = factor * params.clip  # clip(x) * factor == clip(x * factor, +-clip * factor)
    buf = np.empty(_SLICE, dtype=np.float64)
    noise = np.empty(_SLICE, dtype=np.float64)
    raw = bytearray(4 * _SLICE + 15)
    words = np.frombuffer(raw, dtype="<u4", count=_SLICE)
    zeros = memoryview(bytes(4 * _SLICE))
    pos = 0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.to(torch.float32)
        values = flat.numpy()
        n = values.shape[0]
        if pos + n > out.shape[0]:
            raise SecAggError(BAD_QUANTIZATION, "the tensors are longer than the buffer")
        for start in range(0, n, _SLICE):
            m = min(_SLICE, n - start)
            y, u = buf[:m], noise[:m]
            np.multiply(values[start:start + m], factor, out=y, dtype=np.float64)
            np.clip(y, -bound, bound, out=y)
            if not np.isfinite(y.sum()):  # inf was clipped: only NaN is left to catch
                raise SecAggError(BAD_QUANTIZATION, "the update holds NaN values")
            encryptor.update_into(zeros[: 4 * m], raw)
            np.multiply(words[:m], 2.0 ** -32, out=u, dtype=np.float64)
            np.add(y, u, out=y)
            np.floor(y, out=y)
            # |y| <= 2^(bits-1) + 1 < 2^31: exact as int32, whose bits are the residue
            target = out[pos + start:pos + start + m]
            np.copyto(target.view(np.int32), y, casting="unsafe")
            if then is not None:
                then(target)
        pos += n
    if pos != out.shape[0]:
        raise SecAggError(BAD_QUANTIZATION,
                          f"the tensors hold {pos} coordinates, the buffer {out.shape[0]}")


def signed(total: np.ndarray) -> np.ndarray:
    """A uint32 sum read as the signed integers it encodes (a view, no copy)."""
    return total.view(np.int32)


def dequantize(total: np.ndarray, params: QuantParams, multiplier: float = 1.0,
               dtype: type[np.floating] = np.float64) -> np.ndarray:
    """sum_i w_i clip(x_i) * multiplier, from the unmasked uint32 sum, as `dtype`: one
    pass, computed in float64 and rounded once into `dtype` (no float64 copy of a
    float32 model)."""
    out = np.empty(total.shape, dtype=dtype)
    np.multiply(signed(total), multiplier / params.scale, out=out, dtype=np.float64,
                casting="same_kind")
    return out
