"""What a hospital's data looks like to the trainer: examples per class.

Logged by the client at start and checked by the doctor, so a site that points at
the wrong folder (or a record whose windows all fall outside the task's classes)
sees "normal: 0, af: 0, pvc: 0" before a round is wasted on it.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def class_counts(dataset: TensorDataset, class_names: list[str] | tuple[str, ...]
                 ) -> dict[str, int]:
    """Examples per class name, in the task's class order (zero counts included)."""
    labels = dataset.tensors[1].reshape(-1).to(torch.int64)
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    return {name: int(counts[i]) for i, name in enumerate(class_names)}


def describe(counts: dict[str, int]) -> str:
    """`normal: 120, af: 31, pvc: 9` (class names may hold spaces: symptom's do)."""
    return ", ".join(f"{name}: {n}" for name, n in counts.items())
