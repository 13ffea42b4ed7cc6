"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(P).

P = 2^256 + 297, the smallest prime above 2^256, so every 32-byte secret is a field
element and a share is 33 bytes. Any t shares give the secret back exactly; any
t-1 shares are uniformly distributed whatever the secret (perfect secrecy), which
is what lets a hospital hand a share of its mask key to each neighbour.

The polynomial's coefficients come from the OS's random source; the evaluation
points (x) are the holders' positions in the round, 1..n, never 0.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from fl_core.secagg import SecAggError

PRIME = (1 << 256) + 297
SECRET_BYTES = 32
SHARE_BYTES = 33

NOT_ENOUGH_SHARES = "NOT_ENOUGH_SHARES"
BAD_SHARE = "BAD_SHARE"


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of `secret` for the evaluation points `xs` (distinct, 1 <= x < P)."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(BAD_SHARE, f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    points = list(xs)
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise SecAggError(BAD_SHARE, "evaluation points must be distinct and in 1..P-1")
    if not 1 <= threshold <= len(points):
        raise SecAggError(BAD_SHARE,
                          f"threshold {threshold} must be in 1..{len(points)} (the holders)")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in points:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0).

    Fewer shares raise NOT_ENOUGH_SHARES: with t-1 shares every secret is equally
    likely, so there is nothing to guess from.
    """
    if len(shares) < threshold:
        raise SecAggError(NOT_ENOUGH_SHARES,
                          f"{len(shares)} share(s) held, {threshold} needed to reconstruct")
    points: list[tuple[int, int]] = []
    for x, raw in list(shares.items())[:threshold]:
        if len(raw) != SHARE_BYTES or not 0 < x < PRIME:
            raise SecAggError(BAD_SHARE, f"share at x={x} is malformed")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise SecAggError(BAD_SHARE, f"share at x={x} is not a field element")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        # Inconsistent shares (a corrupted or forged one) interpolate to a value that
        # is no 32-byte secret with overwhelming probability.
        raise SecAggError(BAD_SHARE, "the shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
