"""Status's `rounds_after`: a poller asks only for the rounds recorded since its last
call (a job that has run for months would otherwise send every round on every poll),
and the dashboard's feed puts the whole list back together, starting over when the
server serves another job or sends rounds the feed already holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fl_proto import coordinator_pb2 as cpb
from fl_server.admin.dashboard import HeldRounds
from fl_server.clients import ClientRegistry
from fl_server.coordinator import build_job_status
from fl_server.store import RoundSummary, Store

SUMMARY = RoundSummary(selected=2, reported=2, failed=0, seconds=0.5,
                       metrics={"train_loss": 0.25, "clients": {"h1": {"epsilon_total": 1.5}}})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    s.create_job("job-a", "breast_cancer", "fedavg", {"rounds": 9}, total_rounds=9)
    s.save_initial_model("job-a", {"w": torch.zeros(3)})
    yield s
    s.close()


def record(store: Store, job_id: str, rounds: range) -> None:
    for r in rounds:
        if r % 3 == 2:
            store.record_failed_round(job_id, r, SUMMARY, reason="no quorum")
        else:
            store.complete_round(job_id, r, SUMMARY, {"w": torch.full((3,), float(r))}, {})


def status(store: Store, job_id: str, rounds_after: int = 0) -> cpb.StatusReply:
    job = store.get_job(job_id)
    assert job is not None
    return build_job_status(job, ClientRegistry(), store, rounds_after)


def test_rounds_after_sends_only_later_rounds_and_the_rest_unchanged(store: Store) -> None:
    record(store, "job-a", range(1, 6))
    full = status(store, "job-a")
    assert [r.round for r in full.rounds] == [1, 2, 3, 4, 5]
    for after in (1, 2, 4, 5, 99):
        part = status(store, "job-a", after)
        assert list(part.rounds) == [r for r in full.rounds if r.round > after], after
        # the job's own fields do not depend on which rounds were sent
        for name in ("job_id", "round", "total_rounds", "job_state", "model_sha256"):
            assert getattr(part, name) == getattr(full, name), (after, name)
    # the latest model's hash: round 4's, as round 5 failed (it was the last round's
    # empty one before)
    assert full.model_sha256 == full.rounds[3].model_sha256 and len(full.model_sha256) == 64
    assert full.rounds[4].state == "failed"
    assert store.rounds("job-a", 3) == store.rounds("job-a")[3:]


def test_the_feed_holds_what_it_received_and_asks_only_for_newer(store: Store) -> None:
    held = HeldRounds()
    record(store, "job-a", range(1, 3))
    asked: list[int] = []

    def poll() -> cpb.StatusReply:
        while True:
            request = held.request()
            asked.append(request.rounds_after)
            reply = held.complete(request, status(store, "job-a", request.rounds_after))
            if reply is not None:
                return reply

    assert [r.round for r in poll().rounds] == [1, 2]
    assert [r.round for r in poll().rounds] == [1, 2]  # nothing new
    record(store, "job-a", range(3, 6))
    reply = poll()
    assert list(reply.rounds) == list(status(store, "job-a").rounds)
    assert asked == [0, 2, 2]


def test_the_feed_starts_over_for_another_job_or_lost_rounds(store: Store) -> None:
    held = HeldRounds()
    record(store, "job-a", range(1, 4))
    first = held.request()
    assert held.complete(first, status(store, "job-a")) is not None
    request = held.request()
    assert request.rounds_after == 3
    store.create_job("job-b", "breast_cancer", "fedavg", {"rounds": 9}, total_rounds=9)
    store.save_initial_model("job-b", {"w": torch.zeros(3)})
    record(store, "job-b", range(1, 6))
    # the server moved on to job-b: its rounds 4-5 alone would pass for job-a's
    assert held.complete(request, status(store, "job-b", 3)) is None
    assert held.request().rounds_after == 0
    reply = held.complete(held.request(), status(store, "job-b"))
    assert reply is not None and [r.round for r in reply.rounds] == [1, 2, 3, 4, 5]
    # a reply that repeats a round the feed holds (a server from before `rounds_after`
    # sends every round): start over, nothing duplicated
    request = held.request()
    stale = status(store, "job-b", 3)
    assert held.complete(request, stale) is None
    assert held.request().rounds_after == 0
