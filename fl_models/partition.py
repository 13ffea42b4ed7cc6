"""Splitting one labelled dataset into hospitals, deterministically by seed.

Every task's `prepare` goes through `write_federation`, so the held-out test set,
the IID / Dirichlet label skew and the per-hospital train/test split behave the
same whatever the data format; a task only supplies how to write rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

TEST_FRACTION = 0.2
HOSPITAL_PREFIX = "hospital_"
GLOBAL_TEST_DIR = "test"
_MAX_DIRICHLET_TRIES = 1000

# write(folder, split, row_indices): a task writes those rows of its dataset as `split`.
SplitWriter = Callable[[Path, str, np.ndarray], None]


def stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: `fraction` of the rows held out, spread over the classes.

    Each class gives its share rounded down, and the rows still missing go to the
    classes with the largest remainders, so the held-out part has the right size even
    with many small classes. A class is never held out whole: a model cannot learn a
    class that only exists in its test set.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    held_counts = np.minimum(np.floor(exact).astype(np.int64), np.maximum(counts - 1, 0))
    missing = int(round(fraction * len(labels))) - int(held_counts.sum())
    order = rng.permutation(len(classes))
    order = order[np.argsort(-(exact - np.floor(exact))[order], kind="stable")]
    for c in order:
        if missing <= 0:
            break
        if held_counts[c] < counts[c] - 1:
            held_counts[c] += 1
            missing -= 1
    kept: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for cls, n_held in zip(classes, held_counts, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return _shuffled(kept, rng), _shuffled(held, rng)


def _shuffled(parts: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return rng.permutation(joined).astype(np.int64)


def holdout_indices(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """Indices of `split` when a hospital gives one file holding both splits.

    Fixed seed: loading "train" and then "test" from the same file must give
    complementary, disjoint parts on every call and every machine.
    """
    kept, held = stratified_holdout(labels, TEST_FRACTION, np.random.default_rng(seed))
    return np.sort(kept if split == "train" else held)


def partition(
    labels: np.ndarray,
    clients: int,
    alpha: float | None,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Indices per client: IID when `alpha` is None, else Dirichlet(alpha) label skew.

    Under skew each class is shared out by its own Dirichlet draw (small alpha:
    hospitals dominated by a few classes); draws are retried until every hospital has
    `min_size` examples, as an empty hospital cannot train or be evaluated.
    """
    n = len(labels)
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if n < clients:
        raise ValueError(f"cannot split {n} examples among {clients} hospitals")
    min_size = min(min_size, n // clients)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        joined = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in joined) >= min_size:
            return joined
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gives all {clients} hospitals {min_size} "
        f"examples out of {n}; use a larger alpha or fewer hospitals"
    )


def hospital_dir(out_dir: Path, index: int) -> Path:
    """out_dir/hospital_<index>, 1-based like the client ids the daemons use."""
    return out_dir / f"{HOSPITAL_PREFIX}{index}"


def write_federation(
    out_dir: Path,
    labels: np.ndarray,
    clients: int,
    alpha: float | None,
    seed: int,
    write: SplitWriter,
) -> dict[str, dict[str, int]]:
    """Hold out a global test set, partition the rest, split each hospital, write all.

    Returns the number of rows written per folder and split, for the CLI to print.
    Refuses an out_dir that already holds a federation: mixing a stale hospital_5
    into a new 3-hospital run would silently change the experiment.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(
        p.name == GLOBAL_TEST_DIR or p.name.startswith(HOSPITAL_PREFIX) for p in out_dir.iterdir()
    ):
        raise FileExistsError(f"{out_dir}: already holds prepared data; choose an empty folder")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool, global_test = stratified_holdout(labels, TEST_FRACTION, rng)
    parts = partition(labels[pool], clients, alpha, rng)
    summary: dict[str, dict[str, int]] = {}
    for index, part in enumerate(parts, start=1):
        rows = pool[part]
        train_pos, test_pos = stratified_holdout(labels[rows], TEST_FRACTION, rng)
        folder = hospital_dir(out_dir, index)
        folder.mkdir(parents=True, exist_ok=True)
        write(folder, "train", rows[train_pos])
        write(folder, "test", rows[test_pos])
        summary[folder.name] = {"train": len(train_pos), "test": len(test_pos)}
    test_dir = out_dir / GLOBAL_TEST_DIR
    test_dir.mkdir(parents=True, exist_ok=True)
    write(test_dir, "test", global_test)
    summary[GLOBAL_TEST_DIR] = {"test": len(global_test)}
    return summary
