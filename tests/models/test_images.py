"""Image-task loaders: class folders (ours, REFUGE, LAG, Kermany), MedMNIST .npz, DICOM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fl_models.base import DataFormatError
from fl_models.glaucoma import GlaucomaTask
from fl_models.glaucoma.dataset import read_folder as read_fundus_folder
from fl_models.glaucoma.synthetic import generate as generate_fundus
from fl_models.pneumonia import PneumoniaTask
from fl_models.pneumonia.dataset import read_dicom, read_npz
from fl_models.pneumonia.synthetic import PATTERNS
from fl_models.pneumonia.synthetic import generate as generate_films


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(value: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_glaucoma_png_and_jpeg_class_folders_per_split(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _save(tmp_path / split / "glaucoma" / "a.png", _rgb(200))
        _save(tmp_path / split / "normal" / "b.jpg", _rgb(50, 120, 160))  # resized, cropped
    data = GlaucomaTask().load_split(tmp_path, "train")
    inputs, labels = data.tensors
    assert inputs.shape == (2, 3, 64, 64) and sorted(labels.tolist()) == [0, 1]
    assert float(inputs[labels == 1].mean()) == pytest.approx(200 / 255, abs=1e-6)


def test_refuge_and_lag_layouts(tmp_path: Path) -> None:
    refuge = tmp_path / "REFUGE" / "Training400"
    _save(refuge / "Glaucoma" / "g0001.jpg", _rgb(220))
    _save(refuge / "Non-Glaucoma" / "n0001.jpg", _rgb(30))
    _save(tmp_path / "LAG" / "suspicious_glaucoma" / "image" / "x.jpg", _rgb(220))
    _save(tmp_path / "LAG" / "non_glaucoma" / "image" / "y.jpg", _rgb(30))
    _save(tmp_path / "LAG" / "suspicious_glaucoma" / "attention_map" / "x.jpg", _rgb(0))
    (tmp_path / "LAG" / "notes.txt").write_text("not an image")
    images, labels = read_fundus_folder(tmp_path)
    assert sorted(labels.tolist()) == [0, 0, 1, 1]  # the attention map was skipped
    assert images.shape == (4, 64, 64, 3)
    assert (images[labels == 1].mean(axis=(1, 2, 3)) > 200).all()


def test_image_outside_a_class_folder_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "glaucoma" / "a.png", _rgb(1))
    _save(tmp_path / "train" / "maybe" / "c.png", _rgb(1))
    with pytest.raises(DataFormatError, match=r"maybe/c\.png: is not inside a class folder"):
        GlaucomaTask().load_split(tmp_path, "train")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "normal" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataFormatError, match=r"broken\.png: not a readable image"):
        read_fundus_folder(tmp_path)


def test_fundus_generator_is_deterministic_and_labelled_by_vcdr() -> None:
    images, labels, vcdr = generate_fundus(40, 2)
    again, _, _ = generate_fundus(40, 2)
    assert np.array_equal(images, again) and images.shape == (40, 64, 64, 3)
    assert not np.array_equal(images, generate_fundus(40, 3)[0])
    assert ((vcdr > 0.6) == (labels == 1)).all()


def test_kermany_folders(tmp_path: Path) -> None:
    root = tmp_path / "chest_xray"
    for split in ("train", "test"):
        _save(root / split / "NORMAL" / "IM-0001-0001.jpeg", np.full((80, 100), 40, np.uint8))
        _save(
            root / split / "PNEUMONIA" / "person1_bacteria_1.jpeg", np.full((90, 90), 200, np.uint8)
        )
    inputs, labels = PneumoniaTask().load_split(root, "test").tensors
    assert inputs.shape == (2, 1, 64, 64)
    assert labels.tolist() == [0, 1]
    assert float(inputs[1].mean()) > float(inputs[0].mean())


def test_medmnist_npz_is_resized_and_split(tmp_path: Path) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [1], [0], [1]], dtype=np.uint8),
        val_images=np.zeros((1, 28, 28), np.uint8), val_labels=np.zeros((1, 1), np.uint8),
        test_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
        test_labels=np.array([[1], [0]], dtype=np.uint8),
    )  # fmt: skip
    train = PneumoniaTask().load_split(path, "train")
    assert train.tensors[0].shape == (5, 1, 64, 64)
    assert train.tensors[1].tolist() == [0, 1, 1, 0, 1]
    assert PneumoniaTask().load_split(tmp_path, "test").tensors[1].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"train_images": np.zeros((2, 28, 28)), "train_labels": np.array([0, 3])},
            r"unknown labels \[3\]",
        ),
        (
            {"train_images": np.zeros((2, 28, 28)), "train_labels": np.array([0])},
            "2 train images but 1",
        ),
        (
            {"test_images": np.zeros((1, 28, 28)), "test_labels": np.array([0])},
            "has no train_images",
        ),
        (
            {"train_images": np.zeros((2, 28)), "train_labels": np.array([0, 1])},
            "expected \\[n, h, w\\]",
        ),
    ],
)
def test_bad_npz_is_named(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataFormatError, match=message) as info:
        read_npz(path, "train")
    assert str(path) in str(info.value)


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 1000, 2000
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_monochrome1_is_inverted_after_the_luts(tmp_path: Path) -> None:
    pixels = np.zeros((96, 128), dtype=np.uint16)
    pixels[:, 64:] = 1500  # raw high values: dark on a MONOCHROME1 display
    _write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1")
    _write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2")
    inverted, plain = read_dicom(tmp_path / "m1.dcm"), read_dicom(tmp_path / "m2.dcm")
    assert inverted.shape == plain.shape == (64, 64)
    # Centre-cropped to 96x96 then resized: the right third came from raw 1500.
    assert plain[:, -5:].mean() > 200 and plain[:, :5].mean() < 50
    assert inverted[:, -5:].mean() < 50 and inverted[:, :5].mean() > 200


@pytest.mark.parametrize(("normal", "pneumonia"), [("NORMAL", "PNEUMONIA"),
                                                   ("healthy", "bacteria")])
def test_dicom_files_in_class_folders(tmp_path: Path, normal: str, pneumonia: str) -> None:
    """Each file's label comes from its folder: NORMAL is 0, PNEUMONIA is 1 (and a pair
    whose alphabetical order is the other way round maps the same). The two classes
    get images the loader cannot confuse (dark top half vs dark left half)."""
    top = np.full((64, 64), 800, dtype=np.uint16)
    top[:32] = 100
    left = np.full((64, 64), 800, dtype=np.uint16)
    left[:, :32] = 100
    for i in range(5):
        _write_dicom(tmp_path / normal / f"n{i}.dcm", top, "MONOCHROME2")
        _write_dicom(tmp_path / pneumonia / f"p{i}.dcm", left, "MONOCHROME2")
    (tmp_path / pneumonia / "c.dcm").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=r"c\.dcm: not a readable DICOM image"):
        PneumoniaTask().load_split(tmp_path, "train")
    (tmp_path / pneumonia / "c.dcm").unlink()
    train = PneumoniaTask().load_split(tmp_path, "train")  # unsplit: 80/20 hold-out
    test = PneumoniaTask().load_split(tmp_path, "test")
    assert (len(train), len(test)) == (8, 2)
    inputs = np.concatenate([train.tensors[0].numpy(), test.tensors[0].numpy()])[:, 0]
    labels = np.concatenate([train.tensors[1].numpy(), test.tensors[1].numpy()])
    dark_top = inputs[:, :28].mean(axis=(1, 2)) < inputs[:, 36:].mean(axis=(1, 2))
    dark_left = inputs[:, :, :28].mean(axis=(1, 2)) < inputs[:, :, 36:].mean(axis=(1, 2))
    assert (dark_top != dark_left).all()  # every image is one of the two, recognisably
    assert labels[dark_top].tolist() == [0] * 5  # NORMAL
    assert labels[dark_left].tolist() == [1] * 5  # PNEUMONIA
    assert sorted(test.tensors[1].tolist()) == [0, 1]  # the hold-out is stratified


def test_film_generator_is_deterministic_with_all_patterns() -> None:
    images, labels, patterns = generate_films(60, 4)
    assert np.array_equal(images, generate_films(60, 4)[0]) and images.shape == (60, 64, 64)
    assert not np.array_equal(images, generate_films(60, 5)[0])
    assert ((patterns > 0) == (labels == 1)).all()
    assert set(patterns[labels == 1].tolist()) == set(range(1, len(PATTERNS)))


@pytest.mark.parametrize("task_class", [GlaucomaTask, PneumoniaTask])
def test_prepared_images_are_a_disjoint_complete_partition(
    tmp_path: Path, task_class: type
) -> None:
    task = task_class(samples=40)
    task.prepare(tmp_path / "fed", 2, None, seed=9)
    task.prepare(tmp_path / "again", 2, None, seed=9)
    if task_class is GlaucomaTask:
        ids = [int(p.stem) for p in (tmp_path / "fed").rglob("*.png")]
        files = sorted(p.relative_to(tmp_path / "fed") for p in (tmp_path / "fed").rglob("*.png"))
    else:
        ids = []
        for archive in (tmp_path / "fed").rglob("*.npz"):
            with np.load(archive) as arrays:
                ids += [int(i) for key in arrays.files if key.endswith("_ids") for i in arrays[key]]
        files = sorted(p.relative_to(tmp_path / "fed") for p in (tmp_path / "fed").rglob("*.npz"))
    assert sorted(ids) == list(range(40))
    for name in files:  # same seed, same bytes
        assert (tmp_path / "fed" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
