"""The privacy ledger says which runs' updates left the hospital only masked."""

from __future__ import annotations

import json
from pathlib import Path

from fl_client.privacy_ledger import PrivacyLedger


def test_a_run_is_marked_securely_aggregated_and_the_mark_survives_reopen(
        tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "hospital_1", 10.0, 1e-5)
    ledger.record("job", 1, 1.0, 0.1, 10)
    ledger.record("job", 2, 1.0, 0.1, 10)
    spent = ledger.spent()
    ledger.mark_secure("job", 2)
    again = PrivacyLedger(tmp_path, "hospital_1", 10.0, 1e-5)
    assert [e.secure_aggregation for e in again.entries()] == [False, True]
    assert again.spent() == spent  # a mark changes no figure


def test_entries_written_before_the_field_read_as_not_secure(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "hospital_1", 10.0, 1e-5)
    ledger.record("job", 1, 1.0, 0.1, 10)
    path = next(tmp_path.glob("privacy_ledger_*.json"))
    doc = json.loads(path.read_text())
    for entry in doc["entries"]:
        del entry["secure_aggregation"]
    path.write_text(json.dumps(doc))
    assert [e.secure_aggregation for e in PrivacyLedger(
        tmp_path, "hospital_1", 10.0, 1e-5).entries()] == [False]
