"""The hospital trainer: DP by default, budget refusal, exact update layout, FedProx."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from fl_client.local_training import (
    PrivacyRequired,
    TrainResult,
    evaluate_state,
    resolve_settings,
    train_round,
)
from fl_client.privacy_ledger import BudgetExceeded, PrivacyLedger, rdp_epsilon
from fl_models.base import Task
from fl_models.registry import TASK_NAMES, get_task
from fl_proto import coordinator_pb2 as pb

CPU = torch.device("cpu")
DELTA = 1e-5


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Opacus's own accountant, stepped the way a PrivacyEngine steps it."""
    acc = RDPAccountant()
    for nm, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=nm, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def config(
    *,
    dp: bool = True,
    epochs: int = 1,
    batch: int = 32,
    noise: float = 1.0,
    target_epsilon: float = 0.0,
    mu: float = 0.0,
    kind: pb.UpdateKind = pb.WEIGHTS,
    seed: int = 7,
) -> pb.TrainConfig:
    return pb.TrainConfig(
        local_epochs=epochs,
        batch_size=batch,
        proximal_mu=mu,
        update_kind=kind,
        seed=seed,
        privacy=pb.PrivacyConfig(
            enabled=dp, noise_multiplier=noise, target_epsilon=target_epsilon, delta=DELTA
        ),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: intra-op threads only add spin-wait contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bc() -> Task:
    return get_task("breast_cancer")


@pytest.fixture(scope="module")
def bc_train(bc: Task, tmp_path_factory: pytest.TempPathFactory) -> TensorDataset:
    root = tmp_path_factory.mktemp("bc")
    bc.prepare(root, 2, None, 0)
    return bc.load_split(root / "hospital_1", "train")


@pytest.fixture()
def global_state(bc: Task) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return bc.build_model().state_dict()


def ledger_at(tmp_path: Path, budget: float = 1000.0) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "state", "hospital_1", budget, DELTA, accountant="rdp")


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a))


# --- accounting ---------------------------------------------------------------------


