"""Hospital partitions: disjoint, complete, deterministic, skewed on request; the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_models import prepare as prepare_cli
from fl_models import train as train_cli
from fl_models.breast_cancer import BreastCancerTask
from fl_models.breast_cancer.dataset import default_data
from fl_models.partition import partition, stratified_holdout

LABELS = np.repeat(np.arange(4), [50, 30, 15, 5])


def _assert_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and sorted(joined.tolist()) == list(range(n))


@pytest.mark.parametrize("alpha", [None, 0.3, 100.0])
def test_partition_is_disjoint_complete_and_deterministic(alpha: float | None) -> None:
    parts = partition(LABELS, 4, alpha, np.random.default_rng(1))
    _assert_cover(parts, len(LABELS))
    again = partition(LABELS, 4, alpha, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 4, alpha, np.random.default_rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert min(len(p) for p in parts) >= 10


def test_small_alpha_skews_labels_more_than_iid() -> None:
    labels = np.repeat(np.arange(2), 500)

    def dominant_share(alpha: float | None) -> float:
        parts = partition(labels, 5, alpha, np.random.default_rng(0))
        return float(np.mean([np.bincount(labels[p], minlength=2).max() / len(p) for p in parts]))

    assert dominant_share(None) < 0.6
    assert dominant_share(0.1) > 0.8


def test_impossible_skew_is_an_error_not_an_empty_hospital() -> None:
    with pytest.raises(ValueError, match="use a larger alpha or fewer hospitals"):
        partition(np.repeat(np.arange(2), 20), 4, 0.01, np.random.default_rng(0), min_size=10)


def test_holdout_has_the_right_size_even_with_many_small_classes() -> None:
    labels = np.repeat(np.arange(40), 3)
    kept, held = stratified_holdout(labels, 0.2, np.random.default_rng(0))
    _assert_cover([kept, held], len(labels))
    assert len(held) == 24
    assert set(labels[kept].tolist()) == set(range(40))  # no class held out whole


def test_prepare_writes_disjoint_complete_hospitals_and_refuses_to_overwrite(
    tmp_path: Path,
) -> None:
    BreastCancerTask().prepare(tmp_path, 3, 0.5, seed=4)
    ids = []
    for csv in sorted(tmp_path.rglob("*.csv")):
        ids += [int(line.split(",")[0]) for line in csv.read_text().splitlines()[1:]]
    assert sorted(ids) == list(range(len(default_data()[1])))
    with pytest.raises(FileExistsError, match="already holds prepared data"):
        BreastCancerTask().prepare(tmp_path, 3, 0.5, seed=4)


def test_prepare_and_train_command_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fed"
    assert (
        prepare_cli.main(["--model_type", "breast_cancer", "--clients", "2", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    # the table's rows are the folders written: each count (and its class split) is
    # what loading that folder gives
    table = [line.strip("|").split("|") for line in printed.splitlines()
             if line.startswith("| ") and not line.startswith("| folder")]
    rows = {(r[0].strip(), r[1].strip()): [int(v) for v in r[2:]] for r in table}
    assert set(rows) == {("hospital_1", "train"), ("hospital_1", "test"),
                         ("hospital_2", "train"), ("hospital_2", "test"), ("test", "test")}
    task = BreastCancerTask()
    for (folder, split), (examples, benign, malignant) in rows.items():
        labels = task.load_split(out / folder, split).tensors[1]
        assert (examples, benign, malignant) == (
            len(labels), int((labels == 0).sum()), int((labels == 1).sum())), (folder, split)
    assert rows[("test", "test")][0] == 114
    assert sum(v[0] for v in rows.values()) == len(default_data()[1])
    assert (
        train_cli.main(
            [
                "--model_type",
                "breast_cancer",
                "--data_path",
                str(out),
                "--epochs",
                "3",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "global test" in printed
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["task"] == "breast_cancer" and saved["epochs"] == 3
    # the printed table is the saved figures (4 decimals) ...
    shown = {r[0].strip(): float(r[1]) for r in
             (line.strip("|").split("|") for line in printed.splitlines())
             if r[0].strip() in saved["breast_cancer"]}
    assert shown.keys() == saved["breast_cancer"].keys()
    for name, value in shown.items():
        assert value == pytest.approx(saved["breast_cancer"][name], abs=5e-5), name
    # ... and its accuracy is the printed confusion matrix's, on the 114 test cases
    lines = printed.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("confusion"))
    matrix = [[int(v) for v in lines[at + k].split()] for k in (1, 2)]
    assert sum(map(sum, matrix)) == 114
    assert saved["breast_cancer"]["accuracy"] == pytest.approx(
        (matrix[0][0] + matrix[1][1]) / 114)
