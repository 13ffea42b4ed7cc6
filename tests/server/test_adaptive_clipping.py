"""Adaptive clipping in dp_fedavg (Andrew et al. 2021) against a numpy reference: the
clip follows the target quantile of the update norms, the count is noised, and the
two Gaussian mechanisms compose to the accounted noise multiplier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fl_server.strategies import StrategyError, make_strategy
from fl_server.strategies.dp_fedavg import DPFedAvg


def one_round(strategy: DPFedAvg, norms: np.ndarray, dim: int = 4) -> None:
    """Each client's delta has exactly the given L2 norm (along a random direction)."""
    rng = np.random.default_rng(len(norms))
    strategy.begin_round({"w": torch.zeros(dim, dtype=torch.float64)})
    for i, norm in enumerate(norms):
        v = rng.normal(size=dim)
        v *= norm / np.linalg.norm(v)
        strategy.accept(f"h{i}", {"w": torch.from_numpy(v)}, num_examples=1)
    strategy.finish_round()


def reference_clips(rounds: list[np.ndarray], clip: float, quantile: float, lr: float
                    ) -> list[float]:
    """Algorithm 1 of Andrew et al. with no noise, in numpy."""
    clips = [clip]
    for norms in rounds:
        fraction = np.mean(norms <= clip)
        clip = clip * np.exp(-lr * (fraction - quantile))
        clips.append(float(clip))
    return clips


def test_clip_matches_numpy_and_converges_to_the_target_quantile() -> None:
    rng = np.random.default_rng(7)
    rounds = [rng.lognormal(mean=0.0, sigma=0.5, size=100) for _ in range(80)]
    # Noise far below anything that could move a fraction of 1/100: the bits decide.
    strategy = make_strategy("dp_fedavg", clip=0.1, noise_multiplier=1e-9,
                             target_quantile=0.7, clip_lr=0.2, count_noise=1e-9)
    assert isinstance(strategy, DPFedAvg)
    clips = [strategy.bound]
    for norms in rounds:
        one_round(strategy, norms)
        clips.append(strategy.bound)
    expected = reference_clips(rounds, 0.1, 0.7, 0.2)
    np.testing.assert_allclose(clips, expected, rtol=1e-9)
    target = float(np.quantile(np.concatenate(rounds), 0.7))  # ~exp(0.5 * 0.524) = 1.30
    assert abs(np.mean(clips[-30:]) / target - 1) < 0.05
    assert clips[0] < 0.2 * target  # it started far away and had to travel


def test_noised_count_has_the_stated_spread_and_clip_still_converges() -> None:
    strategy = make_strategy("dp_fedavg", clip=5.0, noise_multiplier=0.5,
                             target_quantile=0.5, clip_lr=0.1, count_noise=2.0)
    assert isinstance(strategy, DPFedAvg)
    fractions = []
    norms = np.linspace(0.5, 1.5, 100)  # median 1.0
    for _ in range(100):
        one_round(strategy, norms)
        fractions.append(strategy.last_fraction)
    # Once the clip sits near the median the true fraction is ~0.5 and the released one
    # is that plus N(0, (2.0 / 100)^2).
    late = np.array(fractions[-50:])
    assert abs(late.std() - 0.02) < 0.01
    assert abs(strategy.bound - 1.0) < 0.15


def test_update_and_count_noise_compose_to_the_accounted_multiplier() -> None:
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1.2, sample_rate=0.5,
                             target_quantile=0.5, count_noise=1.5)
    assert isinstance(strategy, DPFedAvg)
    sigma_u = strategy.update_noise_multiplier
    assert sigma_u ** -2 + (2 * 1.5) ** -2 == pytest.approx(1.2 ** -2)
    # The update noise that is actually drawn has std sigma_u * clip on the sum.
    g = {"w": torch.zeros(200_000)}
    strategy.begin_round(g)
    for i in range(4):
        strategy.accept(f"h{i}", {"w": torch.zeros(200_000)}, num_examples=1)
    step = strategy.finish_round()["w"].numpy()
    assert abs(step.std() * 4 / sigma_u - 1.0) < 0.01
    accountant = RDPAccountant()
    accountant.history = [(1.2, 0.5, 1)]
    assert strategy.round_metrics()["central_epsilon"] == pytest.approx(
        accountant.get_epsilon(1e-5))


def test_clip_survives_a_restart() -> None:
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1e-9,
                             target_quantile=0.5, count_noise=1e-9)
    assert isinstance(strategy, DPFedAvg)
    one_round(strategy, np.full(10, 0.1))
    moved = strategy.bound
    assert moved == pytest.approx(math.exp(-0.2 * 0.5))
    restored = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1e-9,
                             target_quantile=0.5, count_noise=1e-9)
    restored.load_state_dict(strategy.state_dict())
    assert isinstance(restored, DPFedAvg) and restored.bound == moved


@pytest.mark.filterwarnings("ignore:Optimal order")  # noise 1e-9: epsilon is astronomical
def test_fixed_clipping_is_unchanged_by_default() -> None:
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1e-9)
    assert isinstance(strategy, DPFedAvg)
    one_round(strategy, np.full(10, 0.1))
    assert strategy.bound == 1.0 and "central_clip" not in strategy.round_metrics()
    assert set(strategy.state_dict()) == {"rounds_done"}


@pytest.mark.parametrize("params", [
    {"target_quantile": 1.0}, {"target_quantile": -0.1}, {"clip_lr": 0.0},
    {"target_quantile": 0.5, "noise_multiplier": 2.0, "count_noise": 0.9},
])
def test_bad_adaptive_parameters_are_refused(params: dict[str, float]) -> None:
    with pytest.raises(StrategyError):
        make_strategy("dp_fedavg", **params)


def test_secure_sum_moves_the_clip_only_with_a_summed_count() -> None:
    """Under secure aggregation the server gets the clipped sum and, for adaptive
    clipping, the hospitals' bits summed with it; without them the clip stays."""
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1e-9,
                             target_quantile=0.5, count_noise=1e-9)
    assert isinstance(strategy, DPFedAvg)
    g = {"w": torch.zeros(3, dtype=torch.float64)}
    strategy.begin_round(g)
    strategy.accept_sum(["a", "b", "c", "d"], {"w": torch.ones(3, dtype=torch.float64)}, 4.0,
                        unclipped_count=4.0)  # all four fitted: the clip shrinks
    strategy.finish_round()
    assert strategy.bound == pytest.approx(math.exp(-0.2 * 0.5))
    assert strategy.last_fraction == pytest.approx(1.0)
    moved = strategy.bound
    strategy.begin_round(g)
    strategy.accept_sum(["a", "b"], {"w": torch.ones(3, dtype=torch.float64)}, 2.0)
    strategy.finish_round()
    assert strategy.bound == moved and math.isnan(strategy.last_fraction)
    strategy.begin_round(g)
    with pytest.raises(StrategyError, match="unclipped_count"):
        strategy.accept_sum(["a", "b"], {"w": torch.ones(3, dtype=torch.float64)}, 2.0,
                            unclipped_count=3.0)
