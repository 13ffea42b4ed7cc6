"""One set of bounds on everything a hospital sends: numbers, enums and names.

A report, an update header or a Join is data from outside. Every service checks it
here, at the edge, before anything is recorded or reaches the round engine, so an
absurd value (an AUROC of -3, an accuracy of 1e12, epsilon -5, an undefined enum
value) is refused with ``INVALID_ARGUMENT`` naming what is wrong, and leaves no
trace. Keeping the bounds in one module is the point: the header of an update and
a Report carrying the same metric must be judged the same way.

Metric ranges are mathematical where the name says what the number is (accuracy,
AUROC, sensitivity, ... lie in [0, 1]; a loss is >= 0; epsilon is >= 0 and finite);
any other metric must be finite and within ``MAX_METRIC_ABS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from fl_proto import aggregator_pb2 as apb
from fl_proto import coordinator_pb2 as cpb

MAX_METRICS = 64
MAX_METRIC_NAME = 64
MAX_METRIC_ABS = 1e12
MAX_EXAMPLES = 1_000_000_000
MAX_EPSILON = 1e6
MAX_SECONDS = 1e7  # a task that "took" longer than ~4 months is not a measurement
MAX_REASON = 2000
MAX_CLIENT_VERSION = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

# Name suffix -> closed range. Matched on the part after any prefix such as
# "train_", "eval_" or "fed_", so train_accuracy and accuracy share one bound.
_UNIT_INTERVAL = (0.0, 1.0)
_RANGES: tuple[tuple[str, tuple[float, float]], ...] = (
    ("balanced_accuracy", _UNIT_INTERVAL),
    ("accuracy", _UNIT_INTERVAL),
    ("auroc", _UNIT_INTERVAL),
    ("auc", _UNIT_INTERVAL),
    ("sensitivity", _UNIT_INTERVAL),
    ("specificity", _UNIT_INTERVAL),
    ("precision", _UNIT_INTERVAL),
    ("recall", _UNIT_INTERVAL),
    ("f1", _UNIT_INTERVAL),
    ("loss", (0.0, MAX_METRIC_ABS)),
    ("seconds", (0.0, MAX_SECONDS)),
)
# Whole names with their own range.
_EXACT: dict[str, tuple[float, float]] = {
    "epsilon_round": (0.0, MAX_EPSILON),
    "epsilon_total": (0.0, MAX_EPSILON),
    "epsilon_max": (0.0, MAX_EPSILON),
    "dp_enabled": (0.0, 1.0),
    "module_fixed": (0.0, 1.0),
}
_FLAGS = frozenset({"dp_enabled", "module_fixed"})  # exactly 0 or 1

REPORT_STATUSES = frozenset({cpb.OK, cpb.REFUSED, cpb.FAILED})
REPORT_KINDS = frozenset({cpb.TRAIN, cpb.EVALUATE})


def metric_range(name: str) -> tuple[float, float]:
    """The closed range a metric of this name must lie in."""
    exact = _EXACT.get(name)
    if exact is not None:
        return exact
    for suffix, bounds in _RANGES:
        if name == suffix or name.endswith("_" + suffix):
            return bounds
    return (-MAX_METRIC_ABS, MAX_METRIC_ABS)


def check_metrics(metrics: Mapping[str, float]) -> str | None:
    """None when the metrics are sane, else what is wrong with them."""
    if len(metrics) > MAX_METRICS:
        return f"too many metrics ({len(metrics)} > {MAX_METRICS})"
    for name, value in metrics.items():
        if not name or len(name) > MAX_METRIC_NAME or not _NAME.match(name):
            return f"metric name {name[:80]!r} is not 1-{MAX_METRIC_NAME} of [A-Za-z0-9_.-]"
        low, high = metric_range(name)
        if not math.isfinite(value) or not low <= value <= high:
            return (f"metric {name!r} has an absurd value {value!r} (not a finite number in"
                    f" [{low:g}, {high:g}])")
        if name in _FLAGS and value not in (0.0, 1.0):
            return f"metric {name!r} = {value!r} must be 0 or 1"
    return None


def check_num_examples(n: int, declared: int | None = None) -> str | None:
    """1..MAX_EXAMPLES, and at most what the hospital declared at Join (when known)."""
    if n < 1 or n > MAX_EXAMPLES:
        return f"num_examples {n} is not in 1..{MAX_EXAMPLES}"
    if declared is not None and declared > 0 and n > declared:
        return f"num_examples {n} is more than the {declared} declared at Join"
    return None


def check_epsilon(*values: float) -> str | None:
    for value in values:
        if not math.isfinite(value) or value < 0 or value > MAX_EPSILON:
            return f"epsilon {value!r} is not a finite number in 0..{MAX_EPSILON:g}"
    return None


def check_join(request: cpb.JoinRequest) -> str | None:
    """The numbers and strings of a Join (the key is checked by the key agreement)."""
    if len(request.client_version) > MAX_CLIENT_VERSION:
        return f"client_version longer than {MAX_CLIENT_VERSION} characters"
    return check_num_examples(request.num_examples)


def check_update_header(header: apb.UpdateStreamHeader, declared: int | None) -> str | None:
    """An update's header: examples (bounded by the Join's count) and its metrics."""
    return check_num_examples(header.num_examples, declared) or check_metrics(header.metrics)


def check_report(request: cpb.ReportRequest, declared: int | None = None) -> str | None:
    """A Report: defined enums first (an undefined value must never reach code that
    names it), then reason, metrics, epsilon, delta, seconds and examples.

    `declared` bounds the examples of a TRAIN report (the training set declared at
    Join); an EVALUATE report counts the test split, which Join does not declare.
    """
    if request.status not in REPORT_STATUSES:
        return f"report status {request.status} is not one of OK, REFUSED, FAILED"
    if request.kind not in REPORT_KINDS:
        return f"report kind {request.kind} is not TRAIN or EVALUATE"
    if len(request.reason) > MAX_REASON:
        return f"reason longer than {MAX_REASON} characters"
    problem = check_metrics(request.metrics) or check_epsilon(request.epsilon_round,
                                                              request.epsilon_total)
    if problem:
        return problem
    if not math.isfinite(request.delta) or not 0 <= request.delta < 1:
        return f"delta {request.delta!r} is not a finite number in [0, 1)"
    if not math.isfinite(request.train_seconds) or not 0 <= request.train_seconds <= MAX_SECONDS:
        return f"train_seconds {request.train_seconds!r} is not in [0, {MAX_SECONDS:g}]"
    if request.status == cpb.OK:
        return check_num_examples(request.num_examples,
                                  declared if request.kind == cpb.TRAIN else None)
    if request.num_examples > MAX_EXAMPLES:
        return f"num_examples {request.num_examples} is more than {MAX_EXAMPLES}"
    return None
