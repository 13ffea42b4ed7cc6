"""A reference differential-privacy accountant for the tests, written from the
published formulas rather than taken from Opacus (which the code under test uses),
so an epsilon the code reports can be checked against an independent figure."""

from __future__ import annotations

import math


class StepAccountant:
    """An RDP accountant written here from the formulas, not from Opacus. The sampled
    Gaussian mechanism's log-moment at integer order a (Mironov, Talwar & Zhang 2019,
    "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3) is

        log A_a = log sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2)),

    RDP(a) = log A_a / (a - 1); rounds add their log-moments, and an order converts
    to (epsilon, delta) by Balle et al. 2020 (Thm. 21) / Canonne, Kamath & Steinke 2020:

        epsilon(a) = RDP(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1).

    `upper` is the best integer order (a valid guarantee, so a correct accountant
    reports no more). `lower` is what no order a > 1, fractional ones included, can
    beat: log A_a is convex in a (a log moment-generating function, with log A_0 =
    log A_1 = 0), so between integers it lies above the extended chords of its
    neighbouring integer intervals.
    """

    MAX_ORDER = 63  # Opacus's largest order too: its RDP figure is never above `upper`

    def __init__(self) -> None:
        self.log_moments = [0.0] * (self.MAX_ORDER + 2)  # orders 0 .. MAX_ORDER + 1

    @staticmethod
    def _log_a(q: float, sigma: float, a: int) -> float:
        terms = [math.log(math.comb(a, k)) + k * math.log(q)
                 + (a - k) * (math.log1p(-q) if q < 1.0 else 0.0)
                 + (k * k - k) / (2 * sigma**2)
                 for k in range(a + 1) if q < 1.0 or k == a]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))

    def step(self, q: float, sigma: float, steps: int = 1) -> None:
        for a in range(len(self.log_moments)):
            self.log_moments[a] += steps * self._log_a(q, sigma, a)

    @staticmethod
    def _epsilon(log_moment: float, a: float, delta: float) -> float:
        return (log_moment / (a - 1) + math.log1p(-1 / a)
                - (math.log(delta) + math.log(a)) / (a - 1))

    def upper(self, delta: float) -> float:
        return min(self._epsilon(self.log_moments[a], a, delta)
                   for a in range(2, self.MAX_ORDER + 1))

    def lower(self, delta: float) -> float:
        m = self.log_moments
        best = math.inf
        for n in range(1, self.MAX_ORDER):
            for a in (n + k / 50 for k in range(1 if n == 1 else 0, 50)):
                chord = max(m[n] + (a - n) * (m[n] - m[n - 1]),
                            m[n + 1] - (n + 1 - a) * (m[n + 2] - m[n + 1]))
                best = min(best, self._epsilon(chord, a, delta))
        return best
