"""Symptom CSV layouts (wide, long), messy headers, and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.naive_bayes import BernoulliNB

from fl_models.base import DataFormatError
from fl_models.symptom import SymptomTask
from fl_models.symptom.dataset import read_csv_file
from fl_models.symptom.synthetic import generate, probability_table
from fl_models.symptom.vocabulary import DISEASES, SYMPTOMS


def _wide_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def test_wide_csv_with_padded_duplicated_names_and_trailing_empty_column(tmp_path: Path) -> None:
    # Kaggle Training.csv style: `fluid_overload` twice, odd spacing, an empty last column.
    header = [f" {name.replace('.1', '')} " for name in SYMPTOMS] + ["prognosis", ""]
    first = ["0"] * 132
    first[SYMPTOMS.index("itching")] = "1"
    first[SYMPTOMS.index("fluid_overload.1")] = "1"
    second = ["0"] * 132
    second[SYMPTOMS.index("spotting_ urination")] = "1"
    rows = [first + ["Fungal infection", ""], second + ["  Diabetes ", ""]]
    symptoms, labels = read_csv_file(_wide_csv(tmp_path / "Training.csv", header, rows))
    assert labels.tolist() == [DISEASES.index("Fungal infection"), DISEASES.index("Diabetes")]
    assert np.flatnonzero(symptoms[0]).tolist() == [
        SYMPTOMS.index("itching"),
        SYMPTOMS.index("fluid_overload.1"),
    ]
    assert np.flatnonzero(symptoms[1]).tolist() == [SYMPTOMS.index("spotting_ urination")]


def test_repeated_column_beyond_the_vocabulary_is_ored(tmp_path: Path) -> None:
    header = [*SYMPTOMS, "itching", "prognosis"]
    row = ["0"] * 133 + ["Acne"]
    row[132] = "1"  # only the repeated itching column is set
    symptoms, _ = read_csv_file(_wide_csv(tmp_path / "w.csv", header, [row]))
    assert symptoms[0, SYMPTOMS.index("itching")] == 1


def test_long_csv_disease_and_symptom_columns(tmp_path: Path) -> None:
    path = tmp_path / "dataset.csv"
    path.write_text(
        "Disease,Symptom_1,Symptom_2,Symptom_3,Symptom_4\n"
        "Fungal infection, itching, skin_rash, nodal_skin_eruptions,\n"
        "(vertigo) Paroymsal  Positional Vertigo, vomiting, headache,,\n"
    )
    symptoms, labels = read_csv_file(path)
    assert labels.tolist() == [0, DISEASES.index("(vertigo) Paroymsal  Positional Vertigo")]
    assert symptoms[0].sum() == 3 and symptoms[1].sum() == 2
    assert symptoms[1, SYMPTOMS.index("headache")] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Disease,Symptom_1\nFlu, itching\n", "line 2: unknown disease 'Flu'"),
        ("Disease,Symptom_1\nAcne, glowing\n", "line 2: unknown symptom 'glowing'"),
        ("itching,prognosis\n1,Acne\n", "missing symptom columns: skin_rash"),
        ("Symptom_1\nitching\n", "exactly one label column"),
    ],
)
def test_bad_files_name_file_line_and_value(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as info:
        read_csv_file(path)
    assert str(path) in str(info.value)


def test_wide_csv_rejects_unknown_columns_and_non_binary_values(tmp_path: Path) -> None:
    header = [*SYMPTOMS, "glowing", "prognosis"]
    with pytest.raises(DataFormatError, match="unknown symptom columns: glowing"):
        read_csv_file(_wide_csv(tmp_path / "a.csv", header, [["0"] * 133 + ["Acne"]]))
    row = ["0"] * 132 + ["Acne"]
    row[5] = "yes"
    with pytest.raises(DataFormatError, match=r"line 2, column 'chills': 'yes' is not 0 or 1"):
        read_csv_file(_wide_csv(tmp_path / "b.csv", [*SYMPTOMS, "prognosis"], [row]))


def test_generator_is_deterministic_by_seed() -> None:
    a, b, c = generate(300, 7), generate(300, 7), generate(300, 8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_generator_signal_is_learnable_but_not_trivially_separable() -> None:
    table = probability_table()
    assert table.shape == (41, 132)
    # Families share core symptoms: every disease has a sibling with overlapping cores.
    core = table > 0.5
    overlaps = core.astype(int) @ core.T.astype(int)
    np.fill_diagonal(overlaps, 0)
    assert (overlaps.max(axis=1) >= 2).all()
    x, y = generate(41 * 60, 0)
    x_test, y_test = generate(41 * 30, 1)
    accuracy = BernoulliNB().fit(x, y).score(x_test, y_test)
    assert 0.6 < accuracy < 0.97  # far above chance (1/41), below perfect


def test_prepared_rows_are_a_disjoint_complete_partition(tmp_path: Path) -> None:
    SymptomTask(samples=200).prepare(tmp_path / "fed", 3, 0.5, seed=3)
    symptoms, labels = generate(200, 3)
    seen: list[int] = []
    for path in sorted((tmp_path / "fed").rglob("*.csv")):
        lines = path.read_text().splitlines()[1:]
        ids = [int(line.split(",")[0]) for line in lines]
        read_symptoms, read_labels = read_csv_file(path)
        assert np.array_equal(read_symptoms, symptoms[ids])
        assert np.array_equal(read_labels, labels[ids])
        seen += ids
    assert sorted(seen) == list(range(200))
