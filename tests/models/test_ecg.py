"""ECG loaders (WFDB with annotations, heartbeat CSV, sample CSV), real MIT-BIH, generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from fl_models.base import DataFormatError
from fl_models.ecg import EcgTask, scale_constants
from fl_models.ecg.dataset import (
    ADC_GAIN,
    read_csv_file,
    read_wfdb_record,
    standardise,
)
from fl_models.ecg.model import FEATURES, public_feature_scale
from fl_models.ecg.synthetic import AF, LENGTH, NORMAL, PVC, generate

MITDB = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ecg" / "mitdb"
FS = 360


def _write_record(folder: Path, with_annotation: bool = True) -> Path:
    """40 s at 360 Hz: normal, a PVC at 15.6 s, AF from 20 s, an atrial premature beat."""
    seconds = 40
    t = np.arange(seconds * FS) / FS
    beats = [b for b in np.arange(0.4, seconds, 0.8) if not 20 <= b < 30]
    rng = np.random.default_rng(0)
    af_beats = list(20.3 + np.cumsum(rng.uniform(0.45, 1.1, 14)))
    af_beats = [b for b in af_beats if b < 29.8]
    symbols = ["N"] * len(beats)
    symbols[int(np.argmin(np.abs(np.array(beats) - 15.6)))] = "V"
    symbols[int(np.argmin(np.abs(np.array(beats) - 35.6)))] = "A"
    times = sorted(zip(beats + af_beats, symbols + ["N"] * len(af_beats), strict=True))
    signal = np.zeros_like(t)
    for time, symbol in times:
        width = 0.04 if symbol == "V" else 0.012
        signal += np.exp(-0.5 * ((t - time) / width) ** 2)
    wfdb.wrsamp(
        "rec", fs=FS, units=["mV"], sig_name=["MLII"], p_signal=signal[:, None],
        fmt=["16"], write_dir=str(folder),
    )  # fmt: skip
    if with_annotation:
        samples = [18, 20 * FS, 30 * FS] + [int(round(time * FS)) for time, _ in times]
        marks = ["+", "+", "+"] + [s for _, s in times]
        aux = ["(N", "(AFIB", "(N"] + [""] * len(times)
        order = np.argsort(samples, kind="stable")
        wfdb.wrann(
            "rec", "atr", np.array(samples)[order], symbol=[marks[i] for i in order],
            aux_note=[aux[i] for i in order], fs=FS, write_dir=str(folder),
        )  # fmt: skip
    return folder / "rec"


def test_wfdb_windows_are_resampled_and_labelled_from_annotations(tmp_path: Path) -> None:
    windows, labels = read_wfdb_record(_write_record(tmp_path))
    # Window 4 holds an atrial premature beat: no class here, so it is left out.
    assert labels.tolist() == [NORMAL, PVC, AF]
    assert windows.shape == (3, LENGTH)
    # The wide PVC at 15.6 s lands at sample 560 of the second 100 Hz window.
    assert abs(int(np.argmax(windows[1])) - 560) <= 1


def test_wfdb_without_annotations_is_refused(tmp_path: Path) -> None:
    record = _write_record(tmp_path, with_annotation=False)
    with pytest.raises(DataFormatError, match=r"rec\.hea: has no \.atr annotation file"):
        read_wfdb_record(record)


def test_task_loads_a_single_record_folder_as_disjoint_splits(tmp_path: Path) -> None:
    """Each loaded window is matched to the record's own windows: the two splits are
    a complete cover of them with no window in both, and keep their labels."""
    windows, labels = read_wfdb_record(_write_record(tmp_path))
    expected = standardise(windows)
    task = EcgTask()
    train, test = task.load_split(tmp_path, "train"), task.load_split(tmp_path, "test")
    assert train.tensors[0].shape[1:] == (1, LENGTH) and len(train) > 0
    matched: dict[str, list[int]] = {}
    for name, split in (("train", train), ("test", test)):
        inputs = split.tensors[0][:, 0].numpy()
        distance = np.abs(inputs[:, None, :] - expected[None, :, :]).max(axis=2)
        rows = distance.argmin(axis=1)
        np.testing.assert_allclose(inputs, expected[rows], atol=1e-5)
        np.testing.assert_array_equal(split.tensors[1].numpy(), labels[rows])
        matched[name] = rows.tolist()
    assert sorted(matched["train"] + matched["test"]) == [0, 1, 2]
    assert not set(matched["train"]) & set(matched["test"])


def test_task_loads_a_record_named_without_extension(tmp_path: Path) -> None:
    """`--data_path .../mitdb/100`: the WFDB way of naming a record (100.hea, .dat, .atr)."""
    record = _write_record(tmp_path)
    assert not record.exists()
    task = EcgTask()
    train, test = task.load_split(record, "train"), task.load_split(record, "test")
    assert len(train) + len(test) == 3
    with pytest.raises(DataFormatError, match="does not exist"):
        task.load_split(tmp_path / "missing_record", "train")


@pytest.mark.skipif(
    not (MITDB / "100.hea").is_file(),
    reason=f"MIT-BIH record 100 not found at {MITDB} (shared real-data folder absent)",
)
def test_reads_real_mitbih_record_100() -> None:
    windows, labels = read_wfdb_record(MITDB / "100")
    # 30 min at 360 Hz -> 180 windows; record 100 is sinus rhythm with one PVC, and the
    # windows holding its 33 atrial premature beats are left out.
    counts = np.bincount(labels, minlength=3)
    assert counts[PVC] == 1 and counts[AF] == 0
    assert 140 <= counts[NORMAL] <= 180 - 20
    assert windows.shape[1] == LENGTH and np.isfinite(windows).all()
    # Lead MLII in millivolts: R peaks around 1-2 mV.
    assert 0.5 < float(np.percentile(windows.max(axis=1), 50)) < 3.0
    task = EcgTask()
    assert len(task.load_split(MITDB, "train")) + len(task.load_split(MITDB, "test")) == len(labels)
    by_name = [task.load_split(MITDB / "100", split) for split in ("train", "test")]
    assert sum(len(part) for part in by_name) == len(labels)


def test_heartbeat_csv_layout_is_resampled_padded_and_mapped(tmp_path: Path) -> None:
    beat = np.zeros(187)
    beat[20] = 1.0
    rows = [[*beat, 0.0], [*beat, 1.0], [*beat, 2.0]]  # N, S (no class here), V
    path = tmp_path / "mitbih_train.csv"
    path.write_text("\n".join(",".join(f"{v:.6e}" for v in r) for r in rows))
    windows, labels = read_csv_file(path)
    assert labels.tolist() == [NORMAL, PVC]
    assert windows.shape == (2, LENGTH)
    assert abs(int(np.argmax(windows[0])) - 16) <= 1  # 125 Hz -> 100 Hz
    assert np.all(windows[:, 160:] == 0)


def test_sample_csv_with_header_and_class_names(tmp_path: Path) -> None:
    path = tmp_path / "ecg.csv"
    samples = ",".join(f"s{i}" for i in range(LENGTH))
    path.write_text(f"{samples},label\n" + ",".join(["0.1"] * LENGTH) + ",AF\n")
    windows, labels = read_csv_file(path)
    assert labels.tolist() == [AF] and windows.shape == (1, LENGTH)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([*([0.0] * 187), 7.0], "line 1: unknown label '7.0'"),
        ([*([0.0] * 1200), 0.0], "rows hold 1200 samples"),
        ([*([0.0] * 10), "flutter"], "unknown label 'flutter'"),
    ],
)
def test_bad_csv_rows_name_the_file(tmp_path: Path, row: list[object], message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(",".join(map(str, row)) + "\n")
    with pytest.raises(DataFormatError, match=message) as info:
        read_csv_file(path)
    assert str(path) in str(info.value)


def test_generator_is_deterministic_and_classes_differ_physiologically() -> None:
    a, b = generate(90, 5), generate(90, 5)
    assert np.array_equal(a.signals, b.signals) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.signals, generate(90, 6).signals)

    def rr_variation(times: np.ndarray) -> float:
        rr = np.diff(times)
        return float(rr.std() / rr.mean())

    variation = np.array([rr_variation(t) for t in a.beat_times])
    assert variation[a.labels == AF].mean() > 3 * variation[a.labels == NORMAL].mean()
    has_v = np.array(["V" in s for s in a.beat_symbols])
    assert has_v[a.labels == PVC].all() and not has_v[a.labels != PVC].any()


def test_prepared_records_round_trip_exactly(tmp_path: Path) -> None:
    EcgTask(samples=60).prepare(tmp_path / "fed", 2, None, seed=1)
    batch = generate(60, 1)
    expected = standardise(np.rint(batch.signals * ADC_GAIN) / ADC_GAIN)
    task = EcgTask()
    parts = [
        task.load_split(tmp_path / "fed" / folder, split)
        for folder, split in [
            ("hospital_1", "train"), ("hospital_1", "test"),
            ("hospital_2", "train"), ("hospital_2", "test"), ("test", "test"),
        ]
    ]  # fmt: skip
    inputs = np.concatenate([p.tensors[0][:, 0].numpy() for p in parts])
    labels = np.concatenate([p.tensors[1].numpy() for p in parts])
    assert len(inputs) == 60
    # Match every loaded window to its generated original: a complete, disjoint cover.
    distance = np.abs(inputs[:, None, :50] - expected[None, :, :50]).max(axis=2)
    match = distance.argmin(axis=1)
    assert sorted(match.tolist()) == list(range(60))
    np.testing.assert_allclose(inputs, expected[match], atol=1e-5)
    assert np.array_equal(labels, batch.labels[match])


def test_fixed_feature_scale_is_the_public_windows_and_is_not_sent() -> None:
    """The shipped constants are what the seeded public windows give (so nobody's
    records went into them), they standardise fresh windows of the same kind, and
    they stay out of the state dict: never noised, averaged or sent."""
    mean, scale = public_feature_scale()
    np.testing.assert_allclose(scale_constants.MEAN, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scale_constants.SCALE, scale, rtol=1e-4, atol=1e-6)
    model = EcgTask().build_model()
    assert set(model.state_dict()) == {"2.weight", "2.bias"}
    fresh = torch.from_numpy(standardise(generate(600, 31).signals))[:, None]
    with torch.no_grad():
        scaled = model[1](model[0](fresh))
    assert scaled.shape == (600, FEATURES)
    assert scaled.mean(dim=0).abs().max() < 0.3
    assert ((scaled.std(dim=0) - 1).abs() < 0.3).all()
