"""Breast cancer CSV formats, label coding and local standardisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fl_models.base import DataFormatError
from fl_models.breast_cancer import BreastCancerTask
from fl_models.breast_cancer.dataset import (
    FEATURE_NAMES,
    default_data,
    read_csv_file,
    write_csv,
)

KAGGLE_BASES = [
    "radius", "texture", "perimeter", "area", "smoothness",
    "compactness", "concavity", "concave points", "symmetry", "fractal_dimension",
]  # fmt: skip


def _rows(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    features, labels = default_data()
    pick = np.r_[np.flatnonzero(labels == 1)[: n // 2], np.flatnonzero(labels == 0)[: n // 2]]
    return features[pick], labels[pick]


def test_default_data_codes_malignant_as_one() -> None:
    features, labels = default_data()
    assert features.shape == (569, 30)
    # The Wisconsin data has 212 malignant and 357 benign cases.
    assert int(labels.sum()) == 212


def test_reads_kaggle_layout_with_id_trailing_empty_column_and_mb(tmp_path: Path) -> None:
    features, labels = _rows()
    names = [f"{b}_{s}" for s in ("mean", "se", "worst") for b in KAGGLE_BASES]
    lines = ['"id","diagnosis",' + ",".join(f'"{n}"' for n in names) + ',""']
    for i, (row, label) in enumerate(zip(features, labels, strict=True)):
        lines.append(f"{900 + i},{'M' if label else 'B'}," + ",".join(map(str, row)) + ",")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    read_features, read_labels = read_csv_file(path)
    np.testing.assert_allclose(read_features, features)
    np.testing.assert_array_equal(read_labels, labels)


def test_reads_sklearn_names_in_any_order_with_01_labels(tmp_path: Path) -> None:
    features, labels = _rows()
    order = np.random.default_rng(0).permutation(30)
    lines = ["target," + ",".join(FEATURE_NAMES[i] for i in order)]
    for row, label in zip(features, labels, strict=True):
        lines.append(f"{label}," + ",".join(str(row[i]) for i in order))
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines))
    read_features, read_labels = read_csv_file(path)
    np.testing.assert_allclose(read_features, features)
    np.testing.assert_array_equal(read_labels, labels)


def test_reads_headerless_uci_layout(tmp_path: Path) -> None:
    features, labels = _rows()
    lines = [
        f"{i},{'M' if label else 'B'}," + ",".join(map(str, row))
        for i, (row, label) in enumerate(zip(features, labels, strict=True))
    ]
    path = tmp_path / "wdbc.data.csv"
    path.write_text("\n".join(lines))
    read_features, read_labels = read_csv_file(path)
    np.testing.assert_allclose(read_features, features)
    np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda lines: [lines[0], "1,X," + lines[1].split(",", 2)[2]], "unknown diagnosis 'X'"),
        (lambda lines: [lines[0].replace('"mean radius"', '"foo"'), lines[1]], "mean radius"),
        (lambda lines: [lines[0], lines[1].replace(lines[1].split(",")[5], "abc", 1)], "abc"),
        (lambda lines: [lines[0], "1,M,2.0"], "line 2"),
        (lambda lines: [], "is empty"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path: Path, mutate, message: str) -> None:
    task = BreastCancerTask()
    task.prepare(tmp_path / "fed", 1, None, 0)
    lines = (tmp_path / "fed" / "hospital_1" / "train.csv").read_text().splitlines()[:2]
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(mutate(lines)) + "\n")
    with pytest.raises(DataFormatError, match=message) as info:
        read_csv_file(bad)
    assert str(bad) in str(info.value)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="does not exist"):
        BreastCancerTask().load_split(tmp_path / "nowhere", "train")


def test_standardisation_uses_local_training_rows_only(tmp_path: Path) -> None:
    task = BreastCancerTask()
    task.prepare(tmp_path / "fed", 2, None, 0)
    hospital = tmp_path / "fed" / "hospital_1"
    train = task.load_split(hospital, "train").tensors[0]
    test = task.load_split(hospital, "test").tensors[0]
    np.testing.assert_allclose(train.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    raw_train, _ = read_csv_file(hospital / "train.csv")
    raw_test, _ = read_csv_file(hospital / "test.csv")
    expected = (raw_test - raw_train.mean(0)) / raw_train.std(0)
    np.testing.assert_allclose(test.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_single_file_is_split_80_20_disjointly(tmp_path: Path) -> None:
    """Row identities, not counts: the first feature of the export is made each row's
    number, and the loaded splits are mapped back onto those numbers."""
    task = BreastCancerTask()
    task.prepare(tmp_path / "fed", 1, None, 0)
    raw, labels = read_csv_file(tmp_path / "fed" / "hospital_1" / "train.csv")
    n = len(labels)
    raw[:, 0] = np.arange(n)
    single = tmp_path / "mine"
    single.mkdir()
    write_csv(single / "export.csv", np.arange(n), raw, labels)
    train, test = task.load_split(single, "train"), task.load_split(single, "test")
    both = np.concatenate([train.tensors[0][:, 0].numpy(), test.tensors[0][:, 0].numpy()])
    # Both splits went through one affine standardisation (fitted on the training rows).
    # If together they are exactly the file's rows, the affine map that takes their
    # column's mean and spread onto the raw column's gives back whole row numbers.
    both = both.astype(np.float64)
    scale = raw[:, 0].std() / both.std()
    recovered = both * scale + (raw[:, 0].mean() - scale * both.mean())
    ids = np.rint(recovered).astype(np.int64)
    assert np.abs(recovered - ids).max() < 1e-2, "the splits are not the file's rows"
    train_ids, test_ids = ids[: len(train)], ids[len(train):]
    assert sorted(ids.tolist()) == list(range(n))  # complete, and no row twice
    assert not set(train_ids.tolist()) & set(test_ids.tolist())
    np.testing.assert_array_equal(train.tensors[1].numpy(), labels[train_ids])
    np.testing.assert_array_equal(test.tensors[1].numpy(), labels[test_ids])
    assert 0.15 < len(test) / n < 0.25
    # stratified: each class is held out in (about) the same proportion
    for cls in (0, 1):
        share = (labels[test_ids] == cls).sum() / (labels == cls).sum()
        assert abs(share - len(test) / n) < 0.02, (cls, share)
