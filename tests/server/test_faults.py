"""The fault-point switch: off unless FL_FAULT_POINT names the point (and round)."""

from __future__ import annotations

import pytest

from fl_server.faults import FAULT_ENV, armed, fault_point


@pytest.mark.parametrize(("spec", "round_no", "expected"), [
    ("aggregate", 1, True),
    ("aggregate", 7, True),
    ("aggregate@2", 2, True),
    ("aggregate@2", 3, False),
    ("aggregate@", 3, True),
    ("", 2, False),
    ("collect", 2, False),
    ("aggregate_x@2", 2, False),
    ("@2", 2, False),
])
def test_armed_only_for_the_named_point_and_round(spec: str, round_no: int,
                                                  expected: bool) -> None:
    assert armed("aggregate", round_no, spec) is expected


def test_fault_point_is_a_no_op_unless_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fault_point("aggregate", 2)  # returns: this test process is still alive
    monkeypatch.setenv(FAULT_ENV, "aggregate@3")
    fault_point("aggregate", 2)
    assert armed("aggregate", 3)
