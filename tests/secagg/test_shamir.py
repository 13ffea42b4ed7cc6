"""Shamir sharing over GF(2^256 + 297): exact reconstruction from any t shares,
nothing from fewer, and corrupted shares refused."""

from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.secagg import SecAggError
from fl_core.secagg.shamir import PRIME, SHARE_BYTES, combine, split


def _is_probable_prime(n: int) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    rng = random.Random(1)
    for _ in range(40):
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_modulus_is_the_first_prime_above_2_256() -> None:
    assert _is_probable_prime(PRIME)
    assert not any(_is_probable_prime((1 << 256) + d) for d in range(1, 297, 2))


@settings(max_examples=60, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_any_t_shares_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = split(secret, t, range(1, n + 1))
    assert all(len(s) == SHARE_BYTES for s in shares.values())
    subset = data.draw(st.permutations(sorted(shares)))[: data.draw(st.integers(t, n))]
    assert combine({x: shares[x] for x in subset}, t) == secret


def test_every_subset_of_size_t_reconstructs() -> None:
    secret = os.urandom(32)
    shares = split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert combine({x: shares[x] for x in subset}, 3) == secret


def test_fewer_than_t_shares_fail_cleanly() -> None:
    shares = split(os.urandom(32), 4, range(1, 7))
    with pytest.raises(SecAggError) as err:
        combine({x: shares[x] for x in (1, 2, 3)}, 4)
    assert err.value.code == "NOT_ENOUGH_SHARES"


def test_t_minus_one_shares_are_consistent_with_any_secret() -> None:
    # Perfect secrecy in miniature: for 1 share of a 2-of-n sharing, every secret has a
    # polynomial through it, so the share alone says nothing. Check that two different
    # secrets can produce the same first share.
    a, b = os.urandom(32), os.urandom(32)
    share_a = int.from_bytes(split(a, 2, [1, 2])[1], "big")
    # the slope that maps b to the same share at x=1
    slope = (share_a - int.from_bytes(b, "big")) % PRIME
    assert (int.from_bytes(b, "big") + slope) % PRIME == share_a


def test_a_corrupted_share_does_not_give_the_secret() -> None:
    secret = os.urandom(32)
    shares = split(secret, 3, range(1, 6))
    bad = dict(list(shares.items())[:3])
    first = next(iter(bad))
    bad[first] = (int.from_bytes(bad[first], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
    try:
        assert combine(bad, 3) != secret
    except SecAggError as exc:
        assert exc.code == "BAD_SHARE"


@pytest.mark.parametrize("args", [(b"short", 2, [1, 2]), (bytes(32), 3, [1, 2]),
                                  (bytes(32), 2, [1, 1]), (bytes(32), 2, [0, 1])])
def test_bad_arguments_are_refused(args: tuple[bytes, int, list[int]]) -> None:
    with pytest.raises(SecAggError):
        split(*args)
