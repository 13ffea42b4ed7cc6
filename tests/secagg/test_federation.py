"""Secure aggregation over real processes (mTLS on loopback): what the server holds
for one hospital, a malicious server, and the rounds' records."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fl_core.secagg.adverts import RoundId
from fl_core.secagg.graph import positions
from fl_core.secagg.masks import self_mask_removals
from fl_core.secagg.prg import apply_masks
from fl_core.secagg.shamir import combine
from fl_demo.launcher import Federation
from fl_proto import secagg_pb2 as spb
from tests.secagg.conftest import HOSPITALS, start_client_double, start_server_double

pytestmark = pytest.mark.slow

SECURE = ["--secure_aggregation", "--min_clients", "3", "--round_deadline_s", "90",
          "--wait_for_clients_s", "60", "--exit_when_done", "--local_epochs", "1",
          "--no_fed_eval", "--secagg_stage_timeout_s", "10"]
CLIENT = ["--epsilon_budget", "50"]
ADAPTIVE = ["--strategy", "dp_fedavg", "--strategy_param", "clip=0.05",
            "--strategy_param", "target_quantile=0.5", "--strategy_param",
            "noise_multiplier=0.001"]


def _rows(fed: Federation) -> list[tuple[int, str, dict[str, float]]]:
    db = sqlite3.connect(fed.workdir / "server_state" / "server.db")
    try:
        rows = db.execute("SELECT round, state, metrics_json FROM rounds ORDER BY round")
        return [(r, s, json.loads(m or "{}")) for r, s, m in rows.fetchall()]
    finally:
        db.close()


def _uniform_chi2(words: np.ndarray) -> float:
    counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
    expected = words.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float64)
    y = b.view(np.int32).astype(np.float64)
    return float(np.corrcoef(x, y)[0, 1])


def test_the_server_holds_only_masked_words_and_learns_only_the_sum(
        secfed: Federation, symptom_data: Path, tmp_path: Path) -> None:
    fed = secfed
    fed.model_type = "symptom"  # ~5k coordinates (breast_cancer's model has 62)
    tap, plain = tmp_path / "tap", tmp_path / "plain"
    # dp_fedavg with adaptive clipping (issue 13 item 4): the hospitals clip to the
    # round's clip and add their unclipped bit to the masked vector
    start_server_double(fed, [*SECURE, "--rounds", "2", *ADAPTIVE], f"tap:{tap}")
    for name in HOSPITALS[:3]:
        start_client_double(fed, name, symptom_data / name, plain, CLIENT)
    assert fed.wait_server(timeout_s=300) == 0, fed.tail("server.log", 80)
    rows = _rows(fed)
    assert [(r, s) for r, s, _ in rows] == [(1, "completed"), (2, "completed")]
    assert all(m["secure"] == 1 and m["secagg_threshold"] == 2 and m["secagg_dropped"] == 0
               for _, _, m in rows)
    log = (fed.log_dir / "server.log").read_text()
    assert "secagg_open" in log and "k=2" in log and "t=2" in log
    opened = [line for line in log.splitlines() if "secagg_open" in line]
    for rnd, (_, _, m) in enumerate(rows, start=1):
        # the count the server released is the hospitals' bits, summed under the masks
        bits = sum(int(np.load(plain / f"plain-r{rnd}-{c}.npy")[-1]) for c in HOSPITALS[:3])
        assert 0 <= bits <= 3
        assert abs(m["central_unclipped_fraction"] - bits / 3) < 0.01, (bits, m)
        assert m["central_next_clip"] == pytest.approx(
            m["central_clip"] * math.exp(-0.2 * (m["central_unclipped_fraction"] - 0.5)))
        # and the hospitals clipped to the round's clip, which moved after round 1
        assert f"l2_clip={m['central_clip']:.6g}" in opened[rnd - 1]
        assert "count_unclipped=True" in opened[rnd - 1]
    assert rows[1][2]["central_clip"] == pytest.approx(rows[0][2]["central_next_clip"])
    for name in HOSPITALS[:3]:  # each hospital's ledger says how its updates left
        ledger = fed.workdir / "sites" / name / "state" / f"privacy_ledger_{name}.json"
        entries = json.loads(ledger.read_text())["entries"]
        assert len(entries) == 2 and all(e["secure_aggregation"] for e in entries)
    for rnd in (1, 2):
        masked = {c: np.load(tap / f"masked-r{rnd}-{c}.npy") for c in HOSPITALS[:3]}
        meant = {c: np.load(plain / f"plain-r{rnd}-{c}.npy") for c in HOSPITALS[:3]}
        n = next(iter(masked.values())).size
        assert n > 1000
        total_masked = np.zeros(n, dtype=np.uint32)
        total_meant = np.zeros(n, dtype=np.uint32)
        for c in masked:
            # what the server holds for one hospital: uniform, uncorrelated with its update
            assert not np.array_equal(masked[c], meant[c])
            assert _uniform_chi2(masked[c]) < 400
            assert abs(_corr(masked[c].view(np.int32), meant[c])) < 5 / np.sqrt(n)
            total_masked += masked[c]
            total_meant += meant[c]
        # the masks do not cancel in the sum without the reveals ...
        assert not np.array_equal(total_masked, total_meant)
        # ... and with them the server gets exactly the sum, yet no single hospital:
        job_id, session, t = (tap / f"session-r{rnd}.txt").read_text().split()
        rid = RoundId(job_id, rnd, session)
        pos = positions(HOSPITALS[:3])
        seeds: dict[str, dict[int, bytes]] = {c: {} for c in HOSPITALS[:3]}
        for holder in HOSPITALS[:3]:
            req = spb.RevealSharesRequest.FromString(
                (tap / f"reveal-r{rnd}-{holder}.bin").read_bytes())
            for s in req.shares:
                assert s.kind == spb.SEED  # nobody dropped: no mask key was ever revealed
                seeds[s.owner][pos[holder]] = bytes(s.share)
        b = {c: combine(seeds[c], int(t)) for c in seeds}
        unmasked = total_masked.copy()
        apply_masks(unmasked, self_mask_removals(rid, b))
        assert np.array_equal(unmasked, total_meant)
        # the attack: take one hospital's self-mask off with its revealed seed; the
        # pairwise masks stay, and what is left still says nothing about its update
        for c in HOSPITALS[:3]:
            alone = masked[c].copy()
            apply_masks(alone, self_mask_removals(rid, {c: b[c]}))
            assert not np.array_equal(alone, meant[c])
            assert _uniform_chi2(alone) < 400
            assert abs(_corr(alone.view(np.int32), meant[c])) < 5 / np.sqrt(n)


def _ledger_entries(fed: Federation, name: str) -> list[dict[str, object]]:
    path = fed.workdir / "sites" / name / "state" / f"privacy_ledger_{name}.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("entries", []))


def test_a_malicious_server_is_refused_by_every_honest_hospital(
        secfed: Federation, bc_data: dict[int, Path]) -> None:
    """One job, two attempts of round 1 against a malicious server double. Attempt 1:
    it swaps hospital_1's mask key for one of its own in what it relays to the others:
    they refuse (KEY_SUBSTITUTED) before training, so nobody spends privacy budget on
    it. Attempt 2: it asks every survivor for both shares of hospital_2: every
    hospital refuses the request, so the server cannot unmask anything."""
    fed = secfed
    start_server_double(fed, [*SECURE, "--rounds", "1", "--max_round_attempts", "2"],
                        "swap_then_both:hospital_1,hospital_2")
    for name in HOSPITALS[:3]:
        fed.start_client(name, bc_data[3] / name, CLIENT)
    assert fed.wait_server(timeout_s=240) == 1, fed.tail("server.log", 60)
    assert [s for _, s, _ in _rows(fed)] == ["failed"]
    for name in HOSPITALS[1:3]:
        log = (fed.log_dir / f"{name}.log").read_text()
        assert "secagg_refused" in log and "KEY_SUBSTITUTED" in log, fed.tail(f"{name}.log")
    for name in HOSPITALS[:3]:
        log = (fed.log_dir / f"{name}.log").read_text()
        assert "BAD_UNMASK" in log and "both shares" in log, fed.tail(f"{name}.log")
        # one training run in the ledger: the second attempt's (every hospital got to
        # its unmask stage); the first attempt, refused before training, spent nothing
        assert len(_ledger_entries(fed, name)) == 1, name
    assert "NOT_ENOUGH_SHARES" in (fed.log_dir / "server.log").read_text()
