"""A real federation run with a privacy budget for the whole job: the operator's
--epsilon_per_hospital 3 over 3 rounds; every hospital plans its own noise and ends
at or under 3 (and close to it: the budget is spent, not wasted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_client.privacy_ledger import PrivacyLedger
from fl_demo.launcher import Federation
from tests.hostile.kit import read_jobs, read_rounds

pytestmark = pytest.mark.slow

EPSILON = 3.0
ROUNDS = 3


@pytest.mark.timeout(420)
def test_every_ledger_ends_at_or_under_the_job_budget(federation: Federation,
                                                      breast_cancer_data: Path) -> None:
    fed = federation
    fed.start_server(["--min_clients", "2", "--round_deadline_s", "120",
                      "--wait_for_clients_s", "60", "--exit_when_done", "--no_fed_eval",
                      "--rounds", str(ROUNDS), "--epsilon_per_hospital", str(EPSILON),
                      "--eval_data", str(breast_cancer_data / "test")])
    for name in fed.hospitals:
        fed.start_client(name, breast_cancer_data / name, ["--epsilon_budget", "10"])
    code = fed.wait_server(timeout_s=360)
    assert code == 0, fed.tail("server.log") + fed.tail("hospital_1.log")
    for name, proc in fed.clients.items():
        assert proc.wait(timeout=30) == 0, fed.tail(f"{name}.log")
    (job_id, _), = read_jobs(fed.workdir / "server_state")
    rounds = read_rounds(fed.workdir / "server_state", job_id)
    assert [r.round for r in rounds] == list(range(1, ROUNDS + 1))
    for name in fed.hospitals:
        state = fed.workdir / "sites" / name / "state"
        doc = json.loads((state / f"privacy_ledger_{name}.json").read_text())
        assert doc["version"] == 2 and doc["accountant"] == "prv"
        entries = doc["entries"]
        assert [(e["job_id"], e["round"], e["dp_enabled"]) for e in entries] == [
            (job_id, r, True) for r in range(1, ROUNDS + 1)]
        # The plan was followed: one noise multiplier for the whole job.
        assert len({e["noise_multiplier"] for e in entries}) == 1
        final = entries[-1]["epsilon_cumulative"]
        assert 0.95 * EPSILON <= final <= EPSILON, entries
        # The figure is what the ledger recomputes from the recorded history.
        ledger = PrivacyLedger(state, name, 10.0, doc["delta"])
        assert ledger.spent() == pytest.approx(final, rel=1e-9)
        # And what the server was told with the last update.
        assert rounds[-1].metrics["clients"][name]["epsilon_total"] == pytest.approx(
            final, rel=1e-6)
