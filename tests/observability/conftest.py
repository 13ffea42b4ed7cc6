"""One real federation (server and two hospital daemons over mTLS on loopback) shared by
the observability tests: metrics endpoints on free ports, three rounds, and a server
that keeps serving Status after the job so the dashboard can be read at leisure."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task

HOSPITALS = ("hospital_1", "hospital_2")
ROUNDS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


@dataclass
class LiveFederation:
    fed: Federation
    server_metrics: int
    client_metrics: dict[str, int]
    # the server's /metrics, scraped every half second from the start (whichever test
    # runs first, the metrics test still sees the values of every round)
    scrapes: list[str] = field(default_factory=list)
    # each hospital's newest /metrics (the daemons exit when the job ends)
    client_scrapes: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def _scrape_loop(self) -> None:
        while not self.stop.wait(0.5):
            for name, port in self.client_metrics.items():
                with contextlib.suppress(OSError):
                    self.client_scrapes[name] = scrape(port)
            with contextlib.suppress(OSError):
                self.scrapes.append(scrape(self.server_metrics))


@pytest.fixture(scope="package")
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
                          "--round_deadline_s", "300", "--wait_for_clients_s", "300",
                          "--metrics_port", str(server_port)])
        for name in HOSPITALS:
            # --keep_running: the hospitals (and their metrics endpoints) stay up after
            # the job, which the small model finishes within a scrape interval or two
            fed.start_client(name, data / name, ["--epsilon_budget", "50", "--keep_running",
                                                 "--metrics_port", str(client_ports[name])])
        live = LiveFederation(fed, server_port, client_ports)
        scraper = threading.Thread(target=live._scrape_loop, daemon=True)
        scraper.start()
        yield live
        live.stop.set()
        scraper.join(timeout=15)
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
