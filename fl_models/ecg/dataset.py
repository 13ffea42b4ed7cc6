"""ECG windows: WFDB records with annotations, CSV rows of samples + label, synthetic default.

Every source ends up as 10 s single-lead windows at 100 Hz (`LENGTH` samples), each
standardised to zero mean and unit variance (gain differs between devices and leads;
the rhythm and the QRS shape are what matter), labelled normal / af / pvc.

WFDB window labels come from the annotations (see `label_windows`); windows whose
annotations fit none of the three classes (e.g. atrial premature beats, paced or
ventricular-tachycardia rhythms) are left out, not forced into a class.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly
from torch.utils.data import TensorDataset

from fl_models.base import DataFormatError, check_split
from fl_models.ecg.synthetic import AF, FS, LENGTH, NORMAL, PVC, SECONDS, generate
from fl_models.files import is_number, read_csv, require_exists
from fl_models.partition import holdout_indices, write_federation

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 3000
EXCLUDED = -1
ADC_GAIN = 200.0  # digital units per mV when writing records, as in MIT-BIH
LEADS = ("MLII", "II", "ML2")  # preferred lead names, else the first signal

# Annotation symbols of beats (WFDB conventions); everything else is a non-beat mark.
NORMAL_BEATS = frozenset("NLRej")  # AAMI "N" group
BEATS = frozenset("NLRBAaJSVrFejnE/fQ?!")
SINUS_RHYTHMS = frozenset({"(N", "(SBR", "(B", "(T"})  # bigeminy/trigeminy: sinus with PVCs
AF_RHYTHM = "(AFIB"
DEFAULT_RHYTHM = "(N"  # assumed before the first rhythm annotation, or when there is none

# CSV labels by name; numbers depend on the layout (see `_csv_label`).
_LABEL_NAMES = {
    "normal": NORMAL, "n": NORMAL, "nsr": NORMAL, "sinus": NORMAL,
    "af": AF, "afib": AF, "a_fib": AF, "atrial_fibrillation": AF,
    "pvc": PVC, "v": PVC, "premature_ventricular_contraction": PVC,
}  # fmt: skip
HEARTBEAT_SAMPLES = 187  # the MIT-BIH heartbeat CSV: 187 samples at 125 Hz, then the class
HEARTBEAT_FS = 125
# Its classes are the AAMI groups N, S, V, F, Q; S, F and Q have no class here.
_HEARTBEAT_CLASSES = {0: NORMAL, 1: EXCLUDED, 2: PVC, 3: EXCLUDED, 4: EXCLUDED}


def standardise(windows: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per window, float32; a flat window stays all zeros."""
    centred = windows - windows.mean(axis=1, keepdims=True)
    scale = centred.std(axis=1, keepdims=True)
    return (centred / np.where(scale > 1e-8, scale, 1.0)).astype(np.float32)


def resample(signal: np.ndarray, fs: float, axis: int = -1) -> np.ndarray:
    """To the model's 100 Hz with a polyphase filter (exact ratio, e.g. 360 -> 100 is 5/18)."""
    if fs == FS:
        return signal
    ratio = Fraction(FS / fs).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=axis)