def test_round_epsilon_equals_opacus_accountant(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ledger = ledger_at(tmp_path)
    first = train_round(bc, global_state, bc_train, config(), CPU, ledger, False,
                        job_id="j", round=1, private_seed=1)
    assert first.dp_enabled and first.noise_multiplier == 1.0
    assert first.steps == math.ceil(len(bc_train) / 32)  # one epoch of logical steps
    assert first.sample_rate == pytest.approx(1 / first.steps)
    mech = (first.noise_multiplier, first.sample_rate, first.steps)
    assert first.epsilon_round == pytest.approx(opacus_epsilon([mech]), rel=1e-9)

    second = train_round(bc, first.state, bc_train, config(epochs=2), CPU, ledger, False,
                         job_id="j", round=2, private_seed=2)
    mech2 = (second.noise_multiplier, second.sample_rate, second.steps)
    assert second.steps == 2 * first.steps
    assert second.epsilon_round > first.epsilon_round  # more steps, more epsilon
    assert second.epsilon_round == pytest.approx(opacus_epsilon([mech2]), rel=1e-9)

    entries = ledger.entries()
    assert [(e.round, e.steps) for e in entries] == [(1, first.steps), (2, second.steps)]
    assert ledger.spent() == pytest.approx(opacus_epsilon([mech, mech2]), rel=1e-9)
    assert ledger.spent() < first.epsilon_round + second.epsilon_round


def test_target_epsilon_drives_the_noise(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    res = train_round(bc, global_state, bc_train, config(target_epsilon=2.0, epochs=2), CPU,
                      None, False, private_seed=3)
    assert res.noise_multiplier > 0
    # Opacus's binary search (RDP) stops within its 0.01 tolerance below the target;
    # the round's figure is reported by the ledger's accountant (PRV: tighter still).
    rdp = rdp_epsilon([(res.noise_multiplier, res.sample_rate, res.steps)], DELTA)
    assert 2.0 - 0.05 <= rdp <= 2.0 + 1e-6
    assert 0 < res.epsilon_round <= rdp


def test_budget_refusal_trains_nothing(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ledger = ledger_at(tmp_path, budget=0.05)
    progress: list[tuple[int, int, int, int, float]] = []
    with pytest.raises(BudgetExceeded) as info:
        train_round(bc, global_state, bc_train, config(), CPU, ledger, False,
                    on_progress=lambda *a: progress.append(a))
    assert info.value.spent == 0.0 and info.value.would_be > 0.05
    assert progress == []
    assert ledger.entries() == [] and ledger_at(tmp_path, 0.05).entries() == []


def test_budget_refusal_after_spending(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    one = opacus_epsilon([(1.0, 1 / math.ceil(len(bc_train) / 32), math.ceil(len(bc_train) / 32))])
    ledger = ledger_at(tmp_path, budget=one * 1.2)  # room for one round, not two
    train_round(bc, global_state, bc_train, config(), CPU, ledger, False, private_seed=4)
    with pytest.raises(BudgetExceeded) as info:
        train_round(bc, global_state, bc_train, config(), CPU, ledger, False, private_seed=5)
    assert info.value.spent == pytest.approx(one, rel=1e-9)
    assert len(ledger.entries()) == 1


def test_interrupted_round_still_spends(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ledger = ledger_at(tmp_path)

    def crash(epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
        if step == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train_round(bc, global_state, bc_train, config(), CPU, ledger, False,
                    job_id="j", round=9, on_progress=crash, private_seed=6)
    (entry,) = ledger_at(tmp_path).entries()
    assert (entry.job_id, entry.round, entry.steps) == ("j", 9, 2)


def test_no_dp_needs_the_operator_flag(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ledger = ledger_at(tmp_path)
    with pytest.raises(PrivacyRequired):
        train_round(bc, global_state, bc_train, config(dp=False), CPU, ledger, False)
    assert ledger.entries() == []
    res = train_round(bc, global_state, bc_train, config(dp=False), CPU, ledger, True)
    assert not res.dp_enabled and res.epsilon_round == 0.0 and res.noise_multiplier == 0.0
    assert ledger.spent() == 0.0 and ledger.non_private_runs() == 1
    assert ledger.entries()[0].steps == res.steps


# --- the update ----------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_update_matches_global_layout_for_every_task(name: str) -> None:
    task = get_task(name)  # every task is in the tree: a broken import must fail
    torch.manual_seed(0)
    global_state = task.build_model().state_dict()
    n = 24
    data = TensorDataset(
        torch.randn(n, *task.input_shape), torch.randint(0, task.num_classes, (n,))
    )
    # DELTA: the path that also does arithmetic on the tensors (WEIGHTS is checked below).
    res = train_round(task, global_state, data, config(batch=8, kind=pb.DELTA), CPU, None,
                      False, private_seed=0, max_physical_batch_size=4)
    assert list(res.state) == list(global_state)
    for key, ref in global_state.items():
        got = res.state[key]
        assert (got.dtype, got.shape, got.device.type) == (ref.dtype, ref.shape, "cpu"), key
        assert torch.isfinite(got.float()).all(), key
    assert res.update_kind == pb.DELTA and res.num_examples == n and res.steps == 3


def test_delta_equals_trained_minus_global(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    runs = {
        kind: train_round(bc, global_state, bc_train, config(kind=kind), CPU, None, False,
                          private_seed=11)
        for kind in (pb.WEIGHTS, pb.DELTA)
    }
    weights, delta = runs[pb.WEIGHTS].state, runs[pb.DELTA].state
    assert distance(weights, global_state) > 0
    assert list(weights) == list(delta) == list(global_state)
    for key, ref in global_state.items():
        torch.testing.assert_close(delta[key], weights[key] - ref)


def test_physical_batch_split_keeps_logical_steps(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    whole = train_round(bc, global_state, bc_train, config(), CPU, None, False, private_seed=12,
                        grad_sample_mode="hooks")
    split = train_round(bc, global_state, bc_train, config(), CPU, None, False, private_seed=12,
                        max_physical_batch_size=5, grad_sample_mode="hooks")
    assert split.steps == whole.steps
    assert split.epsilon_round == whole.epsilon_round
    for key in whole.state:  # same samples, same noise: same model up to float sums
        torch.testing.assert_close(split.state[key], whole.state[key], atol=1e-5, rtol=1e-4)


def test_mismatched_global_state_is_a_clear_error(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    wrong_shape = dict(global_state)
    first = next(iter(wrong_shape))
    wrong_shape[first] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        train_round(bc, wrong_shape, bc_train, config(), CPU, None, False)
    prefixed = {f"_module.{k}": v for k, v in global_state.items()}
    with pytest.raises(ValueError, match="missing"):
        train_round(bc, prefixed, bc_train, config(), CPU, None, False)
    wrong_dtype = {k: v.double() for k, v in global_state.items()}
    with pytest.raises(ValueError, match="dtype"):
        evaluate_state(bc, wrong_dtype, bc_train, CPU)


# --- learning --------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [True, False])
def test_loss_falls(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], dp: bool
) -> None:
    before = evaluate_state(bc, global_state, bc_train, CPU)["loss"]
    seen: list[tuple[int, int, int, int, float]] = []
    res: TrainResult = train_round(
        bc, global_state, bc_train, config(dp=dp, epochs=3), CPU, None, allow_no_dp=not dp,
        on_progress=lambda *a: seen.append(a), private_seed=13,
    )
    after = evaluate_state(bc, res.state, bc_train, CPU)["loss"]
    assert after < 0.7 * before
    assert res.metrics["train_loss"] < before
    steps = math.ceil(len(bc_train) / 32)
    assert len(seen) == 3 * steps
    assert seen[0][:4] == (1, 3, 1, steps) and seen[-1][:4] == (3, 3, steps, steps)


@pytest.mark.parametrize("dp", [True, False])
def test_fedprox_large_mu_stays_near_global(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor], dp: bool
) -> None:
    # lr 0.05 * mu 10 = 0.5: a strong but stable pull back to the global weights (the
    # learning rate is set here: the task's own default may change with its tuning).
    def moved(mu: float) -> float:
        cfg = config(dp=dp, epochs=2, mu=mu)
        cfg.learning_rate = 0.05
        res = train_round(bc, global_state, bc_train, cfg, CPU,
                          None, allow_no_dp=not dp, private_seed=14)
        return distance(res.state, global_state)

    free, held = moved(0.0), moved(10.0)
    assert held < 0.3 * free


def test_seeded_rounds_are_reproducible(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    a, b = (train_round(bc, global_state, bc_train, config(), CPU, None, False, private_seed=21)
            for _ in range(2))
    c = train_round(bc, global_state, bc_train, config(), CPU, None, False, private_seed=22)
    assert distance(a.state, b.state) == 0.0
    assert distance(a.state, c.state) > 0.0


def test_unseeded_noise_differs_between_runs(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    """config.seed must not fix the DP noise (the server would know it)."""
    runs: Iterator[TrainResult] = (
        train_round(bc, global_state, bc_train, config(seed=5), CPU, None, False)
        for _ in range(2)
    )
    a, b = runs
    assert distance(a.state, b.state) > 0.0


# --- Opacus modes and edge cases ----------------------------------------------------------


def test_ghost_clipping_gives_the_same_update_as_hooks(
    bc: Task, bc_train: TensorDataset, global_state: dict[str, torch.Tensor]
) -> None:
    cfg = config(mu=0.5)
    hooks = train_round(bc, global_state, bc_train, cfg, CPU, None, False, private_seed=31,
                        grad_sample_mode="hooks")
    ghost = train_round(bc, global_state, bc_train, cfg, CPU, None, False, private_seed=31,
                        grad_sample_mode="ghost", max_physical_batch_size=7)
    assert (ghost.steps, ghost.epsilon_round) == (hooks.steps, hooks.epsilon_round)
    for key in hooks.state:
        torch.testing.assert_close(ghost.state[key], hooks.state[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_survived(bc: Task, mode: str) -> None:
    torch.manual_seed(0)
    state = bc.build_model().state_dict()
    tiny = TensorDataset(torch.randn(4, *bc.input_shape), torch.randint(0, 2, (4,)))
    # sample rate 1/4 over 4 records: about a third of the batches are empty
    res = train_round(bc, state, tiny, config(batch=1, epochs=5), CPU, None, False,
                      private_seed=32, grad_sample_mode=mode)
    assert res.steps == 20
    assert all(torch.isfinite(v).all() for v in res.state.values())


class _BatchNormTask(Task):
    """A task whose network Opacus can only train after replacing BatchNorm."""

    name = "batchnorm_probe"

    def __init__(self) -> None:
        self.class_names = ("a", "b")
        self.input_shape = (4,)
        self.hyperparams = get_task("breast_cancer").hyperparams
        self.baseline_epochs = 1

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
        )

    def load_split(self, data_path: Path, split: str) -> TensorDataset:
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> dict[str, float]:
        raise NotImplementedError

    def confusion(
        self, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256
    ) -> list[list[int]]:
        raise NotImplementedError

    def prepare(self, out_dir: Path, clients: int, alpha: float | None, seed: int) -> None:
        raise NotImplementedError


def test_model_opacus_cannot_train_unchanged_is_a_clear_error() -> None:
    task = _BatchNormTask()
    state = task.build_model().state_dict()
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    with pytest.raises(ValueError, match="GroupNorm"):
        train_round(task, state, data, config(batch=8), CPU, None, False)
    # Without DP nothing needs fixing: the same network trains.
    res = train_round(task, state, data, config(dp=False, batch=8), CPU, None, True)
    assert list(res.state) == list(state)


def test_config_zero_means_task_default(bc: Task) -> None:
    hp = bc.hyperparams
    plain = resolve_settings(bc, pb.TrainConfig(privacy=pb.PrivacyConfig(enabled=True)))
    assert (plain.hyperparams, plain.delta, plain.max_grad_norm) == (
        hp, hp.delta, hp.max_grad_norm
    )
    assert plain.update_kind == pb.WEIGHTS
    assert (plain.noise_multiplier, plain.target_epsilon) == (hp.noise_multiplier, 0.0)
    cfg = config(epochs=4, batch=8, target_epsilon=3.0)
    cfg.learning_rate = 0.2
    over = resolve_settings(bc, cfg)
    assert (over.hyperparams.local_epochs, over.hyperparams.batch_size) == (4, 8)
    assert over.hyperparams.learning_rate == 0.2
    assert (over.noise_multiplier, over.target_epsilon, over.delta) == (0.0, 3.0, DELTA)


def test_strategy_settings_carry_the_proximal_term(bc: Task) -> None:
    cfg = config()
    cfg.strategy_settings["proximal_mu"] = 0.25
    assert resolve_settings(bc, cfg).proximal_mu == 0.25
    old_server = config()
    old_server.proximal_mu = 0.5  # a server without the map still reaches the client
    assert resolve_settings(bc, old_server).proximal_mu == 0.5
    both = config()
    both.proximal_mu = 0.5
    both.strategy_settings["proximal_mu"] = 0.1  # the map wins
    assert resolve_settings(bc, both).proximal_mu == 0.1
    bad = config()
    bad.strategy_settings["proximal_mu"] = -1.0
    with pytest.raises(ValueError, match="proximal_mu must be finite and >= 0"):
        resolve_settings(bc, bad)
