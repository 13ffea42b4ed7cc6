"""The privacy-utility sweep: `python -m fl_demo --sweep_epsilon 1,2,3,8,inf [--seeds 0,1,2]`.

What a privacy officer and a clinician need on one page: how good the global model
is at each privacy budget, and whether a hospital would do as well alone at the
same budget. So the whole demo (real daemons, real DP, the budget planned by each
hospital) runs once per budget and seed, each in its own folder
(`OUT/seed<S>_eps<E>/`, with its own report.json and report.png), and the sweep
writes:
- `OUT/sweep.json`: every run's final metrics and the largest epsilon any hospital
  spent, and per budget the mean over seeds;
- `OUT/report.png`: accuracy and the task's second metric (AUC, or macro F1 for
  multi-class tasks) against epsilon, the global model beside each hospital alone;
  `inf` (no DP, the utility ceiling) sits at the right edge;
- a closing table (means over the seeds), which is what the README's privacy table
  quotes, with the task's classical reference model where it has one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fl_demo.demo import prepare_out_dir, run_demo
from fl_demo.report import LABELS, write_json
from fl_demo.settings import DemoSettings
from fl_demo.table import Table, fmt


def label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def run_sweep(settings: DemoSettings, epsilons: Sequence[float], seeds: Sequence[int],
              stream: TextIO) -> dict[str, Any]:
    """Every (seed, epsilon) run, then sweep.json, report.png and the table."""
    out = settings.out.resolve()
    prepare_out_dir(out)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for epsilon in epsilons:
            stream.write(f"\n=== sweep: epsilon {label(epsilon)} per hospital, seed {seed} ===\n")
            stream.flush()
            run = replace(settings, out=out / f"seed{seed}_eps{label(epsilon)}", seed=seed,
                          epsilon_per_hospital=epsilon)
            run.validate()
            report = run_demo(run, stream)
            runs.append(run_point(report, epsilon, seed, reference(run)))
            write_json(summarise(settings, runs), out / "sweep.json")
    summary = summarise(settings, runs)
    write_json(summary, out / "sweep.json")
    plot_sweep(summary, out / "report.png")
    print_sweep(summary, stream)
    return summary


def reference(run: DemoSettings) -> dict[str, Any] | None:
    """The task's classical model (e.g. Naive Bayes for symptom) on the pooled training
    splits: what the symptom target is stated against."""
    import torch
    from torch.utils.data import TensorDataset

    from fl_models.registry import get_task

    try:
        task = get_task(run.model_type, **({"samples": run.samples} if run.samples else {}))
    except TypeError:
        task = get_task(run.model_type)
    data = run.out / "data"
    parts = [task.load_split(data / name, "train") for name in run.hospital_names]
    inputs = torch.cat([p.tensors[0] for p in parts])
    labels = torch.cat([p.tensors[1] for p in parts])
    result = task.reference_metrics(TensorDataset(inputs, labels),
                                    task.load_split(data / "test", "test"))
    if result is None:
        return None
    name, metrics = result
    return {"name": name, "metrics": {k: float(v) for k, v in metrics.items()
                                      if isinstance(v, int | float)}}


def run_point(report: Mapping[str, Any], epsilon: float, seed: int,
              ref: dict[str, Any] | None) -> dict[str, Any]:
    final = report["final"]
    spent = [v for v in report["epsilon"].values() if v is not None]
    return {
        "epsilon_per_hospital": None if math.isinf(epsilon) else epsilon,
        "seed": seed,
        "global": final["global"],
        "local_only": {h: v["metrics"] for h, v in final["local_only"].items()},
        "max_epsilon_spent": max(spent) if spent else None,
        "reference": ref,
        "second_metric": report["comparison"]["second_metric"],
    }


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return float(np.mean(numbers)) if numbers else None


def summarise(settings: DemoSettings, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per budget, the mean over seeds of each figure."""
    budgets: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = label(math.inf if run["epsilon_per_hospital"] is None
                    else run["epsilon_per_hospital"])
        budgets.setdefault(key, {"runs": []})["runs"].append(run)
    metric2 = runs[0]["second_metric"] if runs else "auroc"
    points = []
    for key, entry in budgets.items():
        group = entry["runs"]
        hospitals = sorted({h for r in group for h in r["local_only"]})
        metrics = sorted({m for r in group for m in r["global"]})
        refs = [r["reference"] for r in group if r["reference"]]
        points.append({
            "epsilon_per_hospital": group[0]["epsilon_per_hospital"], "label": key,
            "seeds": [r["seed"] for r in group],
            "global": {m: _mean([r["global"].get(m) for r in group]) for m in metrics},
            "local_only": {h: {m: _mean([r["local_only"].get(h, {}).get(m) for r in group])
                               for m in ("accuracy", metric2)} for h in hospitals},
            "max_epsilon_spent": max((r["max_epsilon_spent"] for r in group
                                      if r["max_epsilon_spent"] is not None), default=None),
            "reference": ({"name": refs[0]["name"],
                           "accuracy": _mean([r["metrics"].get("accuracy") for r in refs])}
                          if refs else None),
        })
    return {"model_type": settings.model_type, "hospitals": settings.hospitals,
            "rounds": settings.rounds, "alpha": settings.alpha, "second_metric": metric2,
            "delta": 1e-5, "points": points, "runs": list(runs)}


