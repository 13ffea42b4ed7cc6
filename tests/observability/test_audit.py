"""The hash-chained audit trail: every record verifies, and an edited, removed or
reordered record is named by its line number, through the CLIs both sides ship."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fl_core.audit import GENESIS, AuditError, AuditTrail, record_hash, verify_trail

REPO = Path(__file__).resolve().parents[2]


def _trail(path: Path, n: int = 6) -> list[bytes]:
    trail = AuditTrail(path)
    for i in range(n):
        trail.append("update_sent", job="job-1", round=i + 1, bytes=1000 + i, epsilon=0.5)
    trail.close()
    return path.read_bytes().splitlines(keepends=True)


def _cli(module: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "verify", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_records_chain_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records, records[1:], strict=False):
        assert after["prev"] == before["hash"] == record_hash(before)
    verdict = verify_trail(path)
    assert verdict.ok and verdict.records == 6 and verdict.head == records[-1]["hash"]
    for module in ("fl_client.audit", "fl_server.audit"):
        done = _cli(module, path)
        assert done.returncode == 0, done.stderr
        assert "OK, 6 records" in done.stdout


def test_reopened_trail_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _trail(path, 2)
    AuditTrail(path).append("join", client="hospital_1")
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert records[2]["seq"] == 3 and records[2]["prev"] == records[1]["hash"]
    assert verify_trail(path).ok


def test_concurrent_appends_stay_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trails = [AuditTrail(path), AuditTrail(path)]  # two handles: as two processes would
    threads = [threading.Thread(target=lambda t=t: [t.append("x", i=i) for i in range(25)])
               for t in trails]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    verdict = verify_trail(path)
    assert verdict.ok and verdict.records == 50, verdict


@pytest.mark.parametrize("module", ["fl_client.audit", "fl_server.audit"])
def test_edited_record_is_named(tmp_path: Path, module: str) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    lines[2] = lines[2].replace(b'"bytes":1002', b'"bytes":9')
    path.write_bytes(b"".join(lines))
    done = _cli(module, path)
    assert done.returncode == 1
    assert "line 3: record edited" in done.stdout, done.stdout


def test_edited_and_rehashed_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    rec = json.loads(lines[3])
    rec["data"]["epsilon"] = 0.0
    rec["hash"] = record_hash(rec)
    lines[3] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    verdict = verify_trail(path)
    assert not verdict.ok and verdict.line == 4 and "re-hashed" in verdict.problem


def test_removed_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    del lines[3]
    path.write_bytes(b"".join(lines))
    done = _cli("fl_client.audit", path)
    assert done.returncode == 1
    assert "line 4: record(s) seq 4..4 were removed" in done.stdout, done.stdout


def test_removed_first_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    path.write_bytes(b"".join(lines[1:]))
    verdict = verify_trail(path)
    assert not verdict.ok and verdict.line == 1 and "removed" in verdict.problem


def test_reordered_records_are_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    lines[1], lines[4] = lines[4], lines[1]
    path.write_bytes(b"".join(lines))
    done = _cli("fl_server.audit", path)
    assert done.returncode == 1
    assert "line 2: record seq 5 comes before seq 2: records were reordered" in done.stdout


def test_damaged_line_is_named_and_appends_refuse(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _trail(path)
    lines[5] = b"{not json\n"
    path.write_bytes(b"".join(lines))
    verdict = verify_trail(path)
    assert not verdict.ok and verdict.line == 6
    with pytest.raises(AuditError, match="last line is damaged"):
        AuditTrail(path).append("join")


def test_unreadable_file_is_exit_2(tmp_path: Path) -> None:
    done = _cli("fl_client.audit", tmp_path / "missing.jsonl")
    assert done.returncode == 2 and "cannot read audit trail" in done.stderr


def test_server_audits_a_refusal_storm_with_bounded_records(tmp_path: Path) -> None:
    """A client looping on a refused call: every refusal is counted, at most
    REFUSALS_AUDITED_PER_MINUTE are written per caller and reason, and the next written
    one would carry how many were left out."""
    from fl_server import audit as server_audit
    from fl_server.metrics import REFUSALS

    trail = server_audit.open_server_trail(tmp_path)
    assert trail is not None
    try:
        before = REFUSALS.labels("TEST_STORM")._value.get()
        for _ in range(server_audit.REFUSALS_AUDITED_PER_MINUTE + 25):
            server_audit.refused("TEST_STORM", "no", client_id="storm_client", method="/x/Y")
        assert REFUSALS.labels("TEST_STORM")._value.get() - before == \
            server_audit.REFUSALS_AUDITED_PER_MINUTE + 25
        recs = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert len(recs) == server_audit.REFUSALS_AUDITED_PER_MINUTE
        assert server_audit._refusal_budget("storm_client", "TEST_STORM") == (False, 0)
        assert verify_trail(tmp_path / "audit.jsonl").ok
        events = server_audit.recent_events()
        assert events[0]["client_id"] == "storm_client" and "(x" in events[0]["message"]
    finally:
        server_audit._trail = None
        trail.close()
