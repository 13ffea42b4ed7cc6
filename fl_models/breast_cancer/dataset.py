"""Breast cancer (Wisconsin Diagnostic) data: CSV files and the scikit-learn copy.

Class 1 is malignant, class 0 benign. Note that scikit-learn's own `target` uses the
opposite coding (0 = malignant); it is flipped here once, and files written by
`prepare` carry M/B letters so the coding is never ambiguous on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_models.base import DataFormatError
from fl_models.files import find_split_file, is_number, normalise_name, read_csv
from fl_models.partition import SplitWriter, holdout_indices, write_federation

CLASS_NAMES: tuple[str, ...] = ("benign", "malignant")
_BASES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
# scikit-learn's names and order (mean, error, worst), which is also the UCI column order.
FEATURE_NAMES: tuple[str, ...] = (
    *(f"mean {b}" for b in _BASES),
    *(f"{b} error" for b in _BASES),
    *(f"worst {b}" for b in _BASES),
)
NUM_FEATURES = len(FEATURE_NAMES)
LABEL_COLUMNS = ("diagnosis", "target", "label", "class")
_IGNORED_COLUMNS = ("id", "patient_id", "")
_LABEL_WORDS = {"m": 1, "malignant": 1, "b": 0, "benign": 0}


def _feature_aliases() -> dict[str, int]:
    """Every spelling of each feature (scikit-learn's and the Kaggle/UCI `radius_mean`)."""
    aliases: dict[str, int] = {}
    for i, base in enumerate(_BASES):
        b = normalise_name(base)
        for name in (f"mean_{b}", f"{b}_mean"):
            aliases[name] = i
        for name in (f"{b}_error", f"{b}_se", f"se_{b}"):
            aliases[name] = i + 10
        for name in (f"worst_{b}", f"{b}_worst"):
            aliases[name] = i + 20
    return aliases


_ALIASES = _feature_aliases()


def parse_label(text: str, path: Path, line: int) -> int:
    """M/B, malignant/benign, or 1/0 with 1 = malignant."""
    word = text.strip().lower()
    if word in _LABEL_WORDS:
        return _LABEL_WORDS[word]
    if is_number(word) and float(word) in (0.0, 1.0):
        return int(float(word))
    raise DataFormatError(
        path, f"line {line}: unknown diagnosis {text!r} (expected M/B, malignant/benign or 1/0)"
    )


def read_csv_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [n, 30], labels int64 [n]) from one CSV file.

    With a header, columns are found by name in any order and unrelated columns
    (an id, a trailing empty column) are ignored. Without one, the UCI wdbc.data
    layout (id, diagnosis, 30 features) or 30 features then the diagnosis is expected.
    """
    rows = read_csv(path)
    header = rows[0]
    if all(is_number(cell) or cell.lower() in _LABEL_WORDS for cell in header):
        return _read_headerless(path, rows)
    return _read_with_header(path, header, rows[1:])


def _read_headerless(path: Path, rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    width = len(rows[0])
    if width == NUM_FEATURES + 2:
        label_col, feature_cols = 1, list(range(2, width))
    elif width == NUM_FEATURES + 1:
        label_col, feature_cols = NUM_FEATURES, list(range(NUM_FEATURES))
    else:
        raise DataFormatError(
            path,
            f"has no header and {width} columns; expected {NUM_FEATURES + 2} "
            f"(id, diagnosis, 30 features) or {NUM_FEATURES + 1} (30 features, diagnosis)",
        )
    return _parse_rows(path, rows, label_col, feature_cols, first_line=1)


def _read_with_header(
    path: Path, header: list[str], rows: list[list[str]]
) -> tuple[np.ndarray, np.ndarray]:
    names = [normalise_name(cell) for cell in header]
    label_cols = [i for i, name in enumerate(names) if name in LABEL_COLUMNS]
    if len(label_cols) != 1:
        raise DataFormatError(
            path,
            f"needs exactly one diagnosis column named one of {LABEL_COLUMNS}, "
            f"found {len(label_cols)}",
        )
    feature_cols: list[int | None] = [None] * NUM_FEATURES
    for col, name in enumerate(names):
        index = _ALIASES.get(name)
        if index is None:
            continue
        if feature_cols[index] is not None:
            raise DataFormatError(path, f"feature {FEATURE_NAMES[index]!r} appears twice")
        feature_cols[index] = col
    missing = [FEATURE_NAMES[i] for i, col in enumerate(feature_cols) if col is None]
    if missing:
        raise DataFormatError(path, f"missing feature columns: {', '.join(missing)}")
    return _parse_rows(
        path, rows, label_cols[0], [c for c in feature_cols if c is not None], first_line=2
    )


def _parse_rows(
    path: Path, rows: list[list[str]], label_col: int, feature_cols: list[int], first_line: int
) -> tuple[np.ndarray, np.ndarray]:
    width = max(label_col, *feature_cols) + 1
    features = np.empty((len(rows), NUM_FEATURES), dtype=np.float64)
    labels = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        line = first_line + r
        if len(row) < width:
            raise DataFormatError(path, f"line {line}: {len(row)} columns, expected {width}")
        labels[r] = parse_label(row[label_col], path, line)
        for f, col in enumerate(feature_cols):
            try:
                features[r, f] = float(row[col])
            except ValueError:
                raise DataFormatError(
                    path, f"line {line}: {FEATURE_NAMES[f]!r} is {row[col]!r}, not a number"
                ) from None
    if not np.isfinite(features).all():
        bad = int(np.argwhere(~np.isfinite(features))[0][0]) + first_line
        raise DataFormatError(path, f"line {bad}: missing or infinite feature value")
    return features, labels


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of local features; a constant column gets scale 1, not a division by 0."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return mean, np.where(scale > 0, scale, 1.0)


def load_split(data_path: Path, split: str) -> TensorDataset:
    """Standardised features and labels of `split`.

    The standardisation is fitted on this hospital's own training rows (the
    folder's train.csv, or the training part of a single file), never on pooled
    data, so nothing about other hospitals is needed and nothing leaves this one.
    A folder with only a test file (the global test set) is standardised by itself.
    """
    source = find_split_file(Path(data_path), split, (".csv",))
    features, labels = read_csv_file(source.path)
    if source.holdout:
        fit_rows = holdout_indices(labels, "train")
        features_fit = features[fit_rows]
        rows = holdout_indices(labels, split)
        features, labels = features[rows], labels[rows]
    else:
        train_file = source.path.with_name("train.csv")
        features_fit = read_csv_file(train_file)[0] if train_file.is_file() else features
    if len(features_fit) == 0:
        raise DataFormatError(source.path, "has no rows to fit the standardisation on")
    mean, scale = standardiser(features_fit)
    inputs = torch.from_numpy(((features - mean) / scale).astype(np.float32))
    return TensorDataset(inputs, torch.from_numpy(labels))


def default_data() -> tuple[np.ndarray, np.ndarray]:
    """The real Wisconsin Diagnostic data scikit-learn ships, with 1 = malignant."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return np.asarray(bunch.data, dtype=np.float64), 1 - np.asarray(bunch.target, dtype=np.int64)


def write_csv(path: Path, ids: np.ndarray, features: np.ndarray, labels: np.ndarray) -> None:
    """id, diagnosis (M/B), then the 30 features in scikit-learn's names, exactly (repr)."""
    lines = [",".join(["id", "diagnosis", *(f'"{n}"' for n in FEATURE_NAMES)])]
    for i, row, label in zip(ids, features, labels, strict=True):
        values = ",".join(repr(float(v)) for v in row)
        lines.append(f"{int(i)},{'M' if label == 1 else 'B'},{values}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare(
    out_dir: Path, clients: int, alpha: float | None, seed: int
) -> dict[str, dict[str, int]]:
    """Partition the 569 real cases into hospitals; ids are the scikit-learn row numbers."""
    features, labels = default_data()

    def write(folder: Path, split: str, rows: np.ndarray) -> None:
        write_csv(folder / f"{split}.csv", rows, features[rows], labels[rows])

    writer: SplitWriter = write
    return write_federation(Path(out_dir), labels, clients, alpha, seed, writer)
