"""Symptom records: wide 0/1 CSV (symptom columns + prognosis) or long CSV (Disease, Symptom_k).

Real exports are messy: header names padded with spaces, written in several
spellings, or repeated (the Kaggle Training.csv repeats `fluid_overload`). Columns
are matched by normalised name, a repeated name fills the vocabulary's next slot of
that name (or is OR-ed into the first), and anything that cannot be mapped to the
132 inputs or 41 diseases is an error naming the file, line and value, because a
silently dropped symptom changes what the model sees.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_models.base import DataFormatError
from fl_models.files import find_split_file, normalise_name, read_csv
from fl_models.partition import holdout_indices, write_federation
from fl_models.symptom.synthetic import generate
from fl_models.symptom.vocabulary import DISEASES, SYMPTOMS

DEFAULT_SAMPLES = 41 * 120
LABEL_COLUMNS = ("prognosis", "disease", "diagnosis", "label")
_IGNORED = re.compile(r"^(|id|patient_id|unnamed(_\d+)?)$")
_LONG_SYMPTOM = re.compile(r"^symptom_?\d+$")
_SYMPTOM_INDEX = {normalise_name(name): i for i, name in enumerate(SYMPTOMS)}
_DISEASE_INDEX = {normalise_name(name): i for i, name in enumerate(DISEASES)}


def disease_index(text: str, path: Path, line: int) -> int:
    index = _DISEASE_INDEX.get(normalise_name(text))
    if index is None:
        raise DataFormatError(path, f"line {line}: unknown disease {text!r}")
    return index


def read_csv_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(symptoms float32 [n, 132] of 0/1, disease index int64 [n]), wide or long layout."""
    rows = read_csv(path)
    header = [normalise_name(cell) for cell in rows[0]]
    if any(_LONG_SYMPTOM.match(name) for name in header):
        return _read_long(path, header, rows[1:])
    return _read_wide(path, header, rows[1:])


def _label_column(path: Path, header: list[str]) -> int:
    found = [i for i, name in enumerate(header) if name in LABEL_COLUMNS]
    if len(found) != 1:
        raise DataFormatError(
            path, f"needs exactly one label column named one of {LABEL_COLUMNS}, found {len(found)}"
        )
    return found[0]


def _wide_columns(path: Path, header: list[str], label_col: int) -> dict[int, int]:
    """CSV column -> vocabulary slot; a repeated name takes `name.1`'s slot, else is OR-ed."""
    slots: dict[int, int] = {}
    taken: set[int] = set()
    unknown: list[str] = []
    for col, name in enumerate(header):
        if col == label_col or _IGNORED.match(name):
            continue
        slot = _SYMPTOM_INDEX.get(name)
        if slot is None:
            unknown.append(name)
            continue
        suffix = 1
        while slot in taken and f"{name}_{suffix}" in _SYMPTOM_INDEX:
            slot = _SYMPTOM_INDEX[f"{name}_{suffix}"]
            suffix += 1
        slots[col] = slot
        taken.add(slot)
    if unknown:
        raise DataFormatError(path, f"unknown symptom columns: {', '.join(unknown)}")
    missing = sorted(set(range(len(SYMPTOMS))) - taken)
    if missing:
        names = ", ".join(SYMPTOMS[i] for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataFormatError(path, f"missing symptom columns: {names}{more}")
    return slots


def _read_wide(
    path: Path, header: list[str], rows: list[list[str]]
) -> tuple[np.ndarray, np.ndarray]:
    label_col = _label_column(path, header)
    slots = _wide_columns(path, header, label_col)
    symptoms = np.zeros((len(rows), len(SYMPTOMS)), dtype=np.float32)
    labels = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        line = r + 2
        if len(row) <= max(label_col, *slots):
            raise DataFormatError(
                path, f"line {line}: {len(row)} columns, header has {len(header)}"
            )
        labels[r] = disease_index(row[label_col], path, line)
        for col, slot in slots.items():
            value = row[col]
            if value in ("1", "1.0"):
                symptoms[r, slot] = 1.0
            elif value not in ("0", "0.0"):
                raise DataFormatError(
                    path, f"line {line}, column {header[col]!r}: {value!r} is not 0 or 1"
                )
    return symptoms, labels


def _read_long(
    path: Path, header: list[str], rows: list[list[str]]
) -> tuple[np.ndarray, np.ndarray]:
    label_col = _label_column(path, header)
    symptom_cols = [i for i, name in enumerate(header) if _LONG_SYMPTOM.match(name)]
    symptoms = np.zeros((len(rows), len(SYMPTOMS)), dtype=np.float32)
    labels = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        line = r + 2
        if len(row) <= label_col:
            raise DataFormatError(path, f"line {line}: no {header[label_col]!r} value")
        labels[r] = disease_index(row[label_col], path, line)
        for col in symptom_cols:
            if col >= len(row) or not row[col]:
                continue
            slot = _SYMPTOM_INDEX.get(normalise_name(row[col]))
            if slot is None:
                raise DataFormatError(path, f"line {line}: unknown symptom {row[col]!r}")
            symptoms[r, slot] = 1.0
    return symptoms, labels


def load_split(data_path: Path, split: str) -> TensorDataset:
    source = find_split_file(Path(data_path), split, (".csv",))
    symptoms, labels = read_csv_file(source.path)
    if source.holdout:
        rows = holdout_indices(labels, split)
        symptoms, labels = symptoms[rows], labels[rows]
    return TensorDataset(torch.from_numpy(symptoms), torch.from_numpy(labels))


def write_csv(path: Path, ids: np.ndarray, symptoms: np.ndarray, labels: np.ndarray) -> None:
    """Wide layout: id, the 132 symptom columns (vocabulary spelling), prognosis."""
    header = ["id", *SYMPTOMS, "prognosis"]
    lines = [",".join(f'"{name}"' for name in header)]
    for i, row, label in zip(ids, symptoms, labels, strict=True):
        lines.append(f"{int(i)}," + ",".join(map(str, row.tolist())) + f',"{DISEASES[label]}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare(
    out_dir: Path, clients: int, alpha: float | None, seed: int, samples: int = DEFAULT_SAMPLES
) -> dict[str, dict[str, int]]:
    """Generate `samples` records with `seed` and write them as hospitals; ids are row numbers."""
    symptoms, labels = generate(samples, seed)

    def write(folder: Path, split: str, rows: np.ndarray) -> None:
        write_csv(folder / f"{split}.csv", rows, symptoms[rows], labels[rows])

    return write_federation(Path(out_dir), labels, clients, alpha, seed, write)
