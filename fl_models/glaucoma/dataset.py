"""Fundus images: class folders (glaucoma/ normal/, REFUGE, LAG), PNG or JPEG; synthetic default.

Inputs are [3, 64, 64] floats in [0, 1]. Folder names decide the label (see
`ALIASES`); LAG's attention_map folders hold heat maps, not photographs, and are
skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_models.files import find_split_dir
from fl_models.glaucoma.synthetic import SIZE, generate
from fl_models.imaging import IMAGE_SUFFIXES, read_class_folders, read_image, write_class_folders
from fl_models.partition import holdout_indices, write_federation

DEFAULT_SAMPLES = 3000
CLASS_DIRS: tuple[str, ...] = ("normal", "glaucoma")
# Normalised folder name -> class: ours, REFUGE (Glaucoma / Non-Glaucoma), LAG
# (suspicious_glaucoma / non_glaucoma) and numbered ImageFolder layouts.
ALIASES: dict[str, int] = {
    "normal": 0, "non_glaucoma": 0, "nonglaucoma": 0, "healthy": 0, "negative": 0, "0": 0,
    "glaucoma": 1, "glaucomatous": 1, "suspicious_glaucoma": 1, "positive": 1, "1": 1,
}  # fmt: skip
SKIP_FOLDERS = frozenset({"attention_map", "attention_maps"})


def _read(path: Path) -> np.ndarray:
    return read_image(path, SIZE, "RGB")


def read_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 64, 64, 3], labels [n]) of every photograph under `folder`."""
    readers = dict.fromkeys(IMAGE_SUFFIXES, _read)
    return read_class_folders(folder, ALIASES, readers, SKIP_FOLDERS)


def to_tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return TensorDataset(inputs.contiguous(), torch.from_numpy(labels.astype(np.int64)))


def load_split(data_path: Path, split: str) -> TensorDataset:
    """`data_path/<split>/` class folders, or a fixed 80/20 hold-out of unsplit ones."""
    source = find_split_dir(Path(data_path), split)
    images, labels = read_folder(source.path)
    if source.holdout:
        rows = holdout_indices(labels, split)
        images, labels = images[rows], labels[rows]
    return to_tensors(images, labels)


def prepare(
    out_dir: Path, clients: int, alpha: float | None, seed: int, samples: int = DEFAULT_SAMPLES
) -> dict[str, dict[str, int]]:
    """Generate images with `seed`; write <folder>/<split>/<class>/<index>.png."""
    images, labels, _ = generate(samples, seed)

    def write(folder: Path, split: str, rows: np.ndarray) -> None:
        write_class_folders(folder / split, images[rows], labels[rows], rows, CLASS_DIRS)

    return write_federation(Path(out_dir), labels, clients, alpha, seed, write)
