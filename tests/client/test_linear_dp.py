"""The closed-form clipped gradient of a model whose only trainable layer is one final
Linear layer is Opacus's DP-SGD step.

Checked against Opacus's hooks mode (per-sample gradients materialised, then clipped
and summed) on the same batch, and end to end through train_round with real noise:
the same noise, steps, sample rate and epsilon, the same model."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_client.linear_dp import clipped_grad_sum, linear_head, noise_and_account
from fl_client.local_training import train_round
from fl_client.privacy_ledger import PrivacyLedger
from fl_models.base import Task
from fl_models.cnn2d import dp_cnn
from fl_models.pneumonia import PneumoniaTask
from fl_models.registry import get_task
from fl_proto import coordinator_pb2 as pb
from tests.client.test_local_training import one_thread  # noqa: F401  (autouse: 1 thread)

CPU = torch.device("cpu")
DELTA = 1e-5


def opacus_clipped_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Opacus hooks mode's clipped per-example sum (noise 0) and the per-example norms."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=max(1, len(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=clip, poisson_sampling=False, grad_sample_mode="hooks")
        criterion(dp_model(x), y).backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in dp_opt.params],
                        dim=1).norm(dim=1)
    dp_opt.pre_step()
    return [p.summed_grad.detach().clone() for p in dp_opt.params], norms


class _Shift(nn.Module):
    """A front end with a buffer and no trainable parameter (as ecg's fixed scaling)."""

    offset: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1, 1, 20), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) * 0.2


CASES = {
    # name: (model, example shape, classes, batch, criterion)
    "breast_cancer-like": (lambda: nn.Sequential(nn.Linear(30, 2)), (30,), 2, 512,
                           nn.CrossEntropyLoss()),
    "symptom-like": (lambda: nn.Sequential(nn.Linear(132, 41)), (132,), 41, 300,
                     nn.CrossEntropyLoss()),
    "no bias": (lambda: nn.Linear(12, 3, bias=False), (12,), 3, 64, nn.CrossEntropyLoss()),
    "flattened images": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(20, 4)), (4, 5), 4,
                         64, nn.CrossEntropyLoss()),
    "label smoothing (autograd path)": (lambda: nn.Sequential(nn.Linear(10, 5)), (10,), 5,
                                        64, nn.CrossEntropyLoss(label_smoothing=0.1)),
    "parameter-free front end": (lambda: nn.Sequential(nn.Flatten(), nn.Tanh(), _Shift(),
                                                       nn.Linear(20, 4)), (4, 5), 4, 64,
                                 nn.CrossEntropyLoss()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_clipped_sum_equals_opacus_hooks(case: str) -> None:
    build, shape, classes, batch, criterion = CASES[case]
    torch.manual_seed(0)
    reference, ours = build(), build()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, *shape) * torch.rand(batch, *([1] * len(shape))) * 3
    y = torch.randint(0, classes, (batch,))
    expected, norms = opacus_clipped_sums(reference, x, y, criterion, clip := 1.0)
    # a meaningful check: some examples are clipped, some pass unchanged
    assert (norms > clip).any() and (norms < clip).any()

    head = linear_head(ours, shape)
    assert head is not None
    logits, loss = clipped_grad_sum(head, x, y, criterion, clip)
    got = [p.grad for p in ours.parameters()]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g is not None
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, ours(x))
    torch.testing.assert_close(loss, criterion(logits, y))
    assert criterion.reduction == "mean"  # restored after the per-example call


def test_an_empty_batch_gives_zero_gradients() -> None:
    model = nn.Sequential(nn.Linear(6, 3))
    head = linear_head(model, (6,))
    assert head is not None
    clipped_grad_sum(head, torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64),
                     nn.CrossEntropyLoss(), 1.0)
    linear = head.linear
    assert linear.bias is not None and linear.weight.grad is not None
    assert not linear.weight.grad.any() and linear.bias.grad is not None
    assert not linear.bias.grad.any()


