"""Linear strategies given the securely summed update reach the same model as when
they fold the same updates one by one."""

from __future__ import annotations

import pytest
import torch

from fl_server.strategies.base import StrategyError
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.registry import make_strategy

LINEAR = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "norm_bounding"]


def _round(strategy: FedAvg, global_state: dict[str, torch.Tensor],
           deltas: list[dict[str, torch.Tensor]], examples: list[int], summed: bool,
           equal: bool = False) -> dict[str, torch.Tensor]:
    strategy.begin_round(global_state)
    if summed:
        w = [1] * len(examples) if equal else examples
        sums = {k: sum(wi * d[k] for wi, d in zip(w, deltas, strict=True))
                for k in ("w", "b")}
        strategy.accept_sum([f"c{i}" for i in range(len(deltas))], sums,  # type: ignore[arg-type]
                            float(sum(w)))
    else:
        for i, (d, n) in enumerate(zip(deltas, examples, strict=True)):
            strategy.accept(f"c{i}", d, n)
    return strategy.finish_round()


@pytest.mark.parametrize("name", LINEAR)
def test_summed_update_equals_folding_each(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    g = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen),
         "steps": torch.tensor(5)}
    deltas = [{"w": 0.01 * torch.randn(4, 3, generator=gen),
               "b": 0.01 * torch.randn(3, generator=gen)} for _ in range(3)]
    examples = [10, 30, 60]
    params = {"bound": 100.0} if name == "norm_bounding" else {}
    one = _round(make_strategy(name, **params), g, deltas, examples, summed=False)  # type: ignore[arg-type]
    both = _round(make_strategy(name, **params), g, deltas, examples, summed=True)  # type: ignore[arg-type]
    for key in g:
        assert torch.allclose(one[key], both[key], atol=1e-6), key


def test_dp_fedavg_takes_the_equal_weight_sum() -> None:
    g = {"w": torch.zeros(5), "b": torch.zeros(2)}
    deltas = [{"w": torch.full((5,), 0.1 * i), "b": torch.zeros(2)} for i in range(1, 4)]
    strategy = make_strategy("dp_fedavg", clip=10.0, noise_multiplier=1e-12)
    out = _round(strategy, g, deltas, [5, 50, 500], summed=True, equal=True)  # type: ignore[arg-type]
    assert torch.allclose(out["w"], torch.full((5,), 0.2), atol=1e-6)


def test_a_sum_cannot_be_mixed_with_single_updates() -> None:
    s = FedAvg()
    s.begin_round({"w": torch.zeros(2)})
    s.accept("a", {"w": torch.ones(2)}, 1)
    with pytest.raises(StrategyError):
        s.accept_sum(["b"], {"w": torch.ones(2)}, 1.0)
