"""The AES-CTR mask generator: deterministic per seed, chunked generation equals one
pass, plus and minus cancel, and it looks uniform."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_core.constants import SECAGG_MASK_CHUNK_BYTES
from fl_core.secagg import SecAggError
from fl_core.secagg.prg import apply_mask, apply_masks, mask_words


def test_mask_is_the_aes_ctr_keystream_across_chunk_boundaries() -> None:
    seed = os.urandom(32)
    count = SECAGG_MASK_CHUNK_BYTES // 4 * 2 + 123  # three chunks, the last partial
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    expected = np.frombuffer(enc.update(bytes(count * 4)), dtype="<u4")
    assert np.array_equal(mask_words(seed, count), expected)


def test_add_then_subtract_restores_and_wraps_mod_2_32() -> None:
    v = np.arange(5000, dtype=np.uint32) * np.uint32(2654435761)
    before = v.copy()
    seed = os.urandom(32)
    apply_mask(v, seed, 1)
    assert not np.array_equal(v, before)
    apply_mask(v, seed, -1)
    assert np.array_equal(v, before)


def test_different_seeds_give_different_masks_and_look_uniform() -> None:
    a = mask_words(os.urandom(32), 1 << 16)
    b = mask_words(os.urandom(32), 1 << 16)
    assert not np.array_equal(a, b)
    # top byte histogram: chi-square with 255 dof stays well below 400 for uniform data
    counts = np.bincount((a >> 24).astype(np.int64), minlength=256)
    expected = a.size / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 400


@pytest.mark.parametrize("bad", [np.zeros(4, dtype=np.int32), np.zeros((2, 2), dtype=np.uint32)])
def test_only_flat_uint32_buffers(bad: np.ndarray) -> None:
    with pytest.raises(SecAggError):
        apply_mask(bad, os.urandom(32))


def test_seed_length_is_checked() -> None:
    with pytest.raises(SecAggError):
        apply_mask(np.zeros(4, dtype=np.uint32), b"short")


def test_several_masks_in_one_pass_equal_one_at_a_time() -> None:
    count = SECAGG_MASK_CHUNK_BYTES // 4 * 3 + 7
    seeds = [os.urandom(32) for _ in range(4)]
    signs = [1, -1, 1, -1]
    one_pass = np.arange(count, dtype=np.uint32)
    apply_masks(one_pass, list(zip(seeds, signs, strict=True)))
    each = np.arange(count, dtype=np.uint32)
    for seed, sign in zip(seeds, signs, strict=True):
        apply_mask(each, seed, sign)
    assert np.array_equal(one_pass, each)
