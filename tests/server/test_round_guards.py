"""The round engine's poison guards as plain functions (issue 11 item 2): the update
norm, the outlier rule relative to the round's other updates, and who is blamed."""

from __future__ import annotations

import math

import torch

from fl_server.rounds import largest, norm_outliers, update_norm


def test_update_norm_is_float64_and_ignores_integer_tensors() -> None:
    delta = {"w": torch.full((4,), 1e30), "steps": torch.tensor([10**6])}
    assert math.isclose(update_norm(delta), 2e30, rel_tol=1e-6)  # float32 would overflow
    assert update_norm({"w": torch.zeros(3)}) == 0.0


def test_outliers_relative_to_the_others() -> None:
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "evil": 50.0}
    assert norm_outliers(norms, 10.0) == ["evil"]
    assert norm_outliers(norms, 100.0) == []
    assert norm_outliers(norms, 0.0) == []  # off
    assert norm_outliers({"a": 1.0, "evil": 1e30}, 10.0) == ["evil"]  # two: each vs the other
    assert norm_outliers({"alone": 1e30}, 10.0) == []  # nothing to compare with
    # an all-zero reference says nothing about scale: no one is flagged by it
    assert norm_outliers({"zero": 0.0, "honest": 3.0}, 10.0) == []
    assert norm_outliers({"a": 1.0, "b": 1.0, "inf": math.inf}, 10.0) == ["inf"]


def test_largest_is_blamed() -> None:
    assert largest({"a": 1.0, "evil": 9.0}) == ["evil"]
    assert largest({}) == []
