"""The contract between a medical task and the federation code that drives it.

The daemons never import a task package directly: they ask the registry for a
`Task` by its --model_type name and only use what is declared here, so a new model
can be added without touching the client or the server.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import torch
from torch.utils.data import TensorDataset

SPLITS: tuple[str, ...] = ("train", "test")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


class DataFormatError(ValueError):
    """A data file or folder a task cannot use.

    Hospitals point clients at their own files, so the message always starts with the
    offending path and says what was wrong with it: that is what an operator needs to
    fix the data without reading code.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class HyperParams:
    """Local training and differential-privacy defaults for one task.

    Either `noise_multiplier` or `target_epsilon` drives Opacus (the trainer picks);
    both are given so a deployment can switch without inventing numbers.
    """

    local_epochs: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    target_epsilon: float
    delta: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for field in ("learning_rate", "max_grad_norm", "target_epsilon"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def make_optimizer(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """Build the optimizer these settings name, so every trainer builds the same one."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params,
            lr=self.learning_rate,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


def check_split(split: str) -> None:
    """Reject a split name early: a typo would otherwise surface as a missing file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class Task(ABC):
    """One medical model: its data formats, network, defaults and metrics.

    Subclasses set `name`, `class_names`, `input_shape`, `hyperparams` and
    `baseline_epochs` and implement the four methods; `num_classes` follows from
    `class_names` so the two can never disagree.
    """

    name: ClassVar[str]
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    hyperparams: HyperParams
    baseline_epochs: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised network (from torch's global RNG), Opacus-compatible."""

    @abstractmethod
    def load_split(self, data_path: Path, split: str) -> TensorDataset:
        """The (inputs, int64 labels) of `split` ("train" or "test") under `data_path`."""

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> dict[str, float]:
        """Flat metrics (accuracy, balanced_accuracy, loss and the task's own)."""

    @abstractmethod
    def confusion(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> list[list[int]]:
        """Confusion matrix, rows = true class, columns = predicted, in class order."""

    @abstractmethod
    def prepare(self, out_dir: Path, clients: int, alpha: float | None, seed: int) -> None:
        """Write out_dir/hospital_1..N (train + test each) and out_dir/test."""

    def reference_metrics(
        self, train: TensorDataset, test: TensorDataset
    ) -> tuple[str, dict[str, float]] | None:
        """(name, metrics) of a classical model on the same data, when the task has one.

        The centralised baseline prints it next to the network's numbers, so a
        regression in the network shows up as a gap rather than as a plain number.
        """
        return None


class FolderTask(Task):
    """A task whose behaviour lives in its folder's four modules.

    Every task folder has the same dataset.py, model.py, hyperparams.py and
    evaluate.py; a subclass names them (and its classes and input shape) and
    inherits the wiring, so adding a model never means copying delegation code.
    `samples` sizes the synthetic default data, for tasks that generate theirs
    (dataset.DEFAULT_SAMPLES); tasks on real shipped data take none.
    """

    dataset_module: ModuleType
    model_module: ModuleType
    hyperparams_module: ModuleType
    evaluate_module: ModuleType

    def __init__(self, samples: int | None = None) -> None:
        default = getattr(self.dataset_module, "DEFAULT_SAMPLES", None)
        if samples is not None and default is None:
            raise ValueError(f"{self.name} loads real data; 'samples' does not apply to it")
        self.samples: int | None = default if samples is None else samples
        self.hyperparams = self.hyperparams_module.hyperparams()
        self.baseline_epochs = self.hyperparams_module.BASELINE_EPOCHS

    def build_model(self) -> torch.nn.Module:
        model: torch.nn.Module = self.model_module.build_model()
        return model

    def load_split(self, data_path: Path, split: str) -> TensorDataset:
        dataset: TensorDataset = self.dataset_module.load_split(data_path, split)
        return dataset

    def evaluate(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> dict[str, float]:
        metrics: dict[str, float] = self.evaluate_module.evaluate(model, dataset, batch_size)
        return metrics

    def confusion(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> list[list[int]]:
        matrix: list[list[int]] = self.evaluate_module.confusion(model, dataset, batch_size)
        return matrix

    def prepare(self, out_dir: Path, clients: int, alpha: float | None, seed: int) -> None:
        if self.samples is None:
            self.dataset_module.prepare(out_dir, clients, alpha, seed)
        else:
            self.dataset_module.prepare(out_dir, clients, alpha, seed, self.samples)
