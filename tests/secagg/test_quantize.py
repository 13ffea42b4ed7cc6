"""Fixed-point quantization: the sum of quantized inputs dequantizes to within the
stated bound of the weighted clipped float sum, wraps nothing, and is unbiased."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.secagg import SecAggError
from fl_core.secagg.quantize import QuantParams, dequantize, quantize_into, signed

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _quantized(tensors: list[torch.Tensor], weight: float, params: QuantParams) -> np.ndarray:
    out = np.zeros(sum(t.numel() for t in tensors), dtype=np.uint32)
    quantize_into(out, tensors, weight, params)
    return out


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3), min_size=1,
                       max_size=4),
       dtype=st.sampled_from(DTYPES), clients=st.integers(1, 8), bits=st.integers(12, 30),
       clip=st.floats(0.05, 10.0), seed=st.integers(0, 2**31))
def test_dequantized_weighted_mean_within_bound(shapes: list[list[int]], dtype: torch.dtype,
                                                clients: int, bits: int, clip: float,
                                                seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = QuantParams(bits, clip)
    examples = torch.randint(1, 500, (clients,), generator=gen).tolist()
    divisor = float(sum(examples))
    updates = [[(torch.randn(s, generator=gen) * clip).to(dtype) for s in shapes]
               for _ in range(clients)]
    total = np.zeros(sum(math.prod(s) for s in shapes), dtype=np.uint32)
    for upd, n in zip(updates, examples, strict=True):
        total += _quantized(upd, n / divisor, params)  # uint32 wraps like Z_2^32
    mean = dequantize(total, params)  # sum_i (n_i / D) clip(x_i) = the weighted mean
    flat = [torch.cat([t.to(torch.float64).reshape(-1) for t in upd]).numpy()
            if upd else np.zeros(0) for upd in updates]
    exact = sum(n / divisor * np.clip(f, -clip, clip) for f, n in zip(flat, examples,
                                                                      strict=True))
    assert np.all(np.abs(mean - exact) <= params.error_bound(clients) * (1 + 1e-9))


def test_sum_of_quantized_inputs_never_wraps_at_full_weight() -> None:
    params = QuantParams(30, 1.0)
    m = 16
    total = np.zeros(3, dtype=np.uint32)
    for _ in range(m):
        total += _quantized([torch.tensor([5.0, -5.0, 0.999])], 1 / m, params)
    got = signed(total).astype(np.int64)
    assert got[0] > 0 and got[1] < 0
    assert np.allclose(dequantize(total, params), [1.0, -1.0, 0.999], atol=m / params.scale)


def test_stochastic_rounding_is_unbiased() -> None:
    params = QuantParams(8, 1.0)  # coarse: 1 unit = 1/128
    x = torch.full((200_000,), 0.3 / 128)  # 0.3 of a unit
    q = signed(_quantized([x], 1.0, params))
    assert set(np.unique(q)) <= {0, 1}
    assert abs(q.mean() - 0.3) < 0.01


def test_nan_refused_inf_clipped() -> None:
    params = QuantParams(16, 2.0)
    with pytest.raises(SecAggError):
        _quantized([torch.tensor([float("nan")])], 1.0, params)
    q = dequantize(_quantized([torch.tensor([float("inf"), -float("inf")])], 1.0, params),
                   params)
    assert np.allclose(q, [2.0, -2.0], atol=1 / params.scale)


@pytest.mark.parametrize("bits,clip", [(7, 1.0), (31, 1.0), (16, 0.0), (16, float("nan"))])
def test_bad_parameters(bits: int, clip: float) -> None:
    with pytest.raises(SecAggError):
        QuantParams(bits, clip)


def test_weight_above_one_and_length_mismatch_refused() -> None:
    params = QuantParams(16, 1.0)
    with pytest.raises(SecAggError):
        _quantized([torch.zeros(3)], 1.5, params)
    with pytest.raises(SecAggError):
        quantize_into(np.zeros(4, dtype=np.uint32), [torch.zeros(3)], 1.0, params)