def test_noise_and_account_is_opacus_pre_step() -> None:
    """The same noise, scaling and accountant step as the optimizer's own pre_step."""
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    runs = []
    for finish in ("pre_step", "noise_and_account"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            dp_model, dp_opt, _, _ = engine.make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                criterion=nn.CrossEntropyLoss(), noise_multiplier=1.3, max_grad_norm=0.5,
                poisson_sampling=True, grad_sample_mode="ghost",
                noise_generator=torch.Generator().manual_seed(5))
        dp_model.remove_hooks()
        head = linear_head(model, (6,))
        assert head is not None
        for _ in range(3):
            dp_opt.zero_grad(set_to_none=True)
            clipped_grad_sum(head, x[:8], y[:8], nn.CrossEntropyLoss(), 0.5)
            assert (dp_opt.pre_step() if finish == "pre_step" else noise_and_account(dp_opt))
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            dp_opt.original_optimizer.step()
        runs.append((grads, engine.accountant.history))
    (grads_a, history_a), (grads_b, history_b) = runs
    assert history_a == history_b == [(1.3, 0.2, 3)]
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Probe(nn.Linear):
    pass


@pytest.mark.parametrize(("model", "shape", "qualifies"), [
    (nn.Linear(4, 2), (4,), True),
    (nn.Sequential(nn.Linear(4, 2)), (4,), True),
    (nn.Sequential(nn.Flatten(), nn.Linear(8, 2)), (2, 4), True),
    (nn.Sequential(nn.Linear(4, 2)), (3, 4), False),  # a Linear applied per position
    (nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(4, 2)), (2, 4), False),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (4,), False),
    (nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=1)), (4,), False),
    (nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(8, 2)), (2, 4), True),
    (nn.Sequential(nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 2)), (2, 4), False),
    (nn.Sequential(nn.Flatten(), nn.LayerNorm(8, elementwise_affine=False),
                   nn.Linear(8, 2)), (2, 4), True),
    (nn.Sequential(_Probe(4, 2)), (4,), False),  # a subclass may change forward
])
def test_which_models_qualify(model: nn.Module, shape: tuple[int, ...], qualifies: bool) -> None:
    assert (linear_head(model, shape) is not None) == qualifies


@pytest.mark.parametrize("name", ["breast_cancer", "symptom", "ecg", "glaucoma", "pneumonia"])
def test_the_linear_tasks_qualify(name: str) -> None:
    task = get_task(name)
    assert linear_head(task.build_model(), task.input_shape) is not None


# --- end to end through train_round ----------------------------------------------------


@pytest.fixture(scope="module")
def bc() -> Task:
    return get_task("breast_cancer")


