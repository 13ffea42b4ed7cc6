"""Server state in a checkpoint names its strategy: it can only go back into that one."""

from __future__ import annotations

import pytest
import torch

from fl_server.strategies import StrategyError, make_strategy

GLOBAL = {"w": torch.zeros(3)}


def trained(name: str) -> dict[str, torch.Tensor]:
    strategy = make_strategy(name)
    strategy.begin_round(GLOBAL)
    strategy.accept("a", {"w": torch.ones(3)}, 4)
    strategy.finish_round()
    return strategy.export_state()


def test_state_round_trips_under_its_strategys_name() -> None:
    state = trained("fedadam")
    assert state and all(key.startswith("fedadam:") for key in state)
    again = make_strategy("fedadam")
    again.import_state(state)
    assert {k: v.tolist() for k, v in again.export_state().items()} == {
        k: v.tolist() for k, v in state.items()}


def test_another_strategys_state_is_refused() -> None:
    with pytest.raises(StrategyError, match="server state of strategy 'fedadam', not 'fedyogi'"):
        make_strategy("fedyogi").import_state(trained("fedadam"))
    with pytest.raises(StrategyError, match="not 'fedavg'"):
        make_strategy("fedavg").import_state(trained("fedavgm"))


def test_unnamed_state_from_older_checkpoints_still_loads() -> None:
    named = trained("fedavgm")
    legacy = {key.split(":", 1)[1]: value for key, value in named.items()}
    strategy = make_strategy("fedavgm")
    strategy.import_state(legacy)
    assert set(strategy.export_state()) == set(named)
    with pytest.raises(StrategyError):  # a stateless strategy still refuses leftovers
        make_strategy("fedavg").import_state(legacy)
