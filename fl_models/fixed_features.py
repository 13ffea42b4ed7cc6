"""Fixed feature front ends for DP training: no trainable parameter before one Linear layer.

Why (issue 13): DP-SGD's noise grows with the number of trained parameters and its
clipping with how badly the features are conditioned, while a hospital's few hundred
examples pay for only a few dozen noisy steps. A fixed, hand-designed front end with a
linear classifier on top beats end-to-end networks under DP at this data size (Tramer &
Boneh, "Differentially private learning needs better features (or much more data)",
ICLR 2021: ScatterNet + linear); the linear head's loss is convex, so few, large,
noisy steps go straight to the optimum, and fl_client/linear_dp.py computes its
clipped per-example gradients in closed form.

- `GaborScattering`: for images, a first-order scattering transform written in torch
  (kymatio is not a dependency): each channel's image (standardised per image, which
  removes exposure and contrast) and the modulus of its responses to complex Morlet
  (Gabor) filters at `orientations` angles, applied to each level of a 2x average-pool
  pyramid (so level j sees structures 2^j times larger: vessels and cup rims at level
  0, the disc or a lobe at level 2-3), each map averaged over a `grid` x `grid` of
  cells, optionally with its maximum over the image too. The modulus makes the
  features stable to small shifts and deformations; the local averages keep where
  things are (a chest film's anatomy is aligned) or, with grid 1 and the maximum,
  drop it (a fundus photograph's disc sits left or right). Generic: edges, blobs and
  textures at a few scales, nothing tuned to any data set.
- `FixedScale`: each feature standardised with a mean and scale that are buffers, not
  trained, not sent, not averaged, computed from PUBLIC examples (for the synthetic
  tasks: the task's own generator at a seed no split uses), never a hospital's data,
  so they cost no privacy. Without them the features' ranges differ by orders of
  magnitude and a few clipped, noisy steps cannot condition the head.
"""

from __future__ import annotations

import argparse
import importlib
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CHUNK = 256  # images per pass of the filter bank: bounds memory on a full-batch step
KERNEL = 7  # filter support in pixels (the Morlet envelope's sigma is 0.8 px)
SIGMA = 0.8
XI = 3 * math.pi / 4  # the filters' centre frequency (radians per pixel) at level 0


