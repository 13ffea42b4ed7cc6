"""Centralised baseline: train one model on all hospitals' training data, report metrics.

    python -m fl_models.train --model_type X --data_path DIR [--epochs E] [--seed S]

DIR is either a folder written by fl_models.prepare (hospital_*/ and test/: the
pooled hospital training splits are trained on, the held-out test/ is reported) or
one hospital's own data folder (its train and test splits). This is the number a
federation is compared with: same data, no federation, no differential privacy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fl_models.base import Task
from fl_models.partition import GLOBAL_TEST_DIR, HOSPITAL_PREFIX
from fl_models.registry import TASK_NAMES, get_task
from fl_models.training import concat, train


def load_data(task: Task, data_path: Path) -> tuple[TensorDataset, TensorDataset, str]:
    """(train, test, description of the test set) for a federation folder or one hospital."""
    hospitals = sorted(
        (p for p in data_path.glob(f"{HOSPITAL_PREFIX}*") if p.is_dir()),
        key=lambda p: (len(p.name), p.name),  # hospital_2 before hospital_10
    )
    if not hospitals:
        return task.load_split(data_path, "train"), task.load_split(data_path, "test"), "test"
    train_set = concat([task.load_split(h, "train") for h in hospitals])
    if (data_path / GLOBAL_TEST_DIR).is_dir():
        return train_set, task.load_split(data_path / GLOBAL_TEST_DIR, "test"), "global test"
    pooled = concat([task.load_split(h, "test") for h in hospitals])
    return train_set, pooled, f"pooled test of {len(hospitals)} hospitals"


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A Markdown table, metrics as rows and models as columns, ready for a README."""
    names = list(columns)
    metrics = list(dict.fromkeys(m for col in columns.values() for m in col))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        cells = [_cell(columns[n].get(metric, math.nan)) for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_confusion(matrix: list[list[int]], class_names: tuple[str, ...]) -> str:
    """The whole matrix for a few classes; for many, only the largest confusions."""
    if len(class_names) <= 10:
        lines = ["confusion (rows true, columns predicted): " + ", ".join(class_names)]
        lines += ["  " + " ".join(f"{v:6d}" for v in row) for row in matrix]
        return "\n".join(lines)
    errors = sorted(
        (
            (count, true, pred)
            for true, row in enumerate(matrix)
            for pred, count in enumerate(row)
            if true != pred and count
        ),
        reverse=True,
    )[:5]
    lines = ["largest confusions (true -> predicted: count):"]
    lines += [f"  {class_names[t]} -> {class_names[p]}: {c}" for c, t, p in errors]
    return "\n".join(lines)


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_models.train", description=__doc__)
    parser.add_argument("--model_type", required=True, choices=TASK_NAMES)
    parser.add_argument("--data_path", required=True, type=Path)
    parser.add_argument("--epochs", type=int, help="default: the task's baseline epochs")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and shuffling")
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (1 is fastest for the small models)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_task(args.model_type)
    train_set, test_set, test_name = load_data(task, args.data_path)
    epochs = args.epochs or task.baseline_epochs
    torch.manual_seed(args.seed)
    model = task.build_model()
    optimizer = task.hyperparams.make_optimizer(model.parameters())
    started = time.perf_counter()
    losses = train(model, train_set, optimizer, epochs, task.hyperparams.batch_size, args.seed)
    seconds = time.perf_counter() - started

    columns = {task.name: task.evaluate(model, test_set)}
    reference = task.reference_metrics(train_set, test_set)
    if reference is not None:
        reference_name, reference_columns = reference
        columns[reference_name] = reference_columns
    print(
        f"{task.name}: {len(train_set)} training examples, {len(test_set)} in the {test_name}, "
        f"{epochs} epochs in {seconds:.1f} s (final training loss {losses[-1]:.4f})"
    )
    print(format_table(columns))
    print(format_confusion(task.confusion(model, test_set), task.class_names))
    if args.json is not None:
        args.json.write_text(json.dumps({"task": task.name, "epochs": epochs, **columns}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
