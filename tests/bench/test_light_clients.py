"""bench.light_clients against the real server daemon on loopback: two light hospitals
(one asyncio loop, real mTLS, Join, task stream) complete real rounds through the
sealed transfers (over the task stream's connection, or with --fresh_transfers over a
connection of their own), and the process reports them and exits after the STOP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import BenchServer, Procs, client_names, make_bench_pki, wait_for


@pytest.mark.parametrize("fresh", [False, True], ids=["one-connection", "fresh-transfers"])
def test_light_hospitals_complete_rounds(tmp_path: Path, fresh: bool) -> None:
    names = client_names(2)
    make_bench_pki(tmp_path, names)
    procs = Procs()
    try:
        server = BenchServer(procs, tmp_path, 1000, name="light",
                             extra=["--rounds", "2", "--min_clients", "2",
                                    "--wait_for_clients_s", "60", "--round_deadline_s", "60"])
        status = tmp_path / "light.json"
        clients = procs.start(["-m", "bench.light_clients", "--server", server.target,
                               "--work", str(tmp_path), "--clients", ",".join(names),
                               "--status_file", str(status), "--timeout_s", "120",
                               *(["--fresh_transfers"] if fresh else [])],
                              tmp_path / "light.log", cwd=tmp_path)

        def done() -> bool:
            rounds = [r for r in server.recorded_rounds() if r[1] == "completed"]
            return len(rounds) >= 2 or not clients.alive()

        wait_for(done, 90, "two rounds", interval_s=0.2)
        assert [r[0] for r in server.recorded_rounds() if r[1] == "completed"] == [1, 2], \
            clients.tail()
        # each hospital trained in both rounds over its own connection, then saw STOP
        assert clients.wait(30) == 0, clients.tail()
        counts = json.loads(status.read_text())
        assert counts["tasks"] == 4 and counts["finished"] == 2, counts
        assert counts["failures"] == 0 and counts["threads"] <= 6, counts
        server.close()
    finally:
        procs.stop_all()
