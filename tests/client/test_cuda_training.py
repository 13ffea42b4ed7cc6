"""Training on a CUDA device (`fl-client --device cuda`) computes what the CPU computes.

Why: a hospital with a GPU trains there, and the server cannot tell a wrong update from
a noisy one, so the device path must be checked against the CPU path where it can be:
- without DP, from the same seed, the same batches give the same update up to the
  GPU's float sums (cuDNN's convolutions run in TF32 unless told not to);
- with DP, the noise comes from a generator on the device, so the CUDA update cannot
  equal the CPU one; but the Poisson batches come from a CPU generator, so the steps,
  the sample rate, the noise and the epsilon the ledger is charged are the same, and
  on the device the closed-form linear path still equals Opacus's hooks;
- whatever trained where, the update comes back on the CPU in the global layout.

These tests skip on a machine without CUDA (CI has none); `bench/cuda_check.sh` runs
them on one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_client.linear_dp import linear_head
from fl_client.local_training import TrainResult, evaluate_state, train_round
from fl_models.base import Task
from fl_models.registry import TASK_NAMES, get_task
from fl_proto import coordinator_pb2 as pb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
DELTA = 1e-5
# A relative difference of the updates this small is float rounding (TF32 convolutions
# included) over a few steps; a wrong device path (a missed .to(), a stale buffer, the
# wrong parameters stepped) differs by order 1.
UPDATE_RTOL = 2e-2


def config(*, dp: bool, epochs: int = 1, batch: int = 16, noise: float = 1.0,
           kind: pb.UpdateKind = pb.DELTA) -> pb.TrainConfig:
    return pb.TrainConfig(
        local_epochs=epochs, batch_size=batch, update_kind=kind, seed=7,
        privacy=pb.PrivacyConfig(enabled=dp, noise_multiplier=noise, delta=DELTA))


def data_for(task: Task, examples: int, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(examples, *task.input_shape, generator=g),
                         torch.randint(0, task.num_classes, (examples,), generator=g))


def norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()
                         if t.is_floating_point()))


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return norm({k: a[k].double() - b[k].double() for k in a if a[k].is_floating_point()})


def in_global_layout(result: TrainResult, global_state: dict[str, torch.Tensor]) -> None:
    assert list(result.state) == list(global_state)
    for key, ref in global_state.items():
        got = result.state[key]
        assert (got.dtype, got.shape, got.device.type) == (ref.dtype, ref.shape, "cpu"), key
        assert torch.isfinite(got.float()).all(), key


def on_both_devices(name: str, dp: bool) -> tuple[TrainResult, TrainResult]:
    """One round of the task from the same global model and data, on the CPU and the
    GPU; the GPU's update checked for the global layout."""
    task = get_task(name)
    torch.manual_seed(0)
    global_state = task.build_model().state_dict()
    data = data_for(task, 48)
    cpu, cuda = (train_round(task, global_state, data, config(dp=dp), device, None,
                             allow_no_dp=not dp, private_seed=5)
                 for device in (CPU, CUDA))
    in_global_layout(cuda, global_state)
    return cpu, cuda


@pytest.mark.parametrize("name", TASK_NAMES)
def test_plain_training_on_cuda_equals_the_cpu(name: str) -> None:
    cpu, cuda = on_both_devices(name, dp=False)
    moved = norm(cpu.state)
    assert moved > 0 and cuda.steps == cpu.steps == 3
    assert difference(cuda.state, cpu.state) <= UPDATE_RTOL * moved, name


@pytest.mark.parametrize("name", TASK_NAMES)
def test_dp_training_on_cuda_accounts_as_on_the_cpu(name: str) -> None:
    cpu, cuda = on_both_devices(name, dp=True)
    assert (cuda.steps, cuda.sample_rate, cuda.noise_multiplier, cuda.epsilon_round) == (
        cpu.steps, cpu.sample_rate, cpu.noise_multiplier, cpu.epsilon_round)
    assert cuda.dp_enabled and cuda.epsilon_round > 0
    # noised: the update moved, by an amount of the CPU's order (the same noise scale)
    assert 0.2 < norm(cuda.state) / norm(cpu.state) < 5.0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_closed_form_equals_hooks_on_cuda(name: str) -> None:
    """Same seed on the same device: the same batches and noise draws, so the closed form
    (the default for a model whose only trainable layer is its last Linear: every task's
    today) and Opacus's per-sample hooks train the same model."""
    task = get_task(name)
    assert linear_head(task.build_model(), task.input_shape) is not None, name
    torch.manual_seed(0)
    global_state = task.build_model().state_dict()
    data = data_for(task, 64)
    fast, hooks = (train_round(task, global_state, data, config(dp=True, epochs=2,
                                                                 kind=pb.WEIGHTS),
                               CUDA, None, False, private_seed=43, grad_sample_mode=mode)
                   for mode in ("auto", "hooks"))
    assert (fast.steps, fast.epsilon_round) == (hooks.steps, hooks.epsilon_round)
    moved = difference(hooks.state, global_state)
    assert moved > 0
    assert difference(fast.state, hooks.state) <= 1e-3 * moved


@pytest.mark.parametrize("name", TASK_NAMES)
def test_evaluation_on_cuda_equals_the_cpu(name: str) -> None:
    task = get_task(name)
    torch.manual_seed(1)
    state = task.build_model().state_dict()
    data = data_for(task, 300, seed=9)
    on_cpu, on_cuda = (evaluate_state(task, state, data, d) for d in (CPU, CUDA))
    assert set(on_cuda) == set(on_cpu)
    # a few borderline examples may flip under TF32 rounding; the loss barely moves
    assert abs(on_cuda["accuracy"] - on_cpu["accuracy"]) <= 2 / len(data)
    assert on_cuda["loss"] == pytest.approx(on_cpu["loss"], rel=1e-2)
    # the global model handed in is untouched (evaluation moved a copy)
    assert all(t.device.type == "cpu" for t in state.values())


@pytest.mark.parametrize("name", ["breast_cancer", "pneumonia"])
def test_a_round_leaves_no_gpu_memory_behind(name: str) -> None:
    """A hospital daemon idles between rounds, and the simulation's workers share a GPU:
    a round (DP or not) and an evaluation free every tensor they put on the device, and
    hand the memory PyTorch cached for them back to the driver."""
    task = get_task(name)
    torch.manual_seed(0)
    global_state = task.build_model().state_dict()
    data = data_for(task, 48)
    def rounds() -> None:
        for dp in (True, False):
            train_round(task, global_state, data, config(dp=dp), CUDA, None, allow_no_dp=True)
        evaluate_state(task, global_state, data, CUDA)
        torch.cuda.synchronize()

    # the first rounds create what stays for the process: the CUDA context, and cuBLAS's
    # workspaces (32 MiB each on a Hopper GPU) the first time each kind of product runs
    rounds()
    allocated = torch.cuda.memory_allocated()
    rounds()
    assert torch.cuda.memory_allocated() == allocated  # every tensor of theirs freed
    # and the cache given back: what stays reserved is the segments holding the blocks
    # that stay (a small block's segment is 2 MiB); kept, pneumonia's was 46 MB more
    assert torch.cuda.memory_reserved() - allocated <= 2 << 20
