"""Finding and reading a hospital's files, with errors that name the file.

A hospital points a client at a folder laid out by `fl_models.prepare` (one file or
folder per split) or at its own export (one file holding everything). Both are
resolved here so every task treats them the same way.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from fl_models.base import DataFormatError, check_split


@dataclass(frozen=True)
class SplitSource:
    """Where a split's rows are: `path`, and whether only a held-out part of it is the split.

    `holdout` is True when the hospital gave one file (or folder) with no train/test
    division; the task then takes a fixed, stratified 80/20 split of it.
    """

    path: Path
    holdout: bool


def require_exists(path: Path) -> None:
    if not path.exists():
        raise DataFormatError(path, "does not exist")


def find_split_file(data_path: Path, split: str, suffixes: tuple[str, ...]) -> SplitSource:
    """`data_path/<split><suffix>`, else the single data file given or found in `data_path`.

    Several candidate files with none named after the split is an error rather than
    a guess: training on the wrong file is worse than not training.
    """
    check_split(split)
    data_path = Path(data_path)
    require_exists(data_path)
    if data_path.is_file():
        if data_path.suffix.lower() not in suffixes:
            raise DataFormatError(data_path, f"expected a {' or '.join(suffixes)} file")
        return SplitSource(data_path, holdout=True)
    for suffix in suffixes:
        named = data_path / f"{split}{suffix}"
        if named.is_file():
            return SplitSource(named, holdout=False)
    candidates = sorted(
        p for p in data_path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
    )
    if len(candidates) == 1:
        return SplitSource(candidates[0], holdout=True)
    wanted = " or ".join(f"{split}{s}" for s in suffixes)
    if not candidates:
        raise DataFormatError(data_path, f"no {wanted} and no other {'/'.join(suffixes)} file")
    names = ", ".join(p.name for p in candidates)
    raise DataFormatError(data_path, f"no {wanted}, and several candidates ({names}); rename one")


def find_split_dir(data_path: Path, split: str) -> SplitSource:
    """`data_path/<split>/` when present, else `data_path` itself as one unsplit folder."""
    check_split(split)
    data_path = Path(data_path)
    require_exists(data_path)
    if not data_path.is_dir():
        raise DataFormatError(data_path, "expected a folder")
    named = data_path / split
    if named.is_dir():
        return SplitSource(named, holdout=False)
    return SplitSource(data_path, holdout=True)


def read_csv(path: Path) -> list[list[str]]:
    """Non-blank rows of a CSV file, cells stripped; BOM and CRLF tolerated."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle)]
    except UnicodeDecodeError as error:
        raise DataFormatError(path, f"not UTF-8 text ({error.reason})") from error
    except csv.Error as error:
        raise DataFormatError(path, f"not a readable CSV file ({error})") from error
    except OSError as error:
        raise DataFormatError(path, f"cannot be read ({error.strerror})") from error
    rows = [row for row in rows if any(row)]
    if not rows:
        raise DataFormatError(path, "is empty")
    return rows


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def normalise_name(text: str) -> str:
    """Lower case, every run of non-alphanumerics as one underscore, none at the ends.

    Real exports disagree on "concave points_mean" / "concave_points_mean" /
    " skin_rash " / "spotting_ urination"; comparing normalised names absorbs that.
    """
    out: list[str] = []
    pending = False
    for char in text.strip().lower():
        if char.isalnum():
            if pending and out:
                out.append("_")
            out.append(char)
            pending = False
        else:
            pending = True
    return "".join(out)