def morlet_kernels(orientations: int, sigma: float = SIGMA, xi: float = XI,
                   size: int = KERNEL) -> torch.Tensor:
    """[2 * orientations, 1, size, size]: the real and imaginary parts of zero-mean
    Morlet wavelets at angles pi * l / orientations, each with unit L1 norm."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    kernels = []
    for index in range(orientations):
        angle = math.pi * index / orientations
        wave = torch.exp(1j * xi * (xx * math.cos(angle) + yy * math.sin(angle)))
        # subtract the envelope's share so each filter ignores flat regions
        psi = envelope * (wave - (envelope * wave).sum() / envelope.sum())
        psi = psi / psi.abs().sum()
        kernels += [psi.real, psi.imag]
    return torch.stack(kernels).float()[:, None]


class GaborScattering(nn.Module):
    """[n, channels, size, size] images -> [n, out_features]; no parameters (see the
    module docstring). `levels` pyramid levels, `orientations` filters at each."""

    kernels: torch.Tensor

    def __init__(self, channels: int, levels: int = 3, orientations: int = 6,
                 grid: int = 1, global_max: bool = False) -> None:
        super().__init__()
        if levels < 1 or orientations < 1 or grid < 1:
            raise ValueError("levels, orientations and grid must be >= 1")
        self.channels, self.levels, self.orientations = channels, levels, orientations
        self.grid, self.global_max = grid, global_max
        self.register_buffer("kernels", morlet_kernels(orientations), persistent=False)

    @property
    def out_features(self) -> int:
        maps = self.channels * (1 + self.levels * self.orientations)
        return maps * (self.grid**2 + (1 if self.global_max else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) <= CHUNK:
            return self._features(x)
        return torch.cat([self._features(part) for part in x.split(CHUNK)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (std + 1e-5)
        pooled = [self._pool(x)]
        level = x.reshape(n * c, 1, h, w)
        pad = self.kernels.shape[-1] // 2
        for index in range(self.levels):
            if index:
                level = F.avg_pool2d(level, 2)
            mode = "reflect" if min(level.shape[-2:]) > pad else "replicate"
            response = F.conv2d(F.pad(level, (pad,) * 4, mode=mode), self.kernels)
            size = response.shape[-2:]
            response = response.reshape(n * c, self.orientations, 2, *size)
            modulus = (response.square().sum(dim=2) + 1e-8).sqrt()
            pooled.append(self._pool(modulus.reshape(n, c * self.orientations, *size)))
        return torch.cat(pooled, dim=1)

    def _pool(self, maps: torch.Tensor) -> torch.Tensor:
        parts = [F.adaptive_avg_pool2d(maps, self.grid).flatten(1)]
        if self.global_max:
            parts.append(maps.amax(dim=(2, 3)))
        return torch.cat(parts, dim=1)


class FixedScale(nn.Module):
    """(x - mean) / scale per feature, with constants that are not trained, not sent
    and not averaged (non-persistent buffers: every party builds the same ones)."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("scale", scale.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def feature_scale(front: nn.Module, inputs: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-feature mean and standard deviation (at least 1e-3) of `front`'s output over
    `inputs`, rounded to 6 significant digits: how each task's constants file is made,
    and how a site would recompute them from public examples of its own kind."""
    with torch.no_grad():
        features = front(inputs)
    mean = features.mean(dim=0)
    scale = features.std(dim=0).clamp_min(1e-3)
    return [float(f"{v:.6g}") for v in mean], [float(f"{v:.6g}") for v in scale]


def linear_on(front: nn.Module, features: int, mean: Sequence[float], scale: Sequence[float],
              classes: int) -> nn.Sequential:
    """front -> FixedScale(mean, scale) -> one zero-initialised Linear layer: the only
    trained (and sent) tensors are the head's weight and bias. Zero start: the loss
    is convex, and a random start is one more error for the noisy steps to undo."""
    if len(mean) != features or len(scale) != features:
        raise ValueError(f"expected {features} scaling constants, got {len(mean)} / {len(scale)}")
    head = nn.Linear(features, classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(front, FixedScale(torch.tensor(mean), torch.tensor(scale)), head)


def write_constants(path: Path, doc: str, mean: Sequence[float], scale: Sequence[float]) -> None:
    """A generated constants module (MEAN and SCALE tuples) with `doc` as its docstring."""

    def block(name: str, values: Sequence[float]) -> str:
        items = [repr(v) for v in values]
        lines, line = [], "   "
        for item in items:
            if len(line) + len(item) + 2 > 92:
                lines.append(line)
                line = "   "
            line += f" {item},"
        lines.append(line)
        return f"{name}: tuple[float, ...] = (\n" + "\n".join(lines) + "\n)\n"

    text = f'"""{doc.strip()}\n"""\n\n' + block("MEAN", mean) + "\n" + block("SCALE", scale)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Rewrite a task's scale_constants.py from public images: the generator's at the
    task's public seed, or those in --images (class folders, e.g. a public collection
    of the hospitals' kind of photograph or film)."""
    parser = argparse.ArgumentParser(prog="python -m fl_models.fixed_features",
                                     description=main.__doc__)
    parser.add_argument("task", choices=("glaucoma", "pneumonia"))
    parser.add_argument("--images", type=Path, help="class folders of public images")
    parser.add_argument("--out", type=Path,
                        help="where to write (default: the task's scale_constants.py)")
    args = parser.parse_args(argv)
    model = importlib.import_module(f"fl_models.{args.task}.model")
    images, source = None, (f"{model.PUBLIC_IMAGES} images from the task's seeded generator "
                            f"at seed {model.PUBLIC_SEED} (no split uses it)")
    if args.images is not None:
        dataset = importlib.import_module(f"fl_models.{args.task}.dataset")
        images = dataset.read_folder(args.images)[0]
        source = f"{len(images)} public images under {args.images}"
    mean, scale = model.public_feature_scale(images)
    constants = importlib.import_module(f"fl_models.{args.task}.scale_constants")
    doc = (f"Fixed per-feature scaling of the {args.task} front end (model.build_model); "
           f"generated.\n\n" + textwrap.fill(
               f"Mean and standard deviation of each of the {model.FEATURES} scattering "
               f"features over {source}: public data, never a hospital's images, so the "
               f"constants cost no privacy. Regenerate with `python -m "
               f"fl_models.fixed_features {args.task}` (tests/models/test_fixed_features.py "
               f"checks they match).", 88))
    write_constants(args.out or Path(str(constants.__file__)), doc, mean, scale)


if __name__ == "__main__":
    main()
