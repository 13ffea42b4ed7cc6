"""The demo's results: report.json (everything, for scripts and tests), report.png (for
people), and the closing summary table printed in the terminal.

All three are built from one plain dict (see `fl_demo.demo.build_report`), so they
can never disagree. The picture answers the demo's questions at a glance: did the
global model learn, what did privacy cost each hospital, would a hospital have done
as well alone, and why not (how skewed each hospital's labels are).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fl_demo.table import Table, fmt, short_name

# Metric names as the tasks report them -> labels for people.
LABELS = {"accuracy": "accuracy", "auroc": "AUC", "macro_f1": "macro F1",
          "balanced_accuracy": "balanced accuracy"}


def second_metric(metrics: Mapping[str, Any]) -> str:
    """AUC for binary tasks; multi-class tasks have no AUROC, so macro F1 stands in."""
    for name in ("auroc", "macro_f1", "balanced_accuracy"):
        if name in metrics:
            return name
    return "loss"


def write_json(report: Mapping[str, Any], path: Path) -> None:
    """Atomically, and as strict JSON (NaN is refused: callers turn it into null)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def print_summary(report: Mapping[str, Any], stream: TextIO) -> None:
    """The final table: the global model beside each hospital's local-only model."""
    final = report["final"]
    metric2 = report["comparison"]["second_metric"]
    hospitals: list[str] = report["settings"]["hospital_names"]
    stream.write(f"\nFinal models on the held-out test set ({report['data']['test_examples']}"
                 f" examples); every model trained with"
                 f" {_privacy(report)}:\n")
    table = Table(["model", "accuracy", LABELS.get(metric2, metric2), "balanced acc",
                   "eps spent"], stream, left=(0, 4))
    table.widths[0] = max(22, *(len(h) + 8 for h in hospitals))
    table.header()
    glob = final["global"]
    spent = " ".join(f"{short_name(h)}={fmt(report['epsilon'].get(h), 2)}" for h in hospitals)
    table.row(["federated (global)", fmt(glob.get("accuracy")), fmt(glob.get(metric2)),
               fmt(glob.get("balanced_accuracy")), spent])
    for name in hospitals:
        local = final["local_only"].get(name)
        if local is None:
            continue
        m = local["metrics"]
        table.row([f"{name} alone", fmt(m.get("accuracy")), fmt(m.get(metric2)),
                   fmt(m.get("balanced_accuracy")), fmt(local.get("epsilon"), 2)])
    if report["settings"].get("secure_aggregation") and len(hospitals) >= 2:
        stream.write("Secure aggregation (SecAgg+) was on: the server saw only the sum of the"
                     " hospitals' updates, never one hospital's.\n")
    stream.flush()


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Four panels: learning curve, privacy spent, global vs local-only, label skew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    settings = report["settings"]
    fig.suptitle(
        f"Federated {report['model_type']}: {settings['hospitals']} hospitals,"
        f" {len(report['rounds'])} rounds, {_privacy(report)},"
        f" label skew alpha={settings['alpha'] if settings['alpha'] is not None else 'IID'}",
        fontsize=13, fontweight="bold")
    _plot_learning(axes[0][0], report)
    _plot_epsilon(axes[0][1], report)
    _plot_comparison(axes[1][0], report)
    _plot_skew(axes[1][1], report)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _privacy(report: Mapping[str, Any]) -> str:
    """How the run was private (the demo's own words; older reports: the noise)."""
    settings = report["settings"]
    return str(settings.get("privacy") or f"DP-SGD (noise {settings['noise_multiplier']})")


