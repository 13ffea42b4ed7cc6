"""Small task instances and data for the model tests (kept tiny: 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

from fl_models.base import Task
from fl_models.registry import get_task

SMALL_SAMPLES = 120


def small_task(name: str, samples: int = SMALL_SAMPLES) -> Task:
    """The task with a small synthetic data set where its generator takes a size."""
    task = get_task(name)
    if getattr(task, "samples", None) is not None:  # a task that generates its data
        return get_task(name, samples=samples)
    return task


def prepared(
    name: str,
    root: Path,
    clients: int = 2,
    alpha: float | None = None,
    seed: int = 0,
    samples: int = SMALL_SAMPLES,
) -> Path:
    """A small federation of `name` written under root; returns its folder."""
    out = root / f"{name}_{clients}_{alpha}_{seed}_{samples}"
    small_task(name, samples).prepare(out, clients, alpha, seed)
    return out
