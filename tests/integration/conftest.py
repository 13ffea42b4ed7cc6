"""Fixtures that build a real federation on loopback: keys through the CSR path,
per-hospital data from the task's own prepare, and real daemon processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task

HOSPITALS = ("hospital_1", "hospital_2")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    make_pki(root, [*HOSPITALS, "hospital_3"])
    return root


@pytest.fixture(scope="session")
def breast_cancer_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "breast_cancer"
    get_task("breast_cancer").prepare(out, clients=3, alpha=None, seed=7)
    return out


@pytest.fixture()
def federation(pki: Path, tmp_path: Path) -> Iterator[Federation]:
    """A federation workdir holding a copy of the session's keys (so a test may revoke
    or corrupt them without touching other tests)."""
    import shutil

    work = tmp_path / "fed"
    shutil.copytree(pki, work)
    fed = Federation(work, list(HOSPITALS), "breast_cancer")
    try:
        yield fed
    finally:
        fed.stop_all()