def _plot_learning(ax: Any, report: Mapping[str, Any]) -> None:
    rounds = [r for r in report["rounds"] if r["state"] == "completed"]
    metric2 = report["comparison"]["second_metric"]
    xs = [r["round"] for r in rounds]
    series = {key: [_num(r["metrics"].get(f"eval_{key}")) for r in rounds]
              for key in ("accuracy", metric2)}
    colors = {"accuracy": "tab:blue", metric2: "tab:orange"}
    for key, ys in series.items():
        ax.plot(xs, ys, marker="o", color=colors[key], linewidth=2,
                label=f"global {LABELS.get(key, key)}")
    # At each round the higher value is labelled above its point and the lower one
    # below, so the two labels never sit on each other when the curves are close.
    acc, other = series["accuracy"], series[metric2]
    for i, x in enumerate(xs):
        for key, y, peer in (("accuracy", acc[i], other[i]), (metric2, other[i], acc[i])):
            if not math.isfinite(y):
                continue
            above = not math.isfinite(peer) or y > peer or (y == peer and key == "accuracy")
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points",
                        xytext=(0, 7 if above else -13), ha="center", fontsize=8,
                        color=colors[key])
    lowest = min([1.0, *(y for ys in series.values() for y in ys if math.isfinite(y))])
    local = report["final"]["local_only"]
    if local:
        best_name, best = max(local.items(),
                              key=lambda kv: _finite_or(_num(kv[1]["metrics"].get("accuracy"))))
        best_acc = _num(best["metrics"].get("accuracy"))
        if math.isfinite(best_acc):
            ax.axhline(best_acc, color="gray", linestyle="--", linewidth=1.2,
                       label=f"best hospital alone ({best_name}) accuracy")
            lowest = min(lowest, best_acc)
    ax.set_title("Global model on the held-out test set, by round")
    ax.set_xlabel("round")
    ax.set_xticks(xs)
    # Zoom in on where the curves are (from a multiple of 0.1), never above 1.
    ax.set_ylim(max(0.0, math.floor(lowest * 10 - 1) / 10), 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)


def _plot_epsilon(ax: Any, report: Mapping[str, Any]) -> None:
    rounds = [r for r in report["rounds"] if r["state"] == "completed"]
    xs = [r["round"] for r in rounds]
    # Hospitals with the same data size spend the same epsilon: distinct markers and
    # dashes keep a line visible under another.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]
    for index, name in enumerate(report["settings"]["hospital_names"]):
        ys = [_num(r["epsilon"].get(name)) for r in rounds]
        marker, dash = styles[index % len(styles)]
        ax.plot(xs, ys, marker=marker, linestyle=dash, linewidth=2, markersize=7 - index % 3,
                label=name)
    budget = report["settings"]["epsilon_budget"]
    per_job = report["settings"].get("epsilon_per_hospital")
    top = budget * 1.1
    if per_job:  # the job's budget is what the hospitals plan to; the lifetime one is far
        ax.axhline(per_job, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"job budget per hospital ({per_job:g}; lifetime {budget:g})")
        top = per_job * 1.25
    else:
        ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"budget per hospital ({budget:g})")
    ax.set_title(f"Privacy spent per hospital (epsilon at delta={report['settings']['delta']:g})")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.set_xticks(xs)
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)


def _plot_comparison(ax: Any, report: Mapping[str, Any]) -> None:
    metric2 = report["comparison"]["second_metric"]
    names = ["federated\n(global)"]
    values = [report["final"]["global"]]
    for name, local in report["final"]["local_only"].items():
        names.append(f"{name}\nalone")
        values.append(local["metrics"])
    width = 0.38
    positions = list(range(len(names)))
    for offset, key, color in ((-width / 2, "accuracy", "tab:blue"),
                               (width / 2, metric2, "tab:orange")):
        heights = [_num(v.get(key)) for v in values]
        bars = ax.bar([p + offset for p in positions], [_finite_or(h) for h in heights], width,
                      color=color, label=LABELS.get(key, key))
        for bar, h in zip(bars, heights, strict=True):
            ax.annotate("n/a" if not math.isfinite(h) else f"{h:.2f}",
                        (bar.get_x() + bar.get_width() / 2, _finite_or(h)),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, fontsize=9)
    ax.set_ylim(0, 1.2)
    ax.set_title("Final model: federation vs each hospital on its own data (same DP)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncol=2, fontsize=9)


def _plot_skew(ax: Any, report: Mapping[str, Any]) -> None:
    data = report["data"]
    class_names: Sequence[str] = data["class_names"]
    hospitals = list(data["hospitals"])
    left = [0.0] * len(hospitals)
    cmap = _colors(len(class_names))
    for index, cls in enumerate(class_names):
        counts = [float(data["hospitals"][h]["train_classes"].get(cls, 0)) for h in hospitals]
        ax.barh(hospitals, counts, left=left, color=cmap[index],
                label=cls if len(class_names) <= 8 else None)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("training examples")
    ax.set_title("Each hospital's training labels (why federating helps)")
    if len(class_names) <= 8:
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.99, 0.02, f"{len(class_names)} classes, one colour each",
                transform=ax.transAxes, ha="right", fontsize=8, color="gray")
    ax.grid(axis="x", alpha=0.3)


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def _finite_or(value: float, default: float = 0.0) -> float:
    return value if math.isfinite(value) else default