def label_windows(
    n_windows: int, samples: np.ndarray, symbols: list[str], aux_notes: list[str]
) -> np.ndarray:
    """One label per LENGTH-sample window from annotations already at 100 Hz.

    af     if atrial fibrillation is the rhythm for at least half the window;
    pvc    else if the rhythm is sinus throughout and some beat is ventricular (V);
    normal else if the rhythm is sinus throughout and every beat is AAMI-normal;
    EXCLUDED otherwise (other beats or rhythms, or no beat at all).
    """
    total = n_windows * LENGTH
    rhythm_at = np.zeros(total, dtype=np.int64)  # index into `rhythms`
    rhythms = [DEFAULT_RHYTHM]
    for sample, symbol, aux in zip(samples, symbols, aux_notes, strict=True):
        name = aux.replace("\x00", "").strip()
        if symbol == "+" and name.startswith("(") and 0 <= sample < total:
            rhythms.append(name)
            rhythm_at[sample:] = len(rhythms) - 1
    window_rhythms = rhythm_at.reshape(n_windows, LENGTH)
    is_af = np.array([r == AF_RHYTHM for r in rhythms])
    is_sinus = np.array([r in SINUS_RHYTHMS for r in rhythms])
    af_fraction: np.ndarray = is_af[window_rhythms].mean(axis=1)
    sinus = np.asarray(is_sinus[window_rhythms].all(axis=1))

    labels = np.full(n_windows, EXCLUDED, dtype=np.int64)
    beats_in: list[list[str]] = [[] for _ in range(n_windows)]
    for sample, symbol in zip(samples, symbols, strict=True):
        if symbol in BEATS and 0 <= sample < total:
            beats_in[sample // LENGTH].append(symbol)
    for w, beats in enumerate(beats_in):
        if af_fraction[w] >= 0.5:
            labels[w] = AF
        elif not sinus[w] or not beats or not set(beats) <= NORMAL_BEATS | {"V"}:
            continue
        else:
            labels[w] = PVC if "V" in beats else NORMAL
    return labels


def read_wfdb_record(record: Path) -> tuple[np.ndarray, np.ndarray]:
    """(windows in mV [k, LENGTH], labels [k]) of one record; its .atr file is required.

    `record` is the path without extension (like wfdb.rdrecord) or the .hea file.
    Windows run back to back from the start; the tail shorter than 10 s is dropped.
    """
    import wfdb  # imported here: only hospitals with WFDB data pay for it

    record = record.with_suffix("") if record.suffix == ".hea" else record
    header = _companion(record, ".hea")
    require_exists(header)
    if not _companion(record, ".atr").is_file():
        raise DataFormatError(header, "has no .atr annotation file next to it")
    try:
        data = wfdb.rdrecord(str(record))
        annotation = wfdb.rdann(str(record), "atr")
    except Exception as error:  # wfdb raises bare Exceptions for malformed files
        raise DataFormatError(header, f"not a readable WFDB record ({error})") from error
    if data.p_signal is None or data.p_signal.ndim != 2 or data.p_signal.shape[0] == 0:
        raise DataFormatError(header, "holds no signal samples")
    names = list(data.sig_name or [])
    lead = next((names.index(n) for n in LEADS if n in names), 0)
    signal = resample(np.asarray(data.p_signal[:, lead], dtype=np.float64), float(data.fs))
    n_windows = len(signal) // LENGTH
    if n_windows == 0:
        raise DataFormatError(header, f"is shorter than {SECONDS} s")
    windows = signal[: n_windows * LENGTH].reshape(n_windows, LENGTH)
    samples = np.rint(np.asarray(annotation.sample) * FS / float(data.fs)).astype(np.int64)
    aux = [a or "" for a in (annotation.aux_note or [""] * len(samples))]
    labels = label_windows(n_windows, samples, list(annotation.symbol), aux)
    keep = (labels != EXCLUDED) & np.isfinite(windows).all(axis=1)
    _report_left_out(header, n_windows - int(keep.sum()), n_windows, "windows")
    return windows[keep], labels[keep]


def _companion(record: Path, extension: str) -> Path:
    """`record` + `extension`: a record name may hold dots, so not `with_suffix`."""
    return record.with_name(record.name + extension)


def _report_left_out(path: Path, left_out: int, total: int, what: str) -> None:
    """Say how much of a file fits no class, so a mostly-unused file does not go unnoticed."""
    if left_out:
        log.info(
            "%s: left out %d of %d %s that fit none of %s",
            path,
            left_out,
            total,
            what,
            "normal/af/pvc",
        )


def write_wfdb_record(
    folder: Path,
    name: str,
    windows: np.ndarray,
    beat_times: list[np.ndarray],
    beat_symbols: list[list[str]],
    labels: np.ndarray,
) -> None:
    """Windows back to back as one 100 Hz, 16-bit WFDB record `name` with a .atr file.

    Beats are annotated at their R peaks and each window starts with its rhythm
    ("(N" or "(AFIB"), so `read_wfdb_record` recovers the same windows and labels.
    """
    import wfdb

    digital = np.clip(np.rint(windows.ravel() * ADC_GAIN), -32767, 32767).astype(np.int64)
    wfdb.wrsamp(
        name,
        fs=FS,
        units=["mV"],
        sig_name=["MLII"],
        d_signal=digital[:, None],
        fmt=["16"],
        adc_gain=[ADC_GAIN],
        baseline=[0],
        write_dir=str(folder),
    )
    samples: list[int] = []
    symbols: list[str] = []
    aux: list[str] = []
    for w, (times, beats, label) in enumerate(zip(beat_times, beat_symbols, labels, strict=True)):
        start = w * LENGTH
        samples.append(start)
        symbols.append("+")
        aux.append(AF_RHYTHM if label == AF else DEFAULT_RHYTHM)
        for t, beat in zip(times, beats, strict=True):
            samples.append(start + min(LENGTH - 1, max(1, int(round(t * FS)))))
            symbols.append(beat)
            aux.append("")
    wfdb.wrann(
        name, "atr", np.array(samples), symbol=symbols, aux_note=aux, fs=FS, write_dir=str(folder)
    )


def read_csv_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(windows [n, LENGTH] at 100 Hz, labels [n]) from rows of samples then a label.

    187 samples per row is the MIT-BIH heartbeat layout (125 Hz, classes 0-4 = AAMI
    N, S, V, F, Q; S, F and Q rows are left out); otherwise rows hold up to 1,000
    samples at 100 Hz and the label is a class name or index (0 normal, 1 af, 2 pvc).
    Shorter rows are zero-padded to 10 s.
    """
    rows = read_csv(path)
    first_line = 1
    if not all(is_number(cell) for cell in rows[0][:-1]):
        rows, first_line = rows[1:], 2  # a header row
    if not rows:
        raise DataFormatError(path, "has a header but no rows")
    width = len(rows[0])
    n_samples = width - 1
    if n_samples < 1:
        raise DataFormatError(path, "rows need samples followed by a label")
    heartbeat = n_samples == HEARTBEAT_SAMPLES
    if not heartbeat and n_samples > LENGTH:
        raise DataFormatError(
            path,
            f"rows hold {n_samples} samples; expected at most {LENGTH} (10 s at {FS} Hz) "
            f"or {HEARTBEAT_SAMPLES} (the MIT-BIH heartbeat layout)",
        )
    signals = np.empty((len(rows), n_samples))
    labels = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        line = r + first_line
        if len(row) != width:
            raise DataFormatError(path, f"line {line}: {len(row)} columns, expected {width}")
        try:
            signals[r] = [float(v) for v in row[:-1]]
        except ValueError:
            raise DataFormatError(path, f"line {line}: a sample is not a number") from None
        labels[r] = _csv_label(row[-1], heartbeat, path, line)
    if not np.isfinite(signals).all():
        raise DataFormatError(path, "holds missing or infinite samples")
    if heartbeat:
        signals = resample(signals, HEARTBEAT_FS, axis=1)
    windows = np.zeros((len(rows), LENGTH))
    windows[:, : signals.shape[1]] = signals[:, :LENGTH]
    keep = labels != EXCLUDED
    _report_left_out(path, len(labels) - int(keep.sum()), len(labels), "rows")
    return windows[keep], labels[keep]


def _csv_label(text: str, heartbeat: bool, path: Path, line: int) -> int:
    word = text.strip().lower()
    if is_number(word) and float(word).is_integer():
        code = int(float(word))
        table = _HEARTBEAT_CLASSES if heartbeat else dict(enumerate((NORMAL, AF, PVC)))
        if code in table:
            return table[code]
    elif word.replace(" ", "_") in _LABEL_NAMES:
        return _LABEL_NAMES[word.replace(" ", "_")]
    known = "0-4 (N, S, V, F, Q)" if heartbeat else "0-2 or normal / af / pvc"
    raise DataFormatError(path, f"line {line}: unknown label {text!r} (expected {known})")


def _records_in(folder: Path) -> list[Path]:
    return sorted(p.with_suffix("") for p in folder.glob("*.hea"))


def _read_records(records: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_wfdb_record(r) for r in records]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _source(data_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Windows and labels of `split`, from whichever layout `data_path` has.

    Named split first (<split>.hea record, <split>.csv, or a <split>/ folder); else the
    folder's records are divided by record (a patient never on both sides) or, for a
    single record or CSV file, by window with the fixed 80/20 hold-out. A record may
    be named the WFDB way, without extension (`.../mitdb/100` for 100.hea/.dat/.atr).
    """
    if not data_path.exists() and _companion(data_path, ".hea").is_file():
        return _holdout(*read_wfdb_record(data_path), split)
    require_exists(data_path)
    if data_path.is_file():
        if data_path.suffix.lower() == ".csv":
            return _holdout(*read_csv_file(data_path), split)
        if data_path.suffix.lower() in (".hea", ".dat", ".atr"):
            return _holdout(*read_wfdb_record(data_path.with_suffix("")), split)
        raise DataFormatError(data_path, "expected a WFDB record (.hea) or a .csv file")
    if (data_path / f"{split}.hea").is_file():
        return read_wfdb_record(data_path / split)
    if (data_path / f"{split}.csv").is_file():
        return read_csv_file(data_path / f"{split}.csv")
    if (data_path / split).is_dir():
        folder = data_path / split
        records = _records_in(folder)
        csvs = sorted(folder.glob("*.csv"))
        parts = [_read_records(records)] if records else []
        parts += [read_csv_file(c) for c in csvs]
        if not parts:
            raise DataFormatError(folder, "holds no WFDB record (.hea) and no .csv file")
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    records = _records_in(data_path)
    if len(records) > 1:
        rng = np.random.default_rng(0)
        order = rng.permutation(len(records))
        n_test = max(1, int(round(0.2 * len(records))))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        return _read_records([records[i] for i in sorted(chosen)])
    if len(records) == 1:
        return _holdout(*read_wfdb_record(records[0]), split)
    csvs = sorted(data_path.glob("*.csv"))
    if len(csvs) == 1:
        return _holdout(*read_csv_file(csvs[0]), split)
    raise DataFormatError(
        data_path,
        f"no {split}.hea, {split}.csv or {split}/ here, and not exactly one record or CSV file",
    )


def _holdout(windows: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = holdout_indices(labels, split)
    return windows[rows], labels[rows]


def load_split(data_path: Path, split: str) -> TensorDataset:
    """Standardised windows [n, 1, LENGTH] and labels of `split`."""
    check_split(split)
    windows, labels = _source(Path(data_path), split)
    inputs = torch.from_numpy(standardise(windows)).unsqueeze(1)
    return TensorDataset(inputs, torch.from_numpy(labels.astype(np.int64)))


def prepare(
    out_dir: Path, clients: int, alpha: float | None, seed: int, samples: int = DEFAULT_SAMPLES
) -> dict[str, dict[str, int]]:
    """Generate windows with `seed` and write each split as a WFDB record named after it."""
    batch = generate(samples, seed)

    def write(folder: Path, split: str, rows: np.ndarray) -> None:
        write_wfdb_record(
            folder,
            split,
            batch.signals[rows],
            [batch.beat_times[i] for i in rows],
            [batch.beat_symbols[i] for i in rows],
            batch.labels[rows],
        )

    return write_federation(Path(out_dir), batch.labels, clients, alpha, seed, write)
