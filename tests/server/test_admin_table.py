"""fl-admin's table: what an operator reads at a glance."""

from __future__ import annotations

from fl_proto import coordinator_pb2 as cpb
from fl_server.admin import render


def status(rounds: int) -> cpb.StatusReply:
    reply = cpb.StatusReply(job_id="job-1", round=rounds, total_rounds=rounds)
    reply.clients.add(client_id="hospital_1", epsilon_total=2.5, epsilon_budget=10.0,
                      epsilon_budget_left=7.5, last_report_status="REFUSED",
                      last_report_reason="epsilon 11.2 would exceed the budget 10")
    reply.clients.add(client_id="hospital_2", epsilon_total=1.0)
    for n in range(1, rounds + 1):
        reply.rounds.add(round=n, state="completed", seconds=1.25, wait_seconds=30.0 * (n == 1))
    return reply


def test_refusal_reason_and_budget_left_are_shown() -> None:
    lines = render(status(3)).splitlines()
    h1 = next(line for line in lines if line.startswith("hospital_1"))
    assert "7.50" in h1 and "REFUSED: epsilon 11.2 would exceed the budget 10" in h1
    h2 = next(line for line in lines if line.startswith("hospital_2"))
    assert h2.split()[-1] == "-"  # no budget declared: nothing to show, not 0.00


def test_only_the_last_rounds_by_default_and_the_wait_apart() -> None:
    lines = render(status(40)).splitlines()
    rows = [line for line in lines if line.strip()[:2].strip().isdigit()]
    assert [int(r.split()[0]) for r in rows] == list(range(31, 41))
    assert "last 10 of 40 rounds (--rounds 0 shows all)" in lines
    every = render(status(40), last_rounds=0).splitlines()
    first = next(line for line in every if line.split()[:1] == ["1"])
    assert first.split()[5:7] == ["1.25", "30.0"]  # seconds without the 30 s wait
