"""Strategy names (as a job's config spells them) to classes.

Parameters usually come from a JSON job config, so a typo must fail loudly at
job creation, naming the parameter and the ones the strategy does accept.
"""

from __future__ import annotations

import inspect
from typing import Any

from fl_server.strategies.base import Strategy, StrategyError
from fl_server.strategies.dp_fedavg import DPFedAvg
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.fedavgm import FedAvgM
from fl_server.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fl_server.strategies.fedprox import FedProx
from fl_server.strategies.krum import Krum, MultiKrum
from fl_server.strategies.median import Median
from fl_server.strategies.norm_bounding import NormBounding
from fl_server.strategies.trimmed_mean import TrimmedMean

_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedAvgM,
        TrimmedMean,
        Median,
        Krum,
        MultiKrum,
        NormBounding,
        DPFedAvg,
    )
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_CLASSES)


def strategy_params(name: str) -> dict[str, Any]:
    """The parameters ``name`` accepts, with their defaults."""
    cls = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self"
    }


def make_strategy(name: str, **params: Any) -> Strategy:
    """Builds a strategy by name; unknown names and parameters raise StrategyError."""
    accepted = strategy_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise StrategyError(
            f"strategy {name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}"
        )
    return _lookup(name)(**params)


def _lookup(name: str) -> type[Strategy]:
    try:
        return _CLASSES[name]
    except KeyError:
        raise StrategyError(
            f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGY_NAMES)}"
        ) from None
