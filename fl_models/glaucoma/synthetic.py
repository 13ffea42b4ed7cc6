"""Seeded synthetic 64x64 colour fundus photographs, glaucoma from the cup-to-disc ratio.

Each image has a circular field of view, an orange-red retina with vignetting and
blotchy texture, a darker macula, an optic disc (bright, yellowish, of varying size
and position, left or right eye) holding a paler cup, and vessels leaving the disc.
The label is the clinical rule: glaucoma when the vertical cup-to-disc ratio (vCDR)
exceeds about 0.6. Normal eyes draw vCDR from 0.2-0.58, glaucomatous ones from
0.62-0.9; disc size varies by 45%, so the cup's absolute size alone does not
decide, and the ratio must be judged at a few pixels' resolution.
"""

from __future__ import annotations

import numpy as np

from fl_models.imaging import sigmoid, smooth_noise

SIZE = 64
CLASS_NAMES: tuple[str, ...] = ("normal", "glaucoma")
NORMAL_VCDR = (0.2, 0.58)
GLAUCOMA_VCDR = (0.62, 0.9)
_CHUNK = 256
_VESSELS = 6


def generate(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [n, 64, 64, 3], labels int64 [n], vertical CDR float [n])."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(samples) % 2).astype(np.int64)
    vcdr = np.where(
        labels == 1, rng.uniform(*GLAUCOMA_VCDR, samples), rng.uniform(*NORMAL_VCDR, samples)
    )
    images = np.empty((samples, SIZE, SIZE, 3), dtype=np.uint8)
    for start in range(0, samples, _CHUNK):
        part = slice(start, min(samples, start + _CHUNK))
        images[part] = _render(vcdr[part].astype(np.float32), rng)
    return images, labels, vcdr


def _col(values: np.ndarray) -> np.ndarray:
    return values[:, None, None]


def _render(vcdr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(vcdr)
    u = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)  # noqa: E731
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + np.float32(0.5)
    centre = SIZE / 2

    # Field of view and retina background.
    fov_x, fov_y, fov_r = (
        _col(centre + u(-1.5, 1.5)),
        _col(centre + u(-1.5, 1.5)),
        _col(u(28, 31.5)),
    )
    rho = np.hypot(xx - fov_x, yy - fov_y) / fov_r
    fov = sigmoid((1 - rho) * 40)
    base = np.stack([u(0.65, 0.85), u(0.25, 0.4), u(0.08, 0.18)], axis=1) * u(0.75, 1.1)[:, None]
    shade = (
        1
        - 0.35 * rho**2
        + 0.06 * smooth_noise(rng, n, SIZE, 8)
        + 0.03 * smooth_noise(rng, n, SIZE, 16)
    )
    rgb = base[:, None, None, :] * shade[..., None]

    # Optic disc (left or right of centre), macula on the other side.
    side = _col(rng.choice([-1.0, 1.0], n))
    disc_x, disc_y = centre + side * _col(u(11, 16)), _col(centre + u(-4, 4))
    disc_rv = _col(u(6.5, 9.5))
    disc_rh = disc_rv * _col(u(0.85, 1.0))
    macula = np.exp(
        -(
            ((xx - (centre - side * u(2, 6)[:, None, None])) ** 2 + (yy - disc_y) ** 2)
            / (2 * 5.0**2)
        )
    )
    rgb *= (1 - 0.2 * macula)[..., None]

    # Vessels: arcades leaving the disc steeply up and down and bending towards the
    # macula (temporal), plus shorter nasal branches; thinner with distance.
    dx, dy = xx - disc_x, yy - disc_y
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    vessels = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for k in range(_VESSELS):
        upward = -1.0 if k % 2 == 0 else 1.0
        temporal = k < 4
        x_dir = -side if temporal else side
        if temporal:
            alpha = np.clip(_col(u(1.1, 1.45)) - _col(u(0.025, 0.04)) * r, 0.2, None)
        else:
            alpha = _col(u(0.4, 1.0)) + 0.0 * r
        alpha = alpha + _col(u(-0.06, 0.06)) * np.sin(r / _col(u(3, 6)))
        path = np.arctan2(upward * np.sin(alpha), x_dir * np.cos(alpha))
        delta = (theta - path + np.pi) % (2 * np.pi) - np.pi
        width = _col(u(0.7, 1.1)) * (1.2 - 0.5 * np.clip(r / 30, 0, 1))
        reach = np.where(temporal, 40.0, _col(u(12, 22)))
        line = np.exp(-0.5 * (r * delta / width) ** 2) * (np.abs(delta) < 1.0) * (r < reach)
        vessels = np.maximum(vessels, line * sigmoid((r - 0.4 * disc_rv) * 2))
    rgb *= (1 - 0.4 * vessels)[..., None] * np.array([0.95, 0.82, 0.82], dtype=np.float32)

    # Disc and cup (elliptical, soft rims); the cup is paler, its contrast varies.
    disc_rho = np.hypot(dx / disc_rh, dy / disc_rv)
    disc = sigmoid((1 - disc_rho) * 10)
    disc_colour = np.stack([u(0.9, 1.0), u(0.65, 0.8), u(0.35, 0.5)], axis=1)[:, None, None, :]
    rgb = rgb * (1 - disc[..., None]) + disc_colour * disc[..., None] * (
        1 - 0.2 * vessels[..., None]
    )
    cup_rv = disc_rv * _col(vcdr)
    cup_rh = cup_rv * _col(u(0.75, 1.0))
    cup_x = disc_x + side * _col(u(-0.1, 0.15)) * disc_rh
    cup = sigmoid((1 - np.hypot((xx - cup_x) / cup_rh, dy / cup_rv)) * 10) * _col(u(0.7, 1.0))
    cup_colour = np.array([1.0, 0.95, 0.8], dtype=np.float32)
    rgb = rgb * (1 - cup[..., None]) + cup_colour * cup[..., None]

    # Exposure, per-channel colour cast, sensor noise, black outside the field of view.
    rgb = np.clip(rgb, 0, 1) ** _col(u(0.85, 1.15))[..., None] * rng.uniform(
        0.9, 1.1, (n, 1, 1, 3)
    ).astype(np.float32)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * _col(u(0.01, 0.03))[..., None]
    rgb = rgb * fov[..., None] + 0.02 * (1 - fov[..., None])
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
