"""Central DP (DP-FedAvg): clipping and equal weights against numpy, noise of the
stated size, and epsilon from Opacus's own accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fl_server.strategies import StrategyError, make_strategy


def test_clipped_equal_weight_mean_matches_numpy() -> None:
    g = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "steps": torch.tensor(5)}
    deltas = [
        {"w": torch.full((3, 2), 0.1), "b": torch.tensor([0.1, -0.1])},  # under the clip
        {"w": torch.full((3, 2), 10.0), "b": torch.tensor([10.0, 0.0])},  # far over it
    ]
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1e-9)
    strategy.begin_round(g)
    for i, d in enumerate(deltas):
        strategy.accept(f"h{i}", d, num_examples=1000 * (i + 1))  # weights must not matter
    new = strategy.finish_round()
    flat = [np.concatenate([d["w"].numpy().ravel(), d["b"].numpy()]) for d in deltas]
    clipped = [v * min(1.0, 1.0 / np.linalg.norm(v)) for v in flat]
    expected = np.mean(clipped, axis=0)
    got = np.concatenate([new["w"].numpy().ravel(), new["b"].numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert int(new["steps"]) == 5
    assert strategy.round_metrics()["central_clipped"] == 1.0


def test_noise_has_the_stated_standard_deviation() -> None:
    g = {"w": torch.zeros(200_000)}
    strategy = make_strategy("dp_fedavg", clip=0.5, noise_multiplier=2.0)
    strategy.begin_round(g)
    for i in range(4):
        strategy.accept(f"h{i}", {"w": torch.zeros(200_000)}, num_examples=10)
    step = strategy.finish_round()["w"].numpy()
    # sum of 4 zero deltas + N(0, (2.0 * 0.5)^2), divided by 4
    assert abs(step.std() - 1.0 / 4) < 0.005 and abs(step.mean()) < 0.005


def test_epsilon_is_opacus_rdp_over_rounds_and_survives_a_restart() -> None:
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1.1, sample_rate=0.5,
                             delta=1e-5)
    g = {"w": torch.zeros(4)}
    epsilons = []
    for _ in range(3):
        strategy.begin_round(g)
        strategy.accept("h", {"w": torch.ones(4)}, 1)
        strategy.finish_round()
        epsilons.append(strategy.round_metrics()["central_epsilon"])
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.5, 3)]
    assert epsilons[-1] == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilons[0] < epsilons[1] < epsilons[2] and math.isfinite(epsilons[2])
    restored = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1.1, sample_rate=0.5)
    restored.load_state_dict(strategy.state_dict())
    assert restored.epsilon() == pytest.approx(epsilons[-1])


@pytest.mark.parametrize("params", [
    {"clip": 0.0}, {"noise_multiplier": 0.0}, {"sample_rate": 0.0}, {"sample_rate": 1.5},
    {"delta": 0.0}, {"delta": 1.0},
])
def test_bad_parameters_are_refused(params: dict[str, float]) -> None:
    with pytest.raises(StrategyError):
        make_strategy("dp_fedavg", **params)
