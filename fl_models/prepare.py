"""Write one data folder per hospital plus a held-out test set.

    python -m fl_models.prepare --model_type X --clients N --out DIR [--alpha A] [--seed S]

IID by default; --alpha gives label skew (Dirichlet, smaller = more skewed). The same
arguments always write the same files. Each folder is in a format the task's
dataset.py loads, so a hospital_k folder is exactly what a client's --data_path takes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fl_models.partition import GLOBAL_TEST_DIR, hospital_dir
from fl_models.registry import TASK_NAMES, get_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_models.prepare", description=__doc__)
    parser.add_argument("--model_type", required=True, choices=TASK_NAMES)
    parser.add_argument("--clients", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--alpha", type=float, help="Dirichlet label skew; omit for IID")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples", type=int, help="examples to generate (synthetic tasks only; default: task's)"
    )
    args = parser.parse_args(argv)

    options: dict[str, object] = {} if args.samples is None else {"samples": args.samples}
    try:
        task = get_task(args.model_type, **options)
    except TypeError:
        parser.error(f"--samples does not apply to {args.model_type} (real data, fixed size)")
    task.prepare(args.out, args.clients, args.alpha, args.seed)

    print(f"{task.name} -> {args.out} (seed {args.seed}, alpha {args.alpha or 'IID'})")
    # Per-class counts show the label skew; with many classes, how many are present.
    wide = task.num_classes <= 10
    columns = " | ".join(task.class_names) if wide else "classes present"
    print(f"| folder | split | examples | {columns} |")
    folders = [hospital_dir(args.out, i) for i in range(1, args.clients + 1)]
    for folder in [*folders, args.out / GLOBAL_TEST_DIR]:
        splits = ("train", "test") if folder.name != GLOBAL_TEST_DIR else ("test",)
        for split in splits:
            labels = task.load_split(folder, split).tensors[1].numpy()
            counts = np.bincount(labels, minlength=task.num_classes)
            cells = " | ".join(map(str, counts)) if wide else str(int((counts > 0).sum()))
            print(f"| {folder.name} | {split} | {len(labels)} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
