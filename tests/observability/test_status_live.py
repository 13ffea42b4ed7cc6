"""Status's `rounds_after` on the live server: the rounds sent are the later ones, each
exactly as in a full reply (with the per-hospital epsilon the dashboard draws), and
the rest of the reply does not depend on it."""

from __future__ import annotations

import pytest

from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from tests.observability.conftest import LiveFederation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_status_sends_only_the_rounds_after_the_one_asked(live: LiveFederation) -> None:
    fed = live.fed
    wait_for(lambda: len(fed.status().rounds) >= 2, 480, "two recorded rounds", fed)
    with fed.admin_channel() as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        full = stub.Status(cpb.StatusRequest(), timeout=30)
        later = stub.Status(cpb.StatusRequest(rounds_after=1), timeout=30)
        none = stub.Status(cpb.StatusRequest(rounds_after=1 << 31), timeout=30)
    assert [r.round for r in full.rounds][:2] == [1, 2]
    assert later.rounds and all(r.round > 1 for r in later.rounds)
    # a round recorded between the calls is only in the later reply
    held = {r.round: r for r in full.rounds}
    assert [r for r in later.rounds if r.round in held] == full.rounds[1:]
    assert any(r.client_epsilon for r in later.rounds), later.rounds
    assert not none.rounds
    for reply in (later, none):
        assert reply.job_id == full.job_id and reply.total_rounds == full.total_rounds
        assert [c.client_id for c in reply.clients] == [c.client_id for c in full.clients]
