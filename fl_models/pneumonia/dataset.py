"""Chest X-rays: Kermany folders, MedMNIST .npz, DICOM files; synthetic default.

Inputs are [1, 64, 64] floats in [0, 1], bright = dense (bone, consolidation), as on
a conventional film. DICOM pixel data goes through the modality LUT (rescale slope
and intercept) and the VOI LUT or window, then is min-max scaled; MONOCHROME1 images
(where low values are bright) are inverted so every source has the same polarity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fl_models.base import DataFormatError, check_split
from fl_models.files import find_split_dir, require_exists
from fl_models.imaging import IMAGE_SUFFIXES, read_class_folders, read_image, square_resize
from fl_models.partition import holdout_indices, write_federation
from fl_models.pneumonia.synthetic import SIZE, generate

DEFAULT_SAMPLES = 3000
DICOM_SUFFIXES = (".dcm", ".dicom")
NPZ_NAME = "pneumoniamnist_64.npz"  # what prepare writes; any MedMNIST-style .npz loads
# Normalised folder name -> class: Kermany (NORMAL / PNEUMONIA), and common variants.
ALIASES: dict[str, int] = {
    "normal": 0, "negative": 0, "healthy": 0, "0": 0,
    "pneumonia": 1, "bacteria": 1, "bacterial": 1, "virus": 1, "viral": 1,
    "pneumonia_bacterial": 1, "pneumonia_viral": 1, "positive": 1, "1": 1,
}  # fmt: skip


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM image as uint8 [64, 64], modality and VOI LUT applied, MONOCHROME1 inverted."""
    import pydicom  # imported here: only hospitals with DICOM data pay for it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for a broken file
        raise DataFormatError(path, f"not a readable DICOM image ({error})") from error
    if pixels.ndim == 3 and dataset.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # a multi-frame file: the first frame
    if pixels.ndim != 2:
        raise DataFormatError(path, f"expected a single greyscale image, got shape {pixels.shape}")
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    if dataset.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        values = values.max() - values
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return square_resize(Image.fromarray(np.rint(scaled * 255).astype(np.uint8)), SIZE)


def _read_picture(path: Path) -> np.ndarray:
    return read_image(path, SIZE, "L")


def read_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 64, 64], labels [n]) of every image or DICOM file under `folder`."""
    readers = {
        **dict.fromkeys(IMAGE_SUFFIXES, _read_picture),
        **dict.fromkeys(DICOM_SUFFIXES, read_dicom),
    }
    return read_class_folders(folder, ALIASES, readers)


def read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`<split>_images` and `<split>_labels` of a MedMNIST-style archive (no pickle allowed)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            image_key, label_key = f"{split}_images", f"{split}_labels"
            if image_key not in keys or label_key not in keys:
                raise DataFormatError(
                    path,
                    f"has no {image_key} / {label_key} arrays (it has: {', '.join(sorted(keys))})",
                )
            images, labels = archive[image_key], archive[label_key]
    except DataFormatError:
        raise
    except (OSError, ValueError) as error:
        raise DataFormatError(path, f"not a readable .npz archive ({error})") from error
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.mean(axis=-1) if images.shape[-1] == 3 else images[..., 0]
    if images.ndim != 3:
        raise DataFormatError(path, f"{split}_images has shape {images.shape}; expected [n, h, w]")
    labels = labels.reshape(-1)
    if len(labels) != len(images):
        raise DataFormatError(path, f"{len(images)} {split} images but {len(labels)} labels")
    unknown = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if unknown:
        raise DataFormatError(path, f"{split}_labels holds unknown labels {unknown} (expected 0/1)")
    return _resize_all(images, path), labels.astype(np.int64)


def _resize_all(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataFormatError(path, "image values outside 0-255")
        images = np.rint(images).astype(np.uint8)
    if images.shape[1:] == (SIZE, SIZE):
        return images
    return np.stack([square_resize(Image.fromarray(image), SIZE) for image in images])


def _npz_in(folder: Path) -> Path | None:
    archives = sorted(folder.glob("*.npz"))
    if len(archives) > 1:
        names = ", ".join(a.name for a in archives)
        raise DataFormatError(folder, f"holds several .npz archives ({names}); keep one")
    return archives[0] if archives else None


def load_split(data_path: Path, split: str) -> TensorDataset:
    """From a .npz (its own splits), or Kermany-style class folders (`<split>/` or unsplit)."""
    check_split(split)
    data_path = Path(data_path)
    require_exists(data_path)
    if data_path.is_file():
        if data_path.suffix.lower() != ".npz":
            raise DataFormatError(data_path, "expected a .npz archive or a folder")
        images, labels = read_npz(data_path, split)
    elif (archive := _npz_in(data_path)) is not None:
        images, labels = read_npz(archive, split)
    else:
        source = find_split_dir(data_path, split)
        images, labels = read_folder(source.path)
        if source.holdout:
            rows = holdout_indices(labels, split)
            images, labels = images[rows], labels[rows]
    inputs = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    return TensorDataset(inputs.contiguous(), torch.from_numpy(labels))


def prepare(
    out_dir: Path, clients: int, alpha: float | None, seed: int, samples: int = DEFAULT_SAMPLES
) -> dict[str, dict[str, int]]:
    """Generate films with `seed`; each folder gets one MedMNIST-layout .npz with its splits.

    `<split>_ids` (row numbers in the generated set) ride along: MedMNIST readers
    ignore extra arrays, and they make a partition checkable.
    """
    images, labels, _ = generate(samples, seed)
    pending: dict[Path, dict[str, Any]] = {}

    def write(folder: Path, split: str, rows: np.ndarray) -> None:
        arrays = pending.setdefault(folder, {})
        arrays[f"{split}_images"] = images[rows]
        arrays[f"{split}_labels"] = labels[rows].astype(np.uint8)[:, None]
        arrays[f"{split}_ids"] = rows
        np.savez_compressed(folder / NPZ_NAME, **arrays)  # rewritten as splits arrive

    return write_federation(Path(out_dir), labels, clients, alpha, seed, write)
