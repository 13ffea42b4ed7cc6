"""Bounds on the numbers clients send: a report is data from outside, so absurd
values are refused with a reason instead of flowing into the round's metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

MAX_METRICS = 64
MAX_METRIC_NAME = 64
MAX_METRIC_ABS = 1e12
MAX_EXAMPLES = 1_000_000_000
MAX_EPSILON = 1e6
MAX_REASON = 2000
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_metrics(metrics: Mapping[str, float]) -> str | None:
    """None when the metrics are sane, else what is wrong with them."""
    if len(metrics) > MAX_METRICS:
        return f"too many metrics ({len(metrics)} > {MAX_METRICS})"
    for name, value in metrics.items():
        if not name or len(name) > MAX_METRIC_NAME or not _NAME.match(name):
            return f"metric name {name[:80]!r} is not 1-{MAX_METRIC_NAME} of [A-Za-z0-9_.-]"
        if not math.isfinite(value) or abs(value) > MAX_METRIC_ABS:
            return f"metric {name!r} has an absurd value {value!r}"
    return None


def check_num_examples(n: int) -> str | None:
    if n < 1 or n > MAX_EXAMPLES:
        return f"num_examples {n} is not in 1..{MAX_EXAMPLES}"
    return None


def check_epsilon(*values: float) -> str | None:
    for value in values:
        if not math.isfinite(value) or value < 0 or value > MAX_EPSILON:
            return f"epsilon {value!r} is not a finite number in 0..{MAX_EPSILON:g}"
    return None
