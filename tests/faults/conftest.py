"""Keys for the fault tests (one CA per session; each test copies them), and a
federation workdir per test whose processes are always stopped."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_demo.launcher import Federation, make_pki

HOSPITALS = ("hospital_1", "hospital_2", "hospital_3")


@pytest.fixture(scope="session")
def fault_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fault-pki")
    make_pki(root, list(HOSPITALS))
    return root


@pytest.fixture()
def fed(fault_pki: Path, tmp_path: Path) -> Iterator[Federation]:
    work = tmp_path / "fed"
    shutil.copytree(fault_pki, work)
    federation = Federation(work, [], "breast_cancer")
    try:
        yield federation
    finally:
        federation.stop_all()
