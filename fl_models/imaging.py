"""Image files for the image tasks: class folders in, class folders out, plus noise fields.

Real collections nest their class folders differently (Kermany: train/NORMAL,
REFUGE: Glaucoma / Non-Glaucoma, LAG: suspicious_glaucoma/image). Rather than one
loader per collection, an image's class is the nearest folder above it whose name
is a known alias of a class; an image with no such folder is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fl_models.base import DataFormatError
from fl_models.files import normalise_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# read(path) -> uint8 array [size, size] or [size, size, 3]
ImageReader = Callable[[Path], np.ndarray]


def read_image(path: Path, size: int, mode: str) -> np.ndarray:
    """A PNG/JPEG/... as uint8 [size, size] ("L") or [size, size, 3] ("RGB").

    The central square is kept before resizing, so round structures (the optic disc,
    the chest) stay round whatever the original aspect ratio.
    """
    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataFormatError(path, f"not a readable image ({error})") from error
    return square_resize(converted, size)


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop a PIL image to a square and resize it (area-averaging when shrinking)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    cropped = image.crop((left, top, left + side, top + side))
    method = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    return np.asarray(cropped.resize((size, size), method), dtype=np.uint8)


def read_class_folders(
    root: Path,
    aliases: Mapping[str, int],
    readers: Mapping[str, ImageReader],
    skip_folders: frozenset[str] = frozenset(),
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, ...], labels int64 [n]) of every image under `root`.

    `aliases` maps normalised folder names to classes; `readers` maps lower-case
    file suffixes to readers; files with other suffixes (notes, CSVs, thumbnails
    databases) are not images and are passed over; folders named in `skip_folders`
    (e.g. LAG's attention maps) are not descended into.
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(normalise_name(p) in skip_folders for p in relative.parts[:-1]):
            continue
        if path.name.startswith(".") or not path.is_file():
            continue
        reader = readers.get(path.suffix.lower())
        if reader is None:
            continue
        label = next(
            (
                aliases[n]
                for n in map(normalise_name, reversed(relative.parts[:-1]))
                if n in aliases
            ),
            None,
        )
        if label is None:
            known = ", ".join(sorted({k for k in aliases if not k.isdigit()}))
            raise DataFormatError(path, f"is not inside a class folder (one of: {known})")
        images.append(reader(path))
        labels.append(label)
    if not images:
        raise DataFormatError(root, f"holds no images ({', '.join(sorted(readers))})")
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise DataFormatError(root, f"images were read with different shapes {sorted(shapes)}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_class_folders(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    class_dirs: tuple[str, ...],
) -> None:
    """One lossless PNG per image in folder/<class_dirs[label]>/<id>.png."""
    for name in class_dirs:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for image, label, index in zip(images, labels, ids, strict=True):
        Image.fromarray(image).save(folder / class_dirs[label] / f"{int(index):06d}.png")


def smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise [n, size, size]: a cells x cells grid, upsampled.

    Bilinear upsampling as two small matrix products (rows, then columns), which is
    an order of magnitude faster than a general-purpose zoom over a batch.
    """
    coarse = rng.standard_normal((n, cells, cells), dtype=np.float32)
    up = _linear_upsampler(cells, size)
    return up @ coarse @ up.T


def _linear_upsampler(cells: int, size: int) -> np.ndarray:
    """[size, cells] matrix of linear-interpolation weights (pixel centres aligned)."""
    position = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    weight = (position - low).astype(np.float32)
    matrix = np.zeros((size, cells), dtype=np.float32)
    np.add.at(matrix, (np.arange(size), low), 1 - weight)
    np.add.at(matrix, (np.arange(size), high), weight)
    return matrix


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))
