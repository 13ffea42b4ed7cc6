"""Real server and client processes over mTLS on loopback: whole rounds."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from fl_core.tensor_codec import build_manifest
from fl_demo.launcher import Federation
from tests.dp_reference import StepAccountant
from tests.hostile.kit import (
    ScriptedClient,
    checkpoint_state,
    chunked_uploads,
    deterministic_delta,
    read_jobs,
    read_rounds,
    scripted_clients,
    site_identity,
)

pytestmark = pytest.mark.slow

SERVER_FAST = ["--min_clients", "2", "--round_deadline_s", "90", "--wait_for_clients_s", "60",
               "--exit_when_done", "--local_epochs", "1"]


def test_two_hospitals_two_rounds(federation: Federation, breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server([*SERVER_FAST, "--rounds", "2",
                      "--eval_data", str(breast_cancer_data / "test")])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    code = fed.wait_server(timeout_s=240)
    assert code == 0, fed.tail("server.log") + fed.tail("hospital_1.log")
    for name, proc in fed.clients.items():
        assert proc.wait(timeout=30) == 0, fed.tail(f"{name}.log")
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    rows = db.execute("SELECT round, state, reported FROM rounds ORDER BY round").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(1, "completed"), (2, "completed")]
    assert all(r[2] == 2 for r in rows)
    log = (fed.log_dir / "server.log").read_text()
    assert "round_summary" in log and "eval_accuracy" in log
    # Each hospital's ledger holds one DP run per round, composed, and the figure it
    # reported with its update is the ledger's.
    (job_id, _), = read_jobs(fed.workdir / "server_state")
    recorded = {r.round: r.metrics["clients"] for r in read_rounds(fed.workdir / "server_state",
                                                                    job_id)}
    for name in fed.hospitals:
        path = fed.workdir / "sites" / name / "state" / f"privacy_ledger_{name}.json"
        ledger = json.loads(path.read_text())
        assert ledger["client_id"] == name and ledger["total_epsilon_budget"] == 50
        entries = ledger["entries"]
        assert [(e["job_id"], e["round"], e["attempt"], e["dp_enabled"]) for e in entries] \
            == [(job_id, 1, 1, True), (job_id, 2, 1, True)], entries
        reference = StepAccountant()
        for e in entries:
            assert e["noise_multiplier"] > 0 and 0 < e["sample_rate"] <= 1 and e["steps"] > 0
            reference.step(e["sample_rate"], e["noise_multiplier"], e["steps"])
            # min(PRV, RDP) is at most the RDP bound at the best integer order
            assert 0 < e["epsilon_cumulative"] <= reference.upper(ledger["delta"]) * (1 + 1e-9)
            assert recorded[e["round"]][name]["epsilon_total"] == pytest.approx(
                e["epsilon_cumulative"], rel=1e-6)
        first, second = entries
        assert first["epsilon_cumulative"] == pytest.approx(first["epsilon_round"])
        # composed, not summed: more than one round's spend, less than the naive sum
        assert max(first["epsilon_round"], second["epsilon_round"]) \
            < second["epsilon_cumulative"] < first["epsilon_round"] + second["epsilon_round"]
        assert second["epsilon_cumulative"] <= 50


def test_median_strategy_reads_spooled_updates_from_kept_files_and_leaves_no_spool(
        federation: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-streaming strategy keeps updates memory-mapped from their spool files. A
    finished upload's file is kept for the next upload (fl_server/spool_pool.py), and
    one a strategy still maps is not written again until the mapping is gone; the
    server deletes the kept files when it stops.

    Three scripted hospitals (real sealed uploads over mTLS) send known deltas; the
    others hold their uploads until the first one's is acknowledged and the server's
    own memory map (/proc/<pid>/maps) has been read: it must map that upload's file,
    kept under a pool name, while the round is still open. In round 2 that first
    upload must have gone into one of round 1's three files (three files on disk, not
    four, the mapped one among them by inode), and each round's model must still move
    by exactly the coordinate-wise median of that round's three deltas: nothing of
    round 1's bytes in a reused file reaches round 2."""
    fed = federation
    chunked_uploads(monkeypatch, 64)  # several chunks: spooled, not received in memory
    port = fed.start_server(["--min_clients", "3", "--round_deadline_s", "90",
                             "--wait_for_clients_s", "60", "--exit_when_done",
                             "--final_model_grace_s", "2",  # scripted clients never fetch
                             "--rounds", "2", "--strategy", "median", "--no_fed_eval"])
    assert fed.server is not None
    maps = Path(f"/proc/{fed.server.pid}/maps")
    spool_dir = fed.workdir / "server_state" / "spool"
    first_in = {r: threading.Event() for r in (1, 2)}
    seen: dict[int, tuple[list[tuple[int, str]], dict[str, int]]] = {}

    def after_first(round_no: int) -> None:
        mapped = [(int(fields[4]), fields[5]) for fields in
                  (line.split(None, 5) for line in maps.read_text().splitlines())
                  if len(fields) == 6 and ".spool" in fields[5]]
        seen[round_no] = (mapped, {p.name: p.stat().st_ino for p in spool_dir.glob("*.spool")})
        first_in[round_no].set()

    def hold(round_no: int) -> None:
        assert first_in[round_no].wait(timeout=90), "the first update never arrived"

    clients = [ScriptedClient(lambda: port, site_identity(fed.workdir, f"hospital_{i + 1}"),
                              f"hospital_{i + 1}", i,
                              on_receipt=after_first if i == 0 else None,
                              before_submit=None if i == 0 else hold)
               for i in range(3)]
    with scripted_clients(clients):
        assert fed.wait_server(timeout_s=240) == 0, fed.tail("server.log")
    state_dir = fed.workdir / "server_state"
    (job_id, _), = read_jobs(state_dir)
    rows = read_rounds(state_dir, job_id)
    assert [(r.round, r.state, r.reported) for r in rows] == [(1, "completed", 3),
                                                              (2, "completed", 3)]
    for round_no in (1, 2):
        mapped, on_disk = seen[round_no]
        # the first upload's file, mapped by the strategy and kept under a pool name
        assert len(mapped) >= 1 and all(path.endswith(".spool") and "(deleted)" not in path
                                        for _, path in mapped), mapped
        assert all(name.startswith("pool-") for name in on_disk), on_disk
        assert {ino for ino, _ in mapped} <= set(on_disk.values()), (mapped, on_disk)
        before = checkpoint_state(state_dir, job_id, round_no - 1)  # 0: the initial model
        after = checkpoint_state(state_dir, job_id, round_no)
        manifest = build_manifest(after)
        deltas = [deterministic_delta(manifest, round_no, i) for i in range(3)]
        for name, tensor in after.items():
            if not tensor.is_floating_point():
                continue
            middle = torch.stack([d[name] for d in deltas]).median(dim=0).values
            torch.testing.assert_close(tensor - before[name], middle.to(tensor.dtype),
                                       rtol=0, atol=1e-6)
    assert len(seen[1][1]) == 1, seen[1]  # round 1: only the first upload had finished
    assert len(seen[2][1]) == 3, seen[2]  # round 2's first upload took a kept file
    assert not list(spool_dir.glob("*.spool"))  # deleted when the server stopped


def test_central_dp_reports_its_epsilon_each_round(federation: Federation,
                                                   breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server([*SERVER_FAST, "--rounds", "2", "--strategy", "dp_fedavg",
                      "--strategy_param", "clip=0.5", "--strategy_param", "noise_multiplier=0.5",
                      "--no_fed_eval"])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "50"])
    assert fed.wait_server(timeout_s=240) == 0, fed.tail("server.log")
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    rows = db.execute("SELECT metrics_json FROM rounds ORDER BY round").fetchall()
    eps = [json.loads(r[0])["central_epsilon"] for r in rows]
    # sigma 0.5, every client every round (--fraction 1), delta 1e-5: Google's
    # dp-accounting 0.6.0 RdpAccountant, SelfComposedDpEvent(GaussianDpEvent(0.5), r)
    assert eps == pytest.approx([10.725509696418232, 16.512875946682545], rel=1e-3)
