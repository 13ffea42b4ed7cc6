"""Plain (non-private) training, for the centralised baseline and for tests, and the
device a hospital's training runs on.

The federation's private local training lives in fl_client; this loop is the
reference it is compared with, so it uses the task's own optimizer settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_core.constants import TRAINING_DEVICES


def training_device(name: str) -> torch.device:
    """The device `--device NAME` means: cpu, cuda, or auto (cuda when there is one).

    A cuda that is not there is an error here, at start-up, rather than in the middle
    of a round the server is waiting for."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in TRAINING_DEVICES:
        raise ValueError(f"device must be cpu, cuda or auto, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """How logs and reports name a training device: "cpu", or "cuda (<the GPU's model>)"
    so an operator sees which card a hospital (or a simulation's worker) trained on."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def release_device_memory(device: torch.device) -> None:
    """Give the GPU memory a round cached back to the driver once its tensors are gone.

    Why: PyTorch keeps freed GPU blocks reserved for the process. A hospital daemon idles
    between rounds, and a simulation shares one GPU between several hospitals' workers,
    so a round's peak held for good would starve the GPU's other users (and, for the
    simulation's workers, each other). Nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def concat(datasets: Sequence[TensorDataset]) -> TensorDataset:
    """One TensorDataset holding all rows, e.g. every hospital's training split."""
    if not datasets:
        raise ValueError("no datasets to concatenate")
    width = len(datasets[0].tensors)
    return TensorDataset(*(torch.cat([d.tensors[i] for d in datasets]) for i in range(width)))


def train(
    model: torch.nn.Module,
    dataset: TensorDataset,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train with cross-entropy and a cosine-decayed learning rate; mean loss per epoch.

    The cosine decay lets a long centralised run settle instead of bouncing around
    at the federation's (larger) constant local learning rate.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    total_steps = max(1, epochs * len(loader))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    step = 0
    history: list[float] = []
    model.train()
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for inputs, targets in loader:
            scale = 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * scale
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
            step += 1
        history.append(loss_sum / max(1, seen))
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base
    return history
