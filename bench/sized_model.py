"""A synthetic task whose model has exactly N float32 parameters (benchmarks only).

The round, load and memory benchmarks need the real server to serve models of a
chosen size (100 KB .. 256 MB) that no medical task has. `SizedTask` is a normal
`fl_models.base.Task`; `bench.sized_server` registers it in its own process only
(the registry is not changed on disk), so nothing outside bench/ knows about it.

The model is a list of (rows, 1024) float32 matrices of at most `tensor_elems`
elements plus a 1-D tail, so a 100 MB model is ~7 tensors of 16 MiB, like the
large layers of a real network, and the parameter count is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_models.base import HyperParams, Task

DEFAULT_TENSOR_ELEMS = 1 << 22  # 16 MiB of float32 per tensor
ROW = 1024


def layout(params: int,
           tensor_elems: int = DEFAULT_TENSOR_ELEMS) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor; the element counts add up to exactly `params`."""
    if params < 1:
        raise ValueError("params must be >= 1")
    rows = max(1, tensor_elems // ROW)
    out: list[tuple[str, tuple[int, ...]]] = []
    left = params
    index = 0
    while left >= ROW:
        r = min(rows, left // ROW)
        out.append((f"blocks.{index}", (r, ROW)))
        left -= r * ROW
        index += 1
    if left:
        out.append(("tail", (left,)))
    return out


def make_state(params: int, tensor_elems: int = DEFAULT_TENSOR_ELEMS,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the sized model, small uniform values (cheap to generate)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.empty(shape).uniform_(-0.05, 0.05, generator=g)
            for name, shape in layout(params, tensor_elems)}


class SizedModel(nn.Module):
    def __init__(self, params: int, tensor_elems: int = DEFAULT_TENSOR_ELEMS) -> None:
        super().__init__()
        self.shapes = layout(params, tensor_elems)
        self.blocks = nn.ParameterList()
        self.tail: nn.Parameter | None = None
        for name, shape in self.shapes:
            p = nn.Parameter(torch.empty(shape).uniform_(-0.05, 0.05))
            if name == "tail":
                self.tail = p
            else:
                self.blocks.append(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # never trained: no-op clients
        return x


class SizedTask(Task):
    """Benchmark-only task; set `SizedTask.params` before the registry builds it."""

    name: ClassVar[str] = "sized"
    params: ClassVar[int] = 25_000_000
    tensor_elems: ClassVar[int] = DEFAULT_TENSOR_ELEMS
    class_names = ("a", "b")
    input_shape = (1,)
    hyperparams = HyperParams(local_epochs=1, batch_size=32, learning_rate=0.1,
                              max_grad_norm=1.0, noise_multiplier=1.0, target_epsilon=1.0,
                              delta=1e-5)
    baseline_epochs = 1

    def build_model(self) -> nn.Module:
        return SizedModel(self.params, self.tensor_elems)

    def load_split(self, data_path: Path, split: str) -> TensorDataset:
        raise NotImplementedError("the sized benchmark task has no data")

    def evaluate(self, model: nn.Module, dataset: TensorDataset,
                 batch_size: int = 256) -> dict[str, float]:
        return {}

    def confusion(self, model: nn.Module, dataset: TensorDataset,
                  batch_size: int = 256) -> list[list[int]]:
        return [[0, 0], [0, 0]]

    def prepare(self, out_dir: Path, clients: int, alpha: float | None, seed: int) -> None:
        raise NotImplementedError("the sized benchmark task has no data")


def register() -> None:
    """Make "sized" a model type of this process's server: the registry entry, and the
    names Join checks against (bound by fl_server.coordinator at import time)."""
    from fl_models import registry
    from fl_server import coordinator

    registry._TASKS["sized"] = "bench.sized_model:SizedTask"
    registry.TASK_NAMES = tuple(registry._TASKS)
    vars(coordinator)["TASK_NAMES"] = registry.TASK_NAMES
