"""Central DP (DP-FedAvg): clipping and equal weights against numpy, noise of the
stated size, and epsilon against an accountant written in this file from the RDP
formulas and against figures pinned from Google's dp-accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_server.strategies import StrategyError, make_strategy
from tests.dp_reference import StepAccountant


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


# (noise multiplier, sample rate, rounds, delta) -> epsilon from Google's dp-accounting
# 0.6.0 (PyPI), computed once offline in a scratch venv, not a dependency:
#   acc = dp_accounting.rdp.RdpAccountant()
#   acc.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), rounds))
#   (GaussianDpEvent(sigma) alone where q = 1); acc.get_epsilon(delta)
DP_ACCOUNTING_0_6_0 = {
    (1.1, 0.5, 3, 1e-5): 5.656888982041609,
    (1.1, 1.0, 3, 1e-5): 8.039116966222146,
    (1.0, 0.1, 100, 1e-5): 7.903850223578231,
    (2.0, 1.0, 50, 1e-6): 23.70389051398901,
}


@pytest.mark.parametrize("case", sorted(DP_ACCOUNTING_0_6_0))
def test_epsilon_agrees_with_independent_accountants(
        case: tuple[float, float, int, float]) -> None:
    """Each round's central_epsilon lies between the step-by-step accountant's bounds
    above (a correct accountant can neither beat what convexity allows nor report more
    than the best integer order gives), and the last equals dp-accounting's figure."""
    sigma, q, rounds, delta = case
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=sigma, sample_rate=q,
                             delta=delta)
    ours = StepAccountant()
    g = {"w": torch.zeros(4)}
    for r in range(1, rounds + 1):
        strategy.begin_round(g)
        strategy.accept("h", {"w": torch.ones(4)}, 1)
        strategy.finish_round()
        ours.step(q, sigma)
        if r <= 3 or r == rounds:
            got = strategy.round_metrics()["central_epsilon"]
            low, high = ours.lower(delta), ours.upper(delta)
            assert low <= got <= high * (1 + 1e-12), (r, low, got, high)
    assert strategy.round_metrics()["central_epsilon"] == pytest.approx(
        DP_ACCOUNTING_0_6_0[case], rel=1e-3)


def test_epsilon_grows_per_round_and_survives_a_restart() -> None:
    strategy = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1.1, sample_rate=0.5,
                             delta=1e-5)
    g = {"w": torch.zeros(4)}
    epsilons = []
    for _ in range(3):
        strategy.begin_round(g)
        strategy.accept("h", {"w": torch.ones(4)}, 1)
        strategy.finish_round()
        epsilons.append(strategy.round_metrics()["central_epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2] and math.isfinite(epsilons[2])
    assert epsilons[-1] == pytest.approx(DP_ACCOUNTING_0_6_0[(1.1, 0.5, 3, 1e-5)], rel=1e-3)
    restored = make_strategy("dp_fedavg", clip=1.0, noise_multiplier=1.1, sample_rate=0.5)
    restored.load_state_dict(strategy.state_dict())
    assert restored.round_metrics()["central_epsilon"] == pytest.approx(epsilons[-1])


@pytest.mark.parametrize(("params", "message"), [
    ({"clip": 0.0}, "clip must be positive, got 0.0"),
    ({"noise_multiplier": 0.0}, "noise_multiplier must be positive, got 0.0"),
    ({"sample_rate": 0.0}, "sample_rate must be > 0"),
    ({"sample_rate": 1.5}, r"sample_rate must be in \[0.0, 1.0\], got 1.5"),
    ({"delta": 0.0}, "delta must be > 0"),
    ({"delta": 1.0}, r"delta must be in \[0.0, 1.0\), got 1.0"),
])
def test_bad_parameters_are_refused(params: dict[str, float], message: str) -> None:
    with pytest.raises(StrategyError, match=f"^{message}$"):
        make_strategy("dp_fedavg", **params)
