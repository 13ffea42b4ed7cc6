"""Runs the suite on two pytest-xdist workers (`make test`) one test folder per worker
at a time: a folder's session and module fixtures (keys, prepared data, a federation
shared by a module's tests) are built once on the worker that runs the folder, and
only one folder starts Ray (tests/sim). Most of the suite's time is spent waiting on
real daemons (start-up, round deadlines, reconnects), which overlaps well on two
cores."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        relative = Path(str(item.path)).resolve().relative_to(TESTS)
        folder = relative.parts[0] if len(relative.parts) > 1 else "top"
        item.add_marker(pytest.mark.xdist_group(folder))
