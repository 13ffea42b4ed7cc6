"""Refusal log lines are rate-limited per peer, and nothing is lost from the counts."""

from __future__ import annotations

import logging

import pytest

from fl_core.ratelimit import OVERFLOW_PEER, RefusalLog, peer_host


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_counted_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = RefusalLog(logging.getLogger("t.ratelimit"), interval_s=60, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.ratelimit"):
        written = [limiter.event("hospital_2", "call_refused", reason="x") for _ in range(1000)]
        assert written.count(True) == 3
        limiter.event("hospital_3", "call_refused")  # another peer has its own budget
        clock.now = 61
        assert limiter.event("hospital_2", "call_refused")
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    assert len(fields) == 5
    assert fields[-1]["suppressed"] == 997 and fields[-1]["peer"] == "hospital_2"


def test_peers_beyond_the_table_share_one_bucket() -> None:
    clock = Clock()
    limiter = RefusalLog(logging.getLogger("t.ratelimit2"), interval_s=60, burst=1,
                         max_peers=4, clock=clock)
    admitted = [limiter.admit(f"10.0.0.{i}") for i in range(100)]
    assert sum(1 for a in admitted if a is not None) == 5  # 4 peers + the shared bucket
    assert OVERFLOW_PEER in limiter._windows
    assert len(limiter._windows) == 5


def test_peer_host() -> None:
    assert peer_host("ipv4:127.0.0.1:5123") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5123") == "::1"
