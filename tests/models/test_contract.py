"""Every registered task satisfies the interface the client and server daemons rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fl_models.base import HyperParams, Task
from fl_models.registry import TASK_NAMES, get_task
from fl_models.training import concat
from tests.models.helpers import prepared

BINARY_KEYS = {"accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity", "loss"}
MULTICLASS_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "loss"}


def test_registry_names_are_the_five_tasks() -> None:
    assert TASK_NAMES == ("breast_cancer", "ecg", "glaucoma", "pneumonia", "symptom")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model type 'mri'") as info:
        get_task("mri")
    for name in TASK_NAMES:
        assert name in str(info.value)


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    return {name: prepared(name, root, samples=400) for name in TASK_NAMES}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_declares_consistent_metadata(name: str) -> None:
    task = get_task(name)
    assert isinstance(task, Task)
    assert task.name == name
    assert isinstance(task.hyperparams, HyperParams)
    assert task.num_classes == len(task.class_names) >= 2
    assert task.baseline_epochs >= 1


@pytest.mark.parametrize("name", TASK_NAMES)
def test_model_is_opacus_compatible_and_seeded(name: str) -> None:
    task = get_task(name)
    torch.manual_seed(0)
    model = task.build_model()
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(2, *task.input_shape)).shape == (2, task.num_classes)
    torch.manual_seed(0)
    again = task.build_model().state_dict()
    assert all(torch.equal(t, again[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prepared_folders_load_and_evaluate(name: str, federations: dict[str, Path]) -> None:
    task = get_task(name)
    folder = federations[name]
    model = task.build_model()
    for path, split in [
        (folder / "hospital_1", "train"),
        (folder / "hospital_2", "test"),
        (folder / "test", "test"),
    ]:
        data = task.load_split(path, split)
        inputs, labels = data.tensors
        assert inputs.shape[1:] == task.input_shape
        assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < task.num_classes
    metrics = task.evaluate(model, data)
    assert set(metrics) == (BINARY_KEYS if task.num_classes == 2 else MULTICLASS_KEYS)
    assert all(isinstance(v, float) for v in metrics.values())
    matrix = task.confusion(model, data)
    assert len(matrix) == task.num_classes and all(len(r) == task.num_classes for r in matrix)
    assert sum(map(sum, matrix)) == len(data)
    # The figures are the ones their names promise, from the confusion matrix (rows
    # true, columns predicted) and a direct cross-entropy, not just present.
    m = np.array(matrix, dtype=np.float64)
    truth = m.sum(axis=1)
    predicted = m.sum(axis=0)
    assert metrics["accuracy"] == pytest.approx(np.trace(m) / len(data))
    recalls = [m[c, c] / truth[c] for c in range(task.num_classes) if truth[c]]
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    model.eval()
    assert metrics["loss"] == pytest.approx(_loss(model, data), rel=1e-4)
    if task.num_classes == 2:
        if truth[1]:
            assert metrics["sensitivity"] == pytest.approx(m[1, 1] / truth[1])
        if truth[0]:
            assert metrics["specificity"] == pytest.approx(m[0, 0] / truth[0])
    else:
        present = [c for c in range(task.num_classes) if truth[c] or predicted[c]]
        f1 = [2 * m[c, c] / (truth[c] + predicted[c]) for c in present]
        assert metrics["macro_f1"] == pytest.approx(np.mean(f1))


def _loss(model: torch.nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        inputs, labels = data.tensors
        return float(torch.nn.functional.cross_entropy(model(inputs), labels))


# Opacus warns that secure RNG is off, and torch that its per-sample-gradient hooks fire
# on a first layer whose input needs no gradient; both are expected here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("private", [False, True], ids=["plain", "opacus"])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_falls_over_a_few_steps(
    name: str, private: bool, federations: dict[str, Path]
) -> None:
    """Six full-batch steps on 32 mixed examples, plain and through Opacus with a small noise.

    This checks that every model trains through Opacus's machinery (per-sample
    gradients on every parameter, clipping, noise), not the utility of DP training,
    which the federation measures. The step is small and the clipping bound loose so
    the outcome is deterministic: with a tight bound at initialisation the clipped mean
    gradient of a CNN can point uphill for a few steps (per-example gradient norms
    differ by 4x there), which is DP-SGD's known clipping bias, not a defect.
    """
    task = get_task(name)
    folder = federations[name]
    pooled = concat([task.load_split(folder / f"hospital_{i}", "train") for i in (1, 2)])
    pick = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))[:32]
    data = TensorDataset(*(t[pick] for t in pooled.tensors))
    torch.manual_seed(0)
    model = task.build_model()
    before = _loss(model, data)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.003)
    loader = DataLoader(data, batch_size=len(data))
    trained: torch.nn.Module = model
    if private:
        trained, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=0.01, max_grad_norm=10.0, poisson_sampling=False,
        )  # fmt: skip
    for _ in range(6):
        for inputs, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(trained(inputs), labels).backward()
            if private:
                assert all(getattr(p, "grad_sample", None) is not None for p in model.parameters())
            optimizer.step()
    assert _loss(model, data) < before - 1e-3
