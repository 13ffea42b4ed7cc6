"""Seeded synthetic 10 s single-lead ECG windows at 100 Hz: normal sinus, AF, PVC.

Each beat is an ECGSYN-style sum of Gaussians (P, Q, R, S, T) placed at beat times,
so the classes differ only where the physiology does:

* normal sinus rhythm: regular RR with a mild respiratory sinus arrhythmia, P waves;
* atrial fibrillation: irregularly irregular RR, no P waves, 4-9 Hz fibrillatory waves;
* premature ventricular beats: a sinus rhythm in which 1-3 beats come early as wide,
  tall QRS complexes without a P wave and with a discordant T wave, followed by a
  compensatory pause (the next sinus beat keeps its schedule).

Nuisances shared by all classes (heart rate, amplitude, morphology jitter, baseline
wander, noise) keep the task from being solved by any single easy statistic. The
generator returns beat times and symbols too, so windows can be written as real
WFDB records with annotations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FS = 100  # Hz
SECONDS = 10
LENGTH = FS * SECONDS
CLASS_NAMES: tuple[str, ...] = ("normal", "af", "pvc")
NORMAL, AF, PVC = 0, 1, 2
_MAX_BEATS = 32  # beats from -1 s to +11 s at up to 150 bpm

# Sinus beat waves P, Q, R, S, T: (time offset from R in s, amplitude in mV, width in s).
_SINUS_WAVES = np.array(
    [
        (-0.20, 0.15, 0.025),
        (-0.035, -0.12, 0.010),
        (0.0, 1.00, 0.012),
        (0.035, -0.25, 0.012),
        (0.28, 0.30, 0.055),
    ]
)


@dataclass(frozen=True)
class EcgBatch:
    """Windows in millivolts, labels, and per-window beat times (s) and symbols."""

    signals: np.ndarray  # float64 [n, LENGTH]
    labels: np.ndarray  # int64 [n]
    beat_times: list[np.ndarray]  # R-peak times inside [0, SECONDS)
    beat_symbols: list[list[str]]  # "N" or "V", one per beat time


def generate(samples: int, seed: int) -> EcgBatch:
    """`samples` windows, classes as balanced as the count allows, deterministic by seed."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(samples) % len(CLASS_NAMES)).astype(np.int64)
    times, waves, symbols = _beats(labels, rng)
    signals = _render(times, waves)
    signals += _nuisance(labels, rng)
    inside = (times >= 0) & (times < SECONDS)
    beat_times = [times[i][inside[i]] for i in range(samples)]
    beat_symbols = [list(symbols[i][inside[i]]) for i in range(samples)]
    return EcgBatch(signals, labels, beat_times, beat_symbols)


def _render(times: np.ndarray, waves: np.ndarray) -> np.ndarray:
    """Sum every Gaussian wave into its window.

    A Gaussian is ~0 beyond 4 widths, so each wave is drawn only on the samples near
    its centre (narrow and wide waves with different reaches) and accumulated with
    one bincount: ~20x faster than a dense [windows, beats, waves, samples] array.
    """
    n = times.shape[0]
    window = np.repeat(np.arange(n), times.shape[1] * waves.shape[2])
    centres = (times[:, :, None] + waves[..., 0]).ravel()
    amps, widths = waves[..., 1].ravel(), waves[..., 2].ravel()
    live = (amps != 0) & (centres > -0.5) & (centres < SECONDS + 0.5)
    out = np.zeros(n * LENGTH)
    for narrow in (True, False):
        pick = live & ((widths <= 0.02) if narrow else (widths > 0.02))
        reach = int(np.ceil(4.5 * widths[pick].max() * FS)) if pick.any() else 0
        c, a, w = centres[pick], amps[pick], widths[pick]
        index = np.rint(c * FS).astype(np.int64)[:, None] + np.arange(-reach, reach + 1)
        values = a[:, None] * np.exp(-0.5 * ((index / FS - c[:, None]) / w[:, None]) ** 2)
        inside = (index >= 0) & (index < LENGTH)
        flat = (window[pick][:, None] * LENGTH + index)[inside]
        out += np.bincount(flat, weights=values[inside], minlength=n * LENGTH)
    return out.reshape(n, LENGTH)


