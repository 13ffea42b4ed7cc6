"""Fixed-width text tables for the terminal: the live round table and the final summary.

Plain ASCII (no box drawing, "eps" not a Greek letter) so the output survives a
C locale, a CI log or a copy into an issue unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TextIO


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; "-" where there is none (missing or NaN)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


class Table:
    """Prints a header once, then rows as they come; numbers right-aligned, and the
    columns named in `left` (labels) left-aligned."""

    def __init__(self, headers: Sequence[str], stream: TextIO, min_width: int = 6,
                 left: Sequence[int] = ()) -> None:
        self.headers = list(headers)
        self.widths = [max(min_width, len(h)) for h in headers]
        self.left = set(left)
        self.stream = stream

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in self.left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, self.widths, strict=True))).rstrip()

    def header(self) -> None:
        self.stream.write(self._line(self.headers) + "\n")
        self.stream.write("  ".join("-" * w for w in self.widths) + "\n")
        self.stream.flush()

    def row(self, cells: Sequence[str]) -> None:
        self.stream.write(self._line(cells) + "\n")
        self.stream.flush()


def short_name(hospital: str) -> str:
    """hospital_3 -> h3: keeps one epsilon column per hospital narrow."""
    prefix = "hospital_"
    return "h" + hospital[len(prefix):] if hospital.startswith(prefix) else hospital
