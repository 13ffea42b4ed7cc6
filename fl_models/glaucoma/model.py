"""The glaucoma network: fixed scattering features of the photograph, fixed feature
scaling from public images, then a linear classifier (issue 13).

Glaucoma shows as a large pale cup inside the yellowish optic disc (vertical
cup-to-disc ratio above ~0.6). The front end (`fl_models/fixed_features.py`,
`GaborScattering`) describes each colour channel by its mean and the moduli of
Morlet filter responses at 6 orientations on 3 pyramid levels (edges of vessels and
of the cup and disc rims at 1-2 px, the disc itself at 4-8 px), each averaged over
the whole image and also taken at its maximum: the disc sits left or right of centre
(left or right eye), so where a response occurs is dropped and how much and how
strongly kept. 3 x 19 maps x (mean, max) = 114 features. No parameters: arithmetic
on the image, identical at every hospital and the server.

Each feature is then standardised with constants from public images (`scale_constants.py`:
PUBLIC_IMAGES photographs the task's own generator draws at PUBLIC_SEED, which no split
uses; never a hospital's), and one zero-initialised Linear layer gives the 2 logits:
230 trained parameters, against 60,946 in the CNN it replaces, whose DP accuracy was
0.652 at epsilon 8 (README.md has the figures). For real fundus photographs,
recompute the constants from public ones (`feature_scale` on e.g. a public REFUGE
subset) with `python -m fl_models.fixed_features glaucoma --images FOLDER`.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from fl_models.fixed_features import GaborScattering, feature_scale, linear_on
from fl_models.glaucoma import scale_constants
from fl_models.glaucoma.synthetic import CLASS_NAMES

LEVELS = 3
ORIENTATIONS = 6
# Public photographs for the fixed scaling: the generator at a seed no split uses.
PUBLIC_IMAGES = 300
PUBLIC_SEED = 987654


def front_end() -> GaborScattering:
    return GaborScattering(3, levels=LEVELS, orientations=ORIENTATIONS, grid=1, global_max=True)


FEATURES = front_end().out_features


def public_feature_scale(images: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """The constants in `scale_constants.py`: from PUBLIC_IMAGES generated photographs,
    or from `images` (uint8 [n, 64, 64, 3], public ones of another kind)."""
    from fl_models.glaucoma.dataset import to_tensors
    from fl_models.glaucoma.synthetic import generate

    if images is None:
        images = generate(PUBLIC_IMAGES, PUBLIC_SEED)[0]
    inputs = to_tensors(images, np.zeros(len(images), dtype=np.int64)).tensors[0]
    return feature_scale(front_end(), inputs)


def build_model() -> nn.Module:
    return linear_on(front_end(), FEATURES, scale_constants.MEAN, scale_constants.SCALE,
                     len(CLASS_NAMES))