def _x(point: Mapping[str, Any], finite_max: float) -> float:
    eps = point["epsilon_per_hospital"]
    return float(eps) if eps is not None else finite_max * 2.5


def plot_sweep(summary: Mapping[str, Any], path: Path) -> None:
    """Accuracy and the second metric against epsilon: global vs each hospital alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(summary["points"], key=lambda p: (p["epsilon_per_hospital"] is None,
                                                      p["epsilon_per_hospital"] or 0))
    finite_eps = [p["epsilon_per_hospital"] for p in points if p["epsilon_per_hospital"]]
    finite_max = max(finite_eps, default=1.0)
    xs = [_x(p, finite_max) for p in points]
    metric2 = summary["second_metric"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    seeds = sorted({s for p in points for s in p["seeds"]})
    fig.suptitle(f"Privacy vs utility, federated {summary['model_type']}:"
                 f" {summary['hospitals']} hospitals, {summary['rounds']} rounds, label skew"
                 f" alpha={summary['alpha']}, delta 1e-5, mean of seeds {seeds}",
                 fontsize=12, fontweight="bold")
    hospitals = sorted({h for p in points for h in p["local_only"]})
    for ax, metric in zip(axes, ("accuracy", metric2), strict=True):
        ys = [p["global"].get(metric) for p in points]
        ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", linewidth=2.5,
                color="tab:blue", label="federated (global)")
        for x, y in zip(xs, ys, strict=True):
            if y is not None:
                ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=8, color="tab:blue")
        for index, name in enumerate(hospitals):
            local = [p["local_only"].get(name, {}).get(metric) for p in points]
            if any(v is not None for v in local):
                ax.plot(xs, [np.nan if v is None else v for v in local], marker="s",
                        linestyle="--", linewidth=1.3, color=f"C{index + 1}",
                        label=f"{name} alone")
        refs = [p["reference"] for p in points if p.get("reference")]
        if metric == "accuracy" and refs:
            ref_acc = _mean([r["accuracy"] for r in refs])
            if ref_acc is not None:
                ax.axhline(ref_acc, color="gray", linestyle=":",
                           label=f"{refs[0]['name']}, pooled data, no DP")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([p["label"] if p["label"] != "inf" else "inf\n(no DP)"
                            for p in points])
        ax.minorticks_off()
        ax.set_xlabel("epsilon per hospital for the whole job")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_title(f"{LABELS.get(metric, metric)} on the held-out test set")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def print_sweep(summary: Mapping[str, Any], stream: TextIO) -> None:
    metric2 = summary["second_metric"]
    stream.write(f"\nPrivacy-utility sweep, {summary['model_type']} (mean over seeds):\n")
    table = Table(["epsilon", "seeds", "global acc", f"global {LABELS.get(metric2, metric2)}",
                   "max eps spent", "best alone acc", "reference acc"], stream)
    table.header()
    for p in summary["points"]:
        alone = [v.get("accuracy") for v in p["local_only"].values()
                 if v.get("accuracy") is not None]
        ref = p.get("reference") or {}
        table.row([p["label"], str(len(p["seeds"])), fmt(p["global"].get("accuracy")),
                   fmt(p["global"].get(metric2)), fmt(p["max_epsilon_spent"], 3),
                   fmt(max(alone) if alone else None), fmt(ref.get("accuracy"))])
    stream.flush()
