"""Aggregation strategies behind one interface (base.Strategy), one file each."""

from fl_server.strategies.base import NoUpdatesError, Strategy, StrategyError
from fl_server.strategies.registry import STRATEGY_NAMES, make_strategy, strategy_params

__all__ = [
    "STRATEGY_NAMES",
    "NoUpdatesError",
    "Strategy",
    "StrategyError",
    "make_strategy",
    "strategy_params",
]
