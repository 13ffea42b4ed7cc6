"""Seeded synthetic 64x64 chest X-ray-like images; pneumonia as focal, lobar or diffuse opacity.

Each film has a body outline, two dark lung fields with vascular texture, a
mediastinum, a heart shadow overlapping the left lung, posterior ribs curving
across the lungs, clavicles, and exposure / position / size / noise variation.
A third of the pneumonia cases have one or two focal round opacities, a third a
lobar consolidation filling the upper or lower part of one lung, a third diffuse
patchy shadowing of both lungs; opacity strength varies down to subtle. Some
normal films carry small symmetric nipple shadows, a classic focal-opacity mimic.
"""

from __future__ import annotations

import numpy as np

from fl_models.imaging import sigmoid, smooth_noise

SIZE = 64
CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia")
PATTERNS: tuple[str, ...] = ("none", "focal", "lobar", "diffuse")
_CHUNK = 256


def generate(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [n, 64, 64], labels int64 [n], pattern index into PATTERNS [n])."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(samples) % 2).astype(np.int64)
    patterns = np.where(labels == 1, rng.integers(1, 4, samples), 0).astype(np.int64)
    images = np.empty((samples, SIZE, SIZE), dtype=np.uint8)
    for start in range(0, samples, _CHUNK):
        part = slice(start, min(samples, start + _CHUNK))
        images[part] = _render(patterns[part], rng)
    return images, labels, patterns


def _col(values: np.ndarray) -> np.ndarray:
    return values[:, None, None]


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx, cy, ax, ay) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Normalised elliptical radius: < 1 inside."""
    return np.hypot((xx - cx) / ax, (yy - cy) / ay)


def _render(patterns: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(patterns)
    u = lambda lo, hi: _col(rng.uniform(lo, hi, n).astype(np.float32))  # noqa: E731
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + np.float32(0.5)
    scale, shift_x, shift_y = u(0.9, 1.08), u(-3, 3), u(-3, 3)
    cx, cy = 32 + shift_x, 33 + shift_y

    body = sigmoid((1 - _ellipse(xx, yy, cx, cy + 4, 29 * scale, 34 * scale)) * 12)
    image = 0.05 + body * u(0.42, 0.55)
    spine = np.exp(-0.5 * ((xx - cx) / (3.2 * scale)) ** 2) * body
    image += 0.18 * spine

    # Lungs: image-left is the patient's right lung (larger); dark, with vessel texture.
    lung_dx = u(10.5, 12.5) * scale
    right = sigmoid((1 - _ellipse(xx, yy, cx - lung_dx, cy - 2, 8.8 * scale, 19 * scale)) * 9)
    left = sigmoid((1 - _ellipse(xx, yy, cx + lung_dx, cy - 3, 8.0 * scale, 18 * scale)) * 9)
    lungs = np.maximum(right, left)
    texture = 0.035 * smooth_noise(rng, n, SIZE, 16) + 0.02 * smooth_noise(rng, n, SIZE, 32)
    image -= lungs * (u(0.28, 0.36) - texture)

    # Heart shadow over the lower medial left lung; its size varies.
    heart = sigmoid(
        (1 - _ellipse(xx, yy, cx + 4 * scale, cy + 9 * scale, u(8.5, 11.5) * scale, 8 * scale)) * 7
    )
    image += 0.22 * heart * lungs + 0.08 * heart

    # Posterior ribs: bright bands sagging towards the sides; clavicles at the top.
    spacing, phase, sag = u(3.6, 4.4) * scale, u(0, 4), u(0.012, 0.02)
    rib_y = (yy - (cy - 20 * scale) - phase) - sag * (xx - cx) ** 2
    ribs = np.exp(-0.5 * ((np.mod(rib_y, spacing) - spacing / 2) / 0.7) ** 2)
    image += 0.07 * ribs * lungs * (rib_y > 0)
    for side in (-1.0, 1.0):
        clavicle_y = cy - 21 * scale + 0.25 * side * (xx - cx) * (-1)
        along = sigmoid((side * (xx - cx) - 2) * 1.0) * sigmoid(
            (18 * scale - side * (xx - cx)) * 1.0
        )
        image += 0.12 * np.exp(-0.5 * ((yy - clavicle_y) / 1.1) ** 2) * along

    # Normal mimic: symmetric nipple shadows on some films.
    nipples = (rng.random(n) < 0.3)[:, None, None]
    for side in (-1.0, 1.0):
        blob = np.exp(
            -((xx - cx - side * lung_dx) ** 2 + (yy - cy - 11 * scale) ** 2) / (2 * 1.6**2)
        )
        image += 0.1 * blob * nipples

    image += _opacities(patterns, rng, xx, yy, cx, cy, lung_dx, scale, right, left)

    # Exposure, contrast, quantum noise.
    image = np.clip(image, 0, 1) ** u(0.8, 1.25) * u(0.85, 1.15)
    image += rng.standard_normal(image.shape, dtype=np.float32) * u(0.015, 0.035)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _opacities(  # type: ignore[no-untyped-def]
    patterns: np.ndarray, rng: np.random.Generator, xx, yy, cx, cy, lung_dx, scale, right, left
) -> np.ndarray:
    """Added density (brighter) inside the lungs, by pattern; zero for normal films."""
    n = len(patterns)
    u = lambda lo, hi: _col(rng.uniform(lo, hi, n).astype(np.float32))  # noqa: E731
    strength = u(0.15, 0.4)
    side = _col(rng.choice([-1.0, 1.0], n).astype(np.float32))
    one_lung = np.where(side < 0, right, left)

    focal = np.zeros_like(xx + cx)
    for _ in range(2):
        fx = cx + side * lung_dx + u(-4, 4) * scale
        fy = cy + u(-12, 12) * scale
        radius = u(2.5, 5.0) * scale
        present = (rng.random(n) < 0.7)[:, None, None] | (
            focal.max(axis=(1, 2), keepdims=True) == 0
        )
        focal = np.maximum(
            focal, present * np.exp(-((xx - fx) ** 2 + (yy - fy) ** 2) / (2 * radius**2))
        )
    focal *= one_lung

    lower = _col(rng.random(n) < 0.6)
    cut = cy + u(-2, 6) * scale
    lobe = np.where(lower, sigmoid((yy - cut) * 0.8), sigmoid((cut - 8 * scale - yy) * 0.8))
    lobar = lobe * one_lung * (0.8 + 0.2 * smooth_noise(rng, n, SIZE, 8))

    patches = sigmoid(smooth_noise(rng, n, SIZE, 8) * 3 - 0.5)
    diffuse = patches * np.maximum(right, left) * 0.8

    shapes = np.stack([np.zeros_like(focal), focal, lobar, diffuse])  # [pattern, n, h, w]
    chosen = shapes[patterns, np.arange(n)]
    return strength * chosen