@pytest.fixture(scope="module")
def bc_train(bc: Task) -> TensorDataset:
    """A hospital's worth of breast_cancer-shaped records (standardised features, a
    linear rule for the label): enough for several Poisson batches at batch 32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(160, *bc.input_shape, generator=g)
    return TensorDataset(x, (x[:, :4].sum(dim=1) > 0).long())


def config(*, batch: int = 32, epochs: int = 2, noise: float = 1.0, target: float = 0.0,
           mu: float = 0.0) -> pb.TrainConfig:
    return pb.TrainConfig(
        local_epochs=epochs, batch_size=batch, proximal_mu=mu, seed=7,
        privacy=pb.PrivacyConfig(enabled=True, noise_multiplier=noise,
                                 target_epsilon=target, delta=DELTA))


@pytest.mark.parametrize(("cfg", "label"), [
    (config(mu=0.5), "noise 1, FedProx"),
    (config(noise=0.0, target=2.0), "noise from a target epsilon"),
    (config(batch=512, epochs=3), "the task's default batch"),
])
def test_train_round_equals_hooks_mode_with_noise(
    bc: Task, bc_train: TensorDataset, tmp_path: Path, cfg: pb.TrainConfig, label: str
) -> None:
    """Same seed: the same Poisson batches and the same noise draws, so the same model;
    and the accountant and the ledger see the same steps, sample rate and noise."""
    torch.manual_seed(0)
    state = bc.build_model().state_dict()
    runs = {}
    for mode in ("auto", "hooks"):
        ledger = PrivacyLedger(tmp_path / mode, "hospital_1", 1000.0, DELTA, accountant="rdp")
        runs[mode] = (train_round(bc, state, bc_train, cfg, CPU, ledger, False, job_id="j",
                                  round=1, private_seed=41, grad_sample_mode=mode,
                                  max_physical_batch_size=7), ledger)
    (fast, fast_ledger), (hooks, hooks_ledger) = runs["auto"], runs["hooks"]
    assert (fast.steps, fast.sample_rate, fast.noise_multiplier, fast.epsilon_round) == (
        hooks.steps, hooks.sample_rate, hooks.noise_multiplier, hooks.epsilon_round)
    assert fast.noise_multiplier > 0 and fast.steps > 1
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in fast_ledger.entries()] == \
        [(e.noise_multiplier, e.sample_rate, e.steps) for e in hooks_ledger.entries()]
    assert fast_ledger.spent() == hooks_ledger.spent()
    moved = math.sqrt(sum(float(((hooks.state[k] - state[k]) ** 2).sum()) for k in state))
    assert moved > 0.1  # the noise and the steps did move the model
    for key in hooks.state:
        torch.testing.assert_close(fast.state[key], hooks.state[key], atol=1e-5, rtol=1e-4)
    assert fast.metrics["train_loss"] == pytest.approx(hooks.metrics["train_loss"], rel=1e-4)


@pytest.mark.parametrize(("name", "examples"), [("ecg", 96), ("glaucoma", 24)])
def test_fixed_front_end_equals_hooks_mode_with_noise(name: str, examples: int) -> None:
    """ecg (fixed spectral features) and glaucoma (fixed scattering features), then the
    Linear layer: the closed form trains the same model as hooks."""
    task = get_task(name)
    g = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(examples, *task.input_shape, generator=g),
                         torch.randint(0, task.num_classes, (examples,), generator=g))
    state = task.build_model().state_dict()
    fast, hooks = (train_round(task, state, data, config(epochs=1), CPU, None, False,
                               private_seed=43, grad_sample_mode=mode)
                   for mode in ("auto", "hooks"))
    assert (fast.steps, fast.epsilon_round) == (hooks.steps, hooks.epsilon_round)
    for key in hooks.state:
        torch.testing.assert_close(fast.state[key], hooks.state[key], atol=1e-5, rtol=1e-4)
    assert any(bool((hooks.state[k] != state[k]).any()) for k in state)


def test_empty_poisson_batches_are_survived(bc: Task) -> None:
    torch.manual_seed(0)
    state = bc.build_model().state_dict()
    tiny = TensorDataset(torch.randn(4, *bc.input_shape), torch.randint(0, 2, (4,)))
    res = train_round(bc, state, tiny, config(batch=1, epochs=5), CPU, None, False,
                      private_seed=32, grad_sample_mode="linear")
    assert res.steps == 20
    assert all(torch.isfinite(v).all() for v in res.state.values())


class _CnnPneumonia(PneumoniaTask):
    """pneumonia with its former narrow CNN (trainable convolutions before the head)."""

    def build_model(self) -> nn.Module:
        return dp_cnn(in_channels=1, num_classes=2)


def test_linear_mode_refuses_a_network_with_trainable_layers_before_the_last() -> None:
    cnn = _CnnPneumonia()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, *cnn.input_shape), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="one final Linear layer"):
        train_round(cnn, cnn.build_model().state_dict(), data, config(), CPU, None, False,
                    grad_sample_mode="linear")
