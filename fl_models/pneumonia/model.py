"""The pneumonia network: fixed scattering features of the film, fixed feature scaling
from public films, then a linear classifier (issue 13).

Pneumonia shows as opacity in the dark lung fields: one or two round focal shadows,
a lobe filled in, or diffuse patchy shadowing. The front end
(`fl_models/fixed_features.py`, `GaborScattering`) describes the film (standardised
per film: exposure varies more than a subtle opacity) by its local mean and the
moduli of Morlet filter responses at 6 orientations on 4 pyramid levels (rib and
vessel edges at 1-2 px, a focal opacity at 2-5 px, a lobe at 8-16 px), each averaged
over a 4 x 4 grid of 16 px cells: chest films are taken in a standard position, so
which cell a response falls in says which part of which lung it is in. 25 maps x 16
cells = 400 features. No parameters: arithmetic on the film, identical at every
hospital and the server.

Each feature is then standardised with constants from public films
(`scale_constants.py`: PUBLIC_IMAGES films the task's own generator draws at
PUBLIC_SEED, which no split uses; never a hospital's), and one zero-initialised
Linear layer gives the 2 logits: 802 trained parameters (the narrow CNN before it,
3,674, reached 0.742 at epsilon 8: README.md). For real films, recompute the
constants from public ones (e.g. a public Kermany subset) with
`python -m fl_models.fixed_features pneumonia --images FOLDER`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fl_models.fixed_features import GaborScattering, feature_scale, linear_on
from fl_models.pneumonia import scale_constants
from fl_models.pneumonia.synthetic import CLASS_NAMES

LEVELS = 4
ORIENTATIONS = 6
GRID = 4
# Public films for the fixed scaling: the generator at a seed no split uses.
PUBLIC_IMAGES = 1000
PUBLIC_SEED = 987654


def front_end() -> GaborScattering:
    return GaborScattering(1, levels=LEVELS, orientations=ORIENTATIONS, grid=GRID)


FEATURES = front_end().out_features


def public_feature_scale(images: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """The constants in `scale_constants.py`: from PUBLIC_IMAGES generated films, or
    from `images` (uint8 [n, 64, 64], public ones of another kind)."""
    from fl_models.pneumonia.synthetic import generate

    if images is None:
        images = generate(PUBLIC_IMAGES, PUBLIC_SEED)[0]
    inputs = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    return feature_scale(front_end(), inputs)


def build_model() -> nn.Module:
    return linear_on(front_end(), FEATURES, scale_constants.MEAN, scale_constants.SCALE,
                     len(CLASS_NAMES))
