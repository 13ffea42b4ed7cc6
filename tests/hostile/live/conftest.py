"""Fixtures for the live hostile cases: one arena (server + honest hospital) for the
whole package, torn down when its last case has run, and a fresh attacker
connection per case."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task
from fl_server.pki import revoke
from tests.hostile.kit import HostileClient, admin_identity, wait_for
from tests.hostile.live.arena import (
    BYSTANDER,
    EVIL,
    FREEZER,
    GOOD,
    REVOKED,
    SERVER_FLAGS,
    Arena,
)


@pytest.fixture(scope="package")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    work = tmp_path_factory.mktemp("arena")
    keys = make_pki(work, [GOOD, EVIL, FREEZER, BYSTANDER, REVOKED])
    revoke(keys, REVOKED)
    fed = Federation(work, [GOOD], "breast_cancer")
    try:
        port = fed.start_server(SERVER_FLAGS)
        data = work / "data"
        get_task("breast_cancer").prepare(data, clients=2, alpha=None, seed=7)
        fed.start_client(GOOD, data / "hospital_1", ["--allow_no_dp", "--max_reconnect_s", "60"])
        admin = admin_identity(keys)
        arena = Arena(fed, work, keys, port, work / "server_state", "", admin)
        status = wait_for(lambda: (s := arena.status()).rounds and s, 60,
                          "the honest hospital to complete a first round")
        arena.job_id = status.job_id
        yield arena
        arena.assert_alive()
    finally:
        fed.stop_all()
        shutil.rmtree(work / "server_state" / "spool", ignore_errors=True)


@pytest.fixture()
def evil(arena: Arena) -> Iterator[HostileClient]:
    client = arena.client(EVIL)
    client.connect()
    client.join()
    try:
        yield client
    finally:
        client.close()