def _beats(
    labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beat times [n, B], wave parameters [n, B, 5, 3] and symbols [n, B]."""
    n = len(labels)
    af, pvc = labels == AF, labels == PVC
    rate = np.where(af, rng.uniform(65, 140, n), rng.uniform(50, 100, n))  # bpm
    mean_rr = 60.0 / rate
    k = np.arange(_MAX_BEATS)
    # Sinus: respiratory modulation (0.15-0.4 Hz, up to 6%) and 2% jitter; AF: RR spread +-35%.
    resp = rng.uniform(0.0, 0.06, n)[:, None] * np.sin(
        2 * np.pi * rng.uniform(0.15, 0.4, n)[:, None] * k * mean_rr[:, None]
        + rng.uniform(0, 2 * np.pi, n)[:, None]
    )
    sinus_rr = mean_rr[:, None] * (1 + resp + rng.normal(0, 0.02, (n, _MAX_BEATS)))
    af_rr = mean_rr[:, None] * rng.uniform(0.62, 1.38, (n, _MAX_BEATS))
    rr = np.where(af[:, None], af_rr, sinus_rr)
    times = np.cumsum(rr, axis=1) - rng.uniform(1.0, 1.0 + mean_rr)[:, None]

    waves = np.broadcast_to(_SINUS_WAVES, (n, _MAX_BEATS, 5, 3)).copy()
    # Per-recording morphology: amplitudes +-25%, timings +-10%; QT stretches with RR.
    waves[..., 1] *= rng.uniform(0.75, 1.25, (n, 1, 5))
    waves[..., 0] *= rng.uniform(0.9, 1.1, (n, 1, 5))
    waves[..., 4, 0] *= np.sqrt(mean_rr)[:, None] / np.sqrt(0.8)
    waves[af, :, 0, 1] = 0.0  # no P wave in AF
    symbols = np.full((n, _MAX_BEATS), "N", dtype="<U1")

    for i in np.flatnonzero(pvc):
        inside = np.flatnonzero((times[i] > 0.3) & (times[i] < SECONDS - 0.3))
        count = min(len(inside), int(rng.integers(1, 4)))
        for b in rng.choice(inside, size=count, replace=False):
            previous = times[i, b - 1]
            times[i, b] = previous + rng.uniform(0.55, 0.72) * (times[i, b] - previous)
            polarity = rng.choice([-1.0, 1.0])
            waves[i, b] = [
                (-0.2, 0.0, 0.025),  # no P wave
                (-0.05, -0.1 * polarity, 0.02),
                (0.0, polarity * rng.uniform(1.0, 1.8), rng.uniform(0.032, 0.05)),
                (0.07, -0.3 * polarity, 0.03),
                (0.33, -polarity * rng.uniform(0.3, 0.5), 0.08),  # discordant T
            ]
            symbols[i, b] = "V"
    return times, waves, symbols


def _nuisance(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fibrillatory waves (AF only), gain, baseline wander and noise, in mV."""
    n = len(labels)
    t = np.arange(LENGTH) / FS
    fib = np.zeros((n, LENGTH))
    for _ in range(3):
        freq = rng.uniform(4, 9, (n, 1))
        wobble = np.sin(2 * np.pi * rng.uniform(0.1, 0.5, (n, 1)) * t)
        drift = rng.uniform(-0.3, 0.3, (n, 1)) * wobble
        fib += rng.uniform(0.01, 0.04, (n, 1)) * np.sin(
            2 * np.pi * (freq + drift) * t + rng.uniform(0, 2 * np.pi, (n, 1))
        )
    fib *= (labels == AF)[:, None]
    gain = rng.uniform(0.5, 1.5, (n, 1))
    wander = rng.uniform(0, 0.3, (n, 1)) * np.sin(
        2 * np.pi * rng.uniform(0.05, 0.5, (n, 1)) * t + rng.uniform(0, 2 * np.pi, (n, 1))
    )
    noise = rng.normal(0, 1, (n, LENGTH)) * rng.uniform(0.01, 0.05, (n, 1))
    return fib * gain + wander + noise
