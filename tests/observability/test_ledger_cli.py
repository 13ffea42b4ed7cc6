"""`python -m fl_client.ledger show`: the hospital's rounds, epsilon per round and
cumulative, budget left, read through the ledger's public API with the settings the
daemon recorded at start in its audit trail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_client.ledger import main
from fl_client.privacy_ledger import PrivacyLedger
from fl_core.audit import AuditTrail, open_trail

REPO = Path(__file__).resolve().parents[2]


class _Done:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def show(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """The CLI in this process (importing torch and Opacus once, not per call)."""
    def run(*args: str) -> _Done:
        code = main(["show", *args])
        out = capsys.readouterr()
        return _Done(code, out.out, out.err)
    return run


def _site(tmp_path: Path) -> tuple[Path, PrivacyLedger]:
    state = tmp_path / "state"
    ledger = PrivacyLedger(state, "hospital_1", 10.0, 1e-5)
    for round_no in (1, 2, 3):
        ledger.record("job-a", round_no, 1.1, 0.05, 40)
    trail = open_trail(state)
    assert isinstance(trail, AuditTrail)
    trail.append("client_started", client="hospital_1", epsilon_budget=10.0, delta=1e-5,
                 accountant=getattr(ledger, "accountant", ""))
    return state, ledger


def test_show_lists_rounds_cumulative_and_budget_left(tmp_path: Path, show) -> None:  # type: ignore[no-untyped-def]
    state, ledger = _site(tmp_path)
    done = show("--state_dir", str(state), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    cumul = [r["epsilon_cumulative"] for r in doc["rounds"]]
    assert 0 < cumul[0] < cumul[1] < cumul[2]
    assert abs(cumul[-1] - ledger.spent()) < 1e-9
    assert abs(doc["left"] - (10.0 - ledger.spent())) < 1e-9
    assert [round(r["budget_left"], 9) for r in doc["rounds"]] == \
        [round(10.0 - c, 9) for c in cumul]
    table = subprocess.run([sys.executable, "-m", "fl_client.ledger", "show", "--state_dir",
                            str(state)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "privacy ledger of hospital_1" in table.stdout
    assert f"left {ledger.remaining():.4f}" in table.stdout
    assert len([line for line in table.stdout.splitlines() if line.startswith("job-a")]) == 3


def test_show_needs_the_settings_when_no_start_was_recorded(tmp_path: Path, show) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    PrivacyLedger(state, "hospital_1", 10.0, 1e-5).record("job-a", 1, 1.1, 0.05, 40)
    done = show("--state_dir", str(state))
    assert done.returncode == 2
    assert "pass --client_id --epsilon_budget --delta" in done.stderr
    ok = show("--state_dir", str(state), "--client_id", "hospital_1", "--epsilon_budget", "10",
               "--delta", "1e-5")
    assert ok.returncode == 0, ok.stderr


def test_show_refuses_a_wrong_delta_and_a_missing_folder(tmp_path: Path, show) -> None:  # type: ignore[no-untyped-def]
    state, _ = _site(tmp_path)
    wrong = show("--state_dir", str(state), "--delta", "1e-3")
    assert wrong.returncode == 2 and "delta" in wrong.stderr
    missing = show("--state_dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
