"""The SecAgg+ protocol states of the hospitals and the server against each other,
in memory: exact sums with dropouts at every stage up to n - t, a clean failure past
that, and an honest hospital refusing a server that swaps a key or asks for both
shares of one hospital."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.secagg import SecAggError
from fl_core.secagg.quantize import QuantParams, dequantize
from fl_proto import secagg_pb2 as spb
from tests.secagg.protocol_harness import Hospital, run


def _hospitals(n: int, length: int = 257, seed: int = 0) -> list[Hospital]:
    gen = torch.Generator().manual_seed(seed)
    return [Hospital(f"h{i}", torch.randn(length, generator=gen),
                     int(torch.randint(1, 100, (1,), generator=gen)), seed=seed * 100 + i)
            for i in range(n)]


def _expected(out_hospitals: list[Hospital], divisor: float) -> np.ndarray:
    total = np.zeros(out_hospitals[0].delta.numel(), dtype=np.uint32)
    for h in out_hospitals:
        if h.uploaded:
            assert h.quantized is not None
            total += h.quantized
    return dequantize(total, QuantParams(24, 4.0), divisor)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(3, 6), data=st.data())
def test_dropouts_up_to_n_minus_t_give_exactly_the_survivors_sum(n: int,
                                                                 data: st.DataObject) -> None:
    hospitals = _hospitals(n, seed=n)
    t = n // 2 + 1  # complete graph: k + 1 = n holders
    drops = data.draw(st.lists(st.sampled_from(["advert", "share", "upload"]),
                               max_size=n - t))
    for h, stage in zip(hospitals[1:], drops, strict=False):
        h.drop_before = stage
    out = run(hospitals)
    assert out.error is None, out.error
    assert all(h.error is None for h in hospitals)
    result = out.result
    assert sorted(result.survivors) == sorted(h.cid for h in hospitals if h.uploaded)  # type: ignore[attr-defined]
    got = result.sums["w"].numpy()  # type: ignore[attr-defined]
    # bit-exact: the unmasked sum is the sum of the survivors' quantized inputs
    assert np.array_equal(got, _expected(hospitals, out.server.divisor).astype(np.float32))
    # and within the stated bound of the example-weighted sum of the float updates
    exact = sum(h.examples * np.clip(h.delta.numpy().astype(np.float64), -4, 4)
                for h in hospitals if h.uploaded)
    bound = QuantParams(24, 4.0).error_bound(len(result.survivors)) * out.server.divisor  # type: ignore[attr-defined]
    assert np.all(np.abs(got - exact) <= bound * 1.001 + 1e-3 * np.abs(exact))
    # hospitals that vanished were reported as dropped
    assert {c for c, _ in out.drops} == {h.cid for h in hospitals
                                          if h.drop_before in ("advert", "share")}


def test_a_hospital_lost_after_its_masked_input_is_summed_from_its_rebuilt_seed() -> None:
    hospitals = _hospitals(5, seed=3)
    hospitals[3].drop_before = "reveal"  # sent its masked input, then vanished
    out = run(hospitals)
    assert out.error is None
    # a hospital that uploaded is a survivor even if it does not reveal
    assert "h3" in out.result.survivors  # type: ignore[attr-defined]


def test_more_than_n_minus_t_dropouts_fail_cleanly() -> None:
    hospitals = _hospitals(5, seed=4)
    for h in hospitals[2:]:
        h.drop_before = "reveal"  # 3 of 5 do not reveal: only 2 < t = 3 shares
    out = run(hospitals)
    assert out.result is None and out.error is not None
    assert out.error.code == "NOT_ENOUGH_SHARES"
    with pytest.raises(SecAggError):  # and never a second unmask of this attempt
        out.server.unmask()


def test_hospitals_refuse_to_send_a_masked_input_when_too_few_holders_remain() -> None:
    hospitals = _hospitals(5, seed=5)
    for h in hospitals[2:]:
        h.drop_before = "share"  # only 2 shared: below t = 3
    out = run(hospitals)
    assert out.result is None
    assert out.server.stage == "failed"
    assert not any(h.uploaded for h in hospitals)


def test_a_swapped_public_key_is_refused_by_every_honest_hospital() -> None:
    hospitals = _hospitals(4, seed=6)
    evil = spb.KeyAdvert()

    def swap(receiver: str, reply: spb.AdvertiseKeysReply) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        for advert in reply.adverts:
            if advert.client_id == "h0" and receiver != "h0":
                evil.CopyFrom(advert)
                advert.mask_public_key = X25519PrivateKey.generate().public_key() \
                    .public_bytes_raw()

    out = run(hospitals, tamper_adverts=swap)
    for h in hospitals[1:]:
        assert isinstance(h.error, SecAggError) and h.error.code == "KEY_SUBSTITUTED", h.error
        assert not h.uploaded
    assert out.result is None


def test_the_server_relaying_a_hospitals_own_advert_altered_is_caught() -> None:
    hospitals = _hospitals(3, seed=7)

    def alter_own(receiver: str, reply: spb.AdvertiseKeysReply) -> None:
        for advert in reply.adverts:
            if advert.client_id == receiver == "h1":
                advert.share_public_key = bytes(32)

    run(hospitals, tamper_adverts=alter_own)
    assert isinstance(hospitals[1].error, SecAggError)
    assert hospitals[1].error.code == "KEY_SUBSTITUTED"


def test_a_request_for_both_shares_of_one_hospital_is_refused() -> None:
    hospitals = _hospitals(4, seed=8)

    def both(receiver: str, request: spb.UnmaskRequest) -> None:
        request.dropped.append("h2")  # h2 is also a survivor

    out = run(hospitals, tamper_unmask=both)
    assert all(isinstance(h.error, SecAggError) and h.error.code == "BAD_UNMASK"
               for h in hospitals)
    assert out.result is None and out.error is not None


def test_a_hospital_answers_one_unmask_request_only() -> None:
    hospitals = _hospitals(3, seed=9)
    out = run(hospitals)
    assert out.error is None
    session = hospitals[0].session
    assert session is not None
    with pytest.raises(SecAggError) as err:
        session.on_unmask(spb.UnmaskRequest(survivors=["h0", "h1"], dropped=["h2"]))
    assert err.value.code == "BAD_UNMASK"


def test_equal_weights_sum_the_clipped_updates() -> None:
    hospitals = _hospitals(3, seed=10)
    out = run(hospitals, equal=True)
    assert out.error is None
    got = out.result.sums["w"].numpy()  # type: ignore[attr-defined]
    exact = sum(np.clip(h.delta.numpy(), -4, 4) for h in hospitals)
    assert np.allclose(got, exact, atol=3 * 3 * 4 / 2**23)
    assert out.result.weight_total == 3.0  # type: ignore[attr-defined]


def test_adaptive_clipping_gets_the_securely_summed_unclipped_count() -> None:
    """dp_fedavg's adaptive clip under secure aggregation: each hospital clips to the
    round's L2 clip and appends its bit [norm <= clip] to the masked vector; the
    server reads only the count from the unmasked sum, and the strategy moves its clip
    with it (issue 13 item 4)."""
    from fl_server.strategies.dp_fedavg import DPFedAvg

    gen = torch.Generator().manual_seed(11)
    norms = [0.3, 0.9, 2.5, 7.0, 0.5]  # three fit under the clip of 1
    hospitals = []
    for i, norm in enumerate(norms):
        d = torch.randn(300, generator=gen, dtype=torch.float64)
        hospitals.append(Hospital(f"h{i}", (d * (norm / d.norm())).float(), 10, seed=40 + i))
    hospitals[4].drop_before = "upload"  # shared its keys, then vanished: not counted
    out = run(hospitals, equal=True, l2_clip=1.0, count_unclipped=True)
    assert out.error is None, out.error
    assert out.server.config().count_unclipped
    result = out.result
    assert result.unclipped == 2.0  # type: ignore[attr-defined]  # h0, h1 of the 4 survivors
    clipped = torch.stack([h.delta.double() * min(1.0, 1.0 / float(h.delta.double().norm()))
                           for h in hospitals[:4]]).sum(0)
    got = result.sums["w"].double()  # type: ignore[attr-defined]
    assert torch.allclose(got, clipped, atol=4 * 4 * 4 / 2**23)
    # the same unmasking into the strategy moves its clip by the released fraction
    strategy = DPFedAvg(clip=1.0, noise_multiplier=1e-9, target_quantile=0.9,
                        count_noise=1e-9)
    strategy.begin_round({"w": torch.zeros(300)})
    strategy.accept_sum(result.survivors, result.sums, result.weight_total,  # type: ignore[attr-defined]
                        unclipped_count=result.unclipped)  # type: ignore[attr-defined]
    strategy.finish_round()
    assert strategy.last_fraction == pytest.approx(0.5)
    assert strategy.bound == pytest.approx(math.exp(-0.2 * (0.5 - 0.9)))  # it grows


def test_a_round_without_adaptive_clipping_sends_no_count_word() -> None:
    hospitals = _hospitals(3, seed=12)
    out = run(hospitals, equal=True, l2_clip=1.0)
    assert out.error is None
    assert out.result.unclipped is None  # type: ignore[attr-defined]
    assert all(h.quantized is not None and h.quantized.size == 257 for h in hospitals)


def test_unmasking_closes_once_t_shares_of_every_secret_are_in() -> None:
    """A survivor that never reveals does not hold the round up to the stage timeout:
    t of each secret's k + 1 shares suffice, and the sum is still exact."""
    import time

    hospitals = _hospitals(5, seed=13)
    hospitals[2].drop_before = "reveal"
    started = time.monotonic()
    out = run(hospitals, timeout=30.0)
    assert out.error is None, out.error
    assert time.monotonic() - started < 15  # not the 30 s stage timeout
    assert sorted(out.result.survivors) == [h.cid for h in hospitals]  # type: ignore[attr-defined]
