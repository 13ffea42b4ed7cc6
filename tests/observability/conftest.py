"""One real federation (server and two hospital daemons over mTLS on loopback) shared by
the observability tests: metrics endpoints on free ports, three rounds, and a server
that keeps serving Status after the job so the dashboard can be read at leisure."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task

HOSPITALS = ("hospital_1", "hospital_2")
ROUNDS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveFederation:
    fed: Federation
    server_metrics: int
    client_metrics: dict[str, int]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFederation]:
    root = tmp_path_factory.mktemp("observed")
    data = root / "data"
    get_task("breast_cancer").prepare(data, clients=len(HOSPITALS), alpha=None, seed=7)
    make_pki(root, HOSPITALS)
    shutil.rmtree(root / "logs", ignore_errors=True)
    fed = Federation(root, list(HOSPITALS), "breast_cancer")
    server_port = free_port()
    client_ports = {name: free_port() for name in HOSPITALS}
    try:
        fed.start_server(["--min_clients", "2", "--rounds", str(ROUNDS), "--local_epochs", "1",
                          "--round_deadline_s", "90", "--wait_for_clients_s", "60",
                          "--metrics_port", str(server_port)])
        for name in HOSPITALS:
            fed.start_client(name, data / name, ["--epsilon_budget", "50", "--keep_running",
                                                 "--metrics_port", str(client_ports[name])])
        yield LiveFederation(fed, server_port, client_ports)
    finally:
        fed.stop_all()


def wait_for(predicate, timeout_s: float, what: str, fed: Federation):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something truthy; fail with the logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}\n" + fed.tail("server.log")
                + "\n" + fed.tail("hospital_1.log"))
