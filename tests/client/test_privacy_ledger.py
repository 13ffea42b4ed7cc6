"""The privacy ledger: accountant-exact epsilons (RDP and PRV against Opacus's own
accountants), persistence, the version-1 reader, refusal, corruption."""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fl_client.privacy_ledger import (
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    merge_history,
    prv_epsilon,
    rdp_epsilon,
)

DELTA = 1e-5


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """What Opacus's own accountant says, step by step as a PrivacyEngine would drive it."""
    acc = RDPAccountant()
    for nm, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=nm, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def make(tmp_path: Path, budget: float = 100.0, accountant: str = "rdp") -> PrivacyLedger:
    """RDP unless asked: most tests here check figures against Opacus's RDP step by step."""
    return PrivacyLedger(tmp_path, "hospital_1", budget, DELTA, accountant=accountant)


def test_empty_ledger_spends_nothing(tmp_path: Path) -> None:
    ledger = make(tmp_path, budget=3.0)
    assert ledger.spent() == 0.0
    assert ledger.remaining() == 3.0
    assert ledger.entries() == []
    assert not ledger.path.exists()  # nothing written until something is spent


def test_round_and_cumulative_epsilon_match_opacus(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    rounds = [(1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.1, 25)]
    for i, (nm, q, steps) in enumerate(rounds):
        entry = ledger.record("job", i, nm, q, steps)
        assert entry.epsilon_round == pytest.approx(opacus_epsilon([(nm, q, steps)]), rel=1e-9)
        assert entry.epsilon_cumulative == pytest.approx(
            opacus_epsilon(rounds[: i + 1]), rel=1e-9
        )
    assert ledger.spent() == pytest.approx(opacus_epsilon(rounds), rel=1e-9)


def test_epsilon_grows_with_steps(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    eps = [ledger.would_spend(1.0, 0.02, steps) for steps in (1, 10, 100, 1000)]
    assert eps == sorted(eps) and len(set(eps)) == 4


def test_composition_is_tighter_than_naive_sum(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    entries = [ledger.record("job", r, 1.0, 0.05, 60) for r in range(5)]
    naive = sum(e.epsilon_round for e in entries)
    assert ledger.spent() < naive
    assert ledger.spent() > entries[0].epsilon_round


def test_would_spend_does_not_record(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    ledger.record("job", 1, 1.0, 0.05, 60)
    before = ledger.spent()
    would = ledger.would_spend(1.0, 0.05, 60)
    assert would == pytest.approx(opacus_epsilon([(1.0, 0.05, 120)]), rel=1e-9)
    assert ledger.spent() == before and len(ledger.entries()) == 1


def test_ensure_budget_refuses_over_budget(tmp_path: Path) -> None:
    ledger = make(tmp_path, budget=0.5)
    with pytest.raises(BudgetExceeded) as info:
        ledger.ensure_budget(1.0, 0.05, 100)
    assert info.value.spent == 0.0
    assert info.value.would_be > info.value.budget == 0.5
    assert ledger.entries() == []


def test_survives_reopen_and_continues(tmp_path: Path) -> None:
    first = make(tmp_path)
    first.record("job", 1, 1.2, 0.05, 30)
    first.record("job", 2, 1.2, 0.05, 30)
    again = make(tmp_path)
    assert again.entries() == first.entries()
    assert again.spent() == pytest.approx(first.spent())
    again.record("job", 3, 1.2, 0.05, 30)
    assert make(tmp_path).spent() == pytest.approx(opacus_epsilon([(1.2, 0.05, 90)]), rel=1e-9)


def test_retried_round_is_a_new_spend(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    a = ledger.record("job", 4, 1.0, 0.05, 20)
    b = ledger.record("job", 4, 1.0, 0.05, 20)
    assert (a.attempt, b.attempt) == (1, 2)
    assert ledger.spent() == pytest.approx(opacus_epsilon([(1.0, 0.05, 40)]), rel=1e-9)


def test_two_handles_never_lose_each_others_spend(tmp_path: Path) -> None:
    a, b = make(tmp_path), make(tmp_path)
    a.record("job", 1, 1.0, 0.05, 20)
    b.record("job", 1, 1.0, 0.05, 20)  # b re-reads the file before appending
    assert [e.attempt for e in make(tmp_path).entries()] == [1, 2]


def test_non_private_runs_are_recorded_without_epsilon(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    ledger.record("job", 1, 1.0, 0.05, 20)
    entry = ledger.record("job", 2, 0.0, 0.05, 20, dp_enabled=False)
    assert entry.epsilon_round == 0.0 and not entry.dp_enabled
    assert ledger.non_private_runs() == 1
    assert ledger.spent() == pytest.approx(opacus_epsilon([(1.0, 0.05, 20)]), rel=1e-9)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[]", b'{"format": "fl-privacy-ledger", "version": 1}', b"\xff\xfe"],
)
def test_corrupt_file_is_an_error_not_a_reset(tmp_path: Path, content: bytes) -> None:
    ledger = make(tmp_path)
    ledger.path.write_bytes(content)
    with pytest.raises(LedgerError):
        make(tmp_path)


def test_tampered_entry_is_an_error(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    ledger.record("job", 1, 1.0, 0.05, 20)
    doc = json.loads(ledger.path.read_text())
    doc["entries"][0]["steps"] = "many"
    ledger.path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="steps"):
        make(tmp_path)


def test_foreign_client_or_delta_is_an_error(tmp_path: Path) -> None:
    make(tmp_path).record("job", 1, 1.0, 0.05, 20)
    src = tmp_path / "privacy_ledger_hospital_1.json"
    (tmp_path / "privacy_ledger_hospital_2.json").write_bytes(src.read_bytes())
    with pytest.raises(LedgerError, match="belongs to client"):
        PrivacyLedger(tmp_path, "hospital_2", 10.0, DELTA)
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger(tmp_path, "hospital_1", 10.0, 1e-6)


def test_file_is_plain_json_and_no_temp_files_left(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    ledger.record("job", 1, 1.0, 0.05, 20)
    doc = json.loads(ledger.path.read_text())
    assert doc["client_id"] == "hospital_1" and len(doc["entries"]) == 1
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {ledger.path.name, ".privacy_ledger_hospital_1.lock"}


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden"])
def test_client_id_must_be_a_safe_file_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=f"^client_id {re.escape(repr(bad))} is not usable in"
                                         " a file name$"):
        PrivacyLedger(tmp_path, bad, 1.0, DELTA)
    assert list(tmp_path.iterdir()) == []


def test_invalid_mechanism_rejected(tmp_path: Path) -> None:
    ledger = make(tmp_path)
    with pytest.raises(ValueError, match=r"^noise_multiplier must be finite and > 0, got 0\.0$"):
        ledger.record("job", 1, 0.0, 0.05, 10)
    with pytest.raises(ValueError, match=r"^sample_rate must be in \(0, 1\], got 1\.5$"):
        ledger.would_spend(1.0, 1.5, 10)
    assert ledger.entries() == []


# --- PRV (the default) ---------------------------------------------------------------


def opacus_prv(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    acc = PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.filterwarnings("ignore:divide by zero")  # Opacus's own PRV at sample rate 1
@pytest.mark.parametrize("history", [
    [(1.0, 0.2, 50)],  # the old demo's breast-cancer settings: 5 rounds x 2 epochs
    [(1.1, 0.05, 40), (0.9, 0.1, 25)],
    [(7.5, 1.0, 30)],  # full-batch rounds, as the DP-tuned tabular tasks train
])
def test_prv_matches_opacus_prv_and_is_never_above_rdp(history: list[tuple[float, float, int]]
                                                       ) -> None:
    ours = prv_epsilon(history, DELTA)
    assert ours == pytest.approx(opacus_prv(history), rel=1e-9)
    assert ours <= rdp_epsilon(history, DELTA)


def test_prv_is_at_least_8_percent_below_rdp_on_the_demo_settings() -> None:
    history = [(1.0, 0.2, 50)]
    assert prv_epsilon(history, DELTA) <= 0.92 * rdp_epsilon(history, DELTA)


def _anonymous_mib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) >> 10
    raise AssertionError("no RssAnon in /proc/self/status")


def test_prv_leaves_no_fft_plans_behind() -> None:
    """A hospital daemon computes a PRV epsilon every round over a longer history, so a
    new grid length each time. scipy.fft kept a plan (twiddle factors the size of the
    grid) for each of its last 16 lengths: ~45 MB each here, 370 MB after these eight
    figures, GBs after a few hundred rounds. What stays is the heap's high-water mark
    (~50 MB here), however many figures are computed."""
    prv_epsilon([(1.0, 0.05, 10)], DELTA)  # modules and small plans in place first
    gc.collect()
    before = _anonymous_mib()
    for k in range(8):
        prv_epsilon([(1.0, 0.17, 400 + 40 * k)], DELTA)
    gc.collect()
    grown = _anonymous_mib() - before
    assert grown < 150, f"PRV left {grown} MiB of anonymous memory behind"


def test_default_ledger_composes_with_prv(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "hospital_1", 100.0, DELTA)
    assert ledger.accountant == "prv"
    rounds = [(1.0, 0.2, 10)] * 3
    for i, (nm, q, steps) in enumerate(rounds, start=1):
        entry = ledger.record("job", i, nm, q, steps)
        assert entry.accountant == "prv"
    assert ledger.spent() == pytest.approx(opacus_prv([(1.0, 0.2, 30)]), rel=1e-9)
    assert entry.epsilon_cumulative == ledger.spent() < rdp_epsilon(rounds, DELTA)
    doc = json.loads(ledger.path.read_text())
    assert doc["version"] == 2 and doc["accountant"] == "prv"
    assert all(e["accountant"] == "prv" for e in doc["entries"])


def test_history_merges_exactly() -> None:
    history = [(1.0, 0.2, 10), (2.0, 0.2, 5), (1.0, 0.2, 10), (3.0, 0.1, 0)]
    assert merge_history(history) == ((1.0, 0.2, 20), (2.0, 0.2, 5))


def test_unknown_accountant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(tmp_path, "hospital_1", 10.0, DELTA, accountant="gdp")


# --- the version-1 format --------------------------------------------------------------

V1_ENTRY = {"job_id": "old-job", "round": 1, "attempt": 1, "dp_enabled": True,
            "noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 10,
            "epsilon_round": 5.7537, "epsilon_cumulative": 5.7537, "timestamp": 1.7e9}


def write_v1(tmp_path: Path, entries: list[dict[str, object]]) -> Path:
    doc = {"format": "fl-privacy-ledger", "version": 1, "client_id": "hospital_1",
           "accountant": "rdp", "delta": DELTA, "total_epsilon_budget": 100.0,
           "entries": entries}
    path = tmp_path / "privacy_ledger_hospital_1.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def test_version_1_ledger_still_reads_and_counts(tmp_path: Path) -> None:
    second = {**V1_ENTRY, "round": 2, "epsilon_cumulative": 8.0}
    path = write_v1(tmp_path, [V1_ENTRY, second])
    old_bytes = path.read_bytes()
    ledger = PrivacyLedger(tmp_path, "hospital_1", 100.0, DELTA)  # PRV now
    assert [e.accountant for e in ledger.entries()] == ["rdp", "rdp"]
    assert ledger.entries()[1].epsilon_cumulative == 8.0  # the old figures are kept as written
    assert ledger.spent() == pytest.approx(opacus_prv([(1.0, 0.2, 20)]), rel=1e-9)
    ledger.record("new-job", 1, 1.0, 0.2, 10)
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and [e["accountant"] for e in doc["entries"]] == ["rdp"] * 2 + [
        "prv"]
    assert (tmp_path / "privacy_ledger_hospital_1.v1.json").read_bytes() == old_bytes
    again = PrivacyLedger(tmp_path, "hospital_1", 100.0, DELTA)
    assert again.spent() == pytest.approx(opacus_prv([(1.0, 0.2, 30)]), rel=1e-9)


@pytest.mark.parametrize("change", [
    {"accountant": "prv"},  # version 1 knew only RDP
    {"version": 3},
])
def test_version_1_with_foreign_fields_is_an_error(tmp_path: Path,
                                                   change: dict[str, object]) -> None:
    path = write_v1(tmp_path, [V1_ENTRY])
    doc = json.loads(path.read_text())
    doc.update(change)
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path, "hospital_1", 100.0, DELTA)
