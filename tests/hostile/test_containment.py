"""One hospital must never stop a federation (issue 11), against a real server
process with a small thread pool (--max_workers 12).

Each case attacks while an honest hospital keeps training, and then checks what the
issue promises: the job survives, the honest hospital's rounds keep completing, the
operator's Status answers, and the refused input leaves no trace in the model or in
the recorded rounds. The cases share one server (a module fixture), like the live
arena, to stay quick.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fl_core.constants import STREAM_HEADER_DEADLINE_S
from fl_core.tls import channel_options
from fl_demo.launcher import Federation, make_pki
from fl_models.registry import get_task
from fl_proto import aggregator_pb2 as apb
from fl_proto import coordinator_pb2 as cpb
from tests.hostile.kit import (
    SERVING,
    HostileClient,
    Identity,
    ScriptedClient,
    admin_identity,
    checkpoint_state,
    health_status,
    read_jobs,
    read_rounds,
    refusal_of,
    site_identity,
    wait_for,
)

pytestmark = pytest.mark.slow

HONEST, EVIL, NEWCOMER = "hospital_1", "hospital_2", "hospital_3"
MAX_WORKERS = 12
ROUND_DEADLINE_S = 4
# While cleared, the honest hospital holds its update (a case that needs a round the
# attacker has to itself).
HONEST_MAY_SUBMIT = threading.Event()
HONEST_MAY_SUBMIT.set()
FLAGS = ["--rounds", "100000", "--min_clients", "1", "--quorum", "0.5",
         "--round_deadline_s", str(ROUND_DEADLINE_S), "--wait_for_clients_s", "600",
         "--no_fed_eval",
         "--no_dp", "--seed", "11", "--max_round_attempts", "5",
         "--max_workers", str(MAX_WORKERS)]


@dataclass
class Bunker:
    fed: Federation
    port: int
    state_dir: Path
    admin: Identity
    honest: ScriptedClient

    def ident(self, name: str) -> Identity:
        return site_identity(self.fed.workdir, name)

    def client(self, name: str, num_examples: int = 100) -> HostileClient:
        c = HostileClient(self.port, self.ident(name), name, num_examples=num_examples)
        c.connect()
        c.join()
        return c

    def status(self, timeout: float = 5.0) -> cpb.StatusReply:
        return self.fed.status(timeout_s=timeout)

    def completed(self) -> int:
        return sum(1 for r in read_rounds(self.state_dir) if r.state == "completed")

    def assert_serving(self) -> None:
        """What must hold at any moment of an attack: the server process is up, health
        answers SERVING, the operator's Status answers quickly, the job is running."""
        assert self.fed.server is not None and self.fed.server.poll() is None, \
            self.fed.tail("server.log")
        started = time.monotonic()
        status = self.status(timeout=5.0)
        assert time.monotonic() - started < 5.0
        assert status.job_state == "running", status.job_state
        assert health_status(self.port, self.admin, timeout=5.0) == SERVING
        assert [s for _, s in read_jobs(self.state_dir)] == ["running"]

    def rounds_keep_completing(self, count: int = 2, timeout: float = 60.0) -> None:
        target = self.completed() + count
        wait_for(lambda: self.completed() >= target, timeout,
                 f"{count} more honest rounds", interval=0.2)


def _slow_honest(round_no: int) -> None:
    time.sleep(0.3)  # an honest hospital takes a moment; keeps the round rate sane
    HONEST_MAY_SUBMIT.wait(60)


@pytest.fixture(scope="module")
def bunker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bunker]:
    work = tmp_path_factory.mktemp("bunker")
    keys = make_pki(work, [HONEST, EVIL, NEWCOMER])
    data = work / "data"
    get_task("breast_cancer").prepare(data, clients=2, alpha=None, seed=7)
    fed = Federation(work, [], "breast_cancer")
    try:
        port = fed.start_server([*FLAGS, "--eval_data", str(data / "hospital_1")])
        honest = ScriptedClient(lambda: port, site_identity(work, HONEST), HONEST, 0,
                                before_submit=_slow_honest).start()
        bunker = Bunker(fed, port, work / "server_state", admin_identity(keys), honest)
        wait_for(lambda: bunker.completed() >= 1, 60, "a first honest round")
        yield bunker
        bunker.assert_serving()
        honest.stop()
    finally:
        fed.stop_all()


def _silent(hold: threading.Event) -> Iterator[apb.UpdateStreamMessage]:
    """A client stream that sends nothing until released."""
    hold.wait(60)
    return
    yield  # a generator


def _code(call: grpc.Future, timeout: float) -> grpc.StatusCode:
    try:
        call.result(timeout=timeout)
    except grpc.RpcError as exc:
        return refusal_of(exc).code
    return grpc.StatusCode.OK


def test_stalled_calls_are_bounded(bunker: Bunker) -> None:
    """Item 1: a joined, unselected hospital opens uploads that never send their
    header, plus health Watch and reflection streams that send nothing (which need
    only a certificate). Only a few are admitted; the rest are refused at once; the
    admitted uploads end at the header deadline; Status, health, another hospital's
    Join and the honest rounds are served throughout; afterwards nothing is held."""
    evil = bunker.client(EVIL)
    hold = threading.Event()
    channel = grpc.secure_channel(f"127.0.0.1:{bunker.port}", bunker.ident(EVIL).credentials(),
                                  options=channel_options())
    calls: list[tuple[str, grpc.Future]] = []
    try:
        started = time.monotonic()
        for _ in range(40):
            calls.append(("upload", evil.aggregator.SubmitUpdate.future(
                _silent(hold), metadata=evil.metadata(), timeout=60)))
        health = health_pb2_grpc.HealthStub(channel)
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        for _ in range(20):
            calls.append(("watch", health.Watch(health_pb2.HealthCheckRequest(), timeout=60)))
            calls.append(("reflection", reflect.ServerReflectionInfo(
                iter(_silent_reflection(hold)), timeout=60)))
        refused = wait_for(
            lambda: (done := [(k, c) for k, c in calls if c.done()])
            and len(done) >= len(calls) - 4 and done, 20, "the extra calls to be refused")
        codes = {_code(c, 1) for _, c in refused}
        # RESOURCE_EXHAUSTED: over the identity's limits
        assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}, \
            [(k, _code(c, 1), c.details()) for k, c in refused  # type: ignore[attr-defined]
             if _code(c, 1) != grpc.StatusCode.RESOURCE_EXHAUSTED]
        open_calls = [(k, c) for k, c in calls if not c.done()]
        assert len(open_calls) <= 4, [k for k, _ in open_calls]  # STREAMS_PER_IDENTITY

        # while the attacker holds what it may: everyone else is served
        bunker.assert_serving()
        newcomer = bunker.client(NEWCOMER)  # another hospital's Join
        newcomer.close()
        bunker.rounds_keep_completing(2)

        # an upload that never sends its header ends at the header deadline
        uploads = [c for k, c in calls if k == "upload"]
        for call in uploads:
            code = _code(call, STREAM_HEADER_DEADLINE_S + 15)
            assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.DEADLINE_EXCEEDED), code
        assert any(_code(c, 0) == grpc.StatusCode.DEADLINE_EXCEEDED for c in uploads) or \
            not any(k == "upload" for k, _ in open_calls)
        assert time.monotonic() - started < STREAM_HEADER_DEADLINE_S + 20
    finally:
        hold.set()
        for _, call in calls:
            call.cancel()
        channel.close()
    # everything given back: the next upload is judged on its merits (the attacker
    # has no task), not refused for want of a slot
    refusal = wait_for(lambda: _upload_refusal(evil), 10, "the attacker's slots to be freed")
    assert refusal in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION), \
        refusal
    evil.close()
    bunker.assert_serving()
    bunker.rounds_keep_completing(1)
    # refusals were logged, but not one line per refused call
    log = (bunker.fed.log_dir / "server.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if "call_refused" in line and EVIL in line]
    assert 0 < len(lines) <= 10, len(lines)


def _silent_reflection(hold: threading.Event) -> Iterator[reflection_pb2.ServerReflectionRequest]:
    hold.wait(60)
    return
    yield


def _upload_refusal(evil: HostileClient) -> grpc.StatusCode | None:
    header = apb.UpdateStreamHeader(job_id="x", round=1, task_id="none", num_examples=1)
    try:
        evil.submit([apb.UpdateStreamMessage(header=header)], timeout=5)
    except grpc.RpcError as exc:
        code = refusal_of(exc).code
        return None if code == grpc.StatusCode.RESOURCE_EXHAUSTED else code
    return grpc.StatusCode.OK


def test_many_concurrent_calls_from_one_identity_leave_status_answering(bunker: Bunker) -> None:
    """Item 1: a burst of quick calls from one identity, many at once, is capped per
    identity; the operator's Status answers during it."""
    evil = bunker.client(EVIL)
    request = cpb.ReportRequest(task_id="none", job_id="x", round=1, kind=cpb.TRAIN,
                                status=cpb.FAILED, reason="burst")
    try:
        def one(_: int) -> grpc.StatusCode:
            try:
                evil.coordinator.Report(request, metadata=evil.metadata(), timeout=10)
            except grpc.RpcError as exc:
                return refusal_of(exc).code
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(one, i) for i in range(200)]
            bunker.assert_serving()
            codes = {f.result(timeout=30) for f in futures}
        assert grpc.StatusCode.OK not in codes
        # refused on its merits (no task) or over the identity's limit
        assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.FAILED_PRECONDITION}, codes
    finally:
        evil.close()
    bunker.rounds_keep_completing(1)


# ----------------------------------------------------------------- items 4 and 5


def _train_task(evil: HostileClient) -> cpb.Task:
    evil.open_tasks()
    return evil.next_task(cpb.TRAIN, timeout=30)


BAD_REPORTS: dict[str, dict[str, object]] = {
    "status_99": {"status": 99},
    "kind_77_failed": {"status": cpb.FAILED, "kind": 77},
    "kind_evaluate_on_a_train_task": {"status": cpb.FAILED, "kind": cpb.EVALUATE},
    "negative_epsilon": {"status": cpb.FAILED, "epsilon_total": -5.0},
    "auroc_minus_3": {"status": cpb.OK, "metrics": {"auroc": -3.0}, "num_examples": 10},
    "accuracy_1e12": {"status": cpb.OK, "metrics": {"accuracy": 1e12}, "num_examples": 10},
    "delta_nan": {"status": cpb.FAILED, "delta": math.nan},
    "more_examples_than_declared": {"status": cpb.OK, "num_examples": 101},
}

BAD_HEADERS: dict[str, tuple[int, dict[str, float]]] = {
    "train_loss_minus_1e12": (100, {"train_loss": -1e12}),
    "epsilon_total_minus_5": (100, {"epsilon_total": -5.0}),
    "examples_1e9": (1_000_000_000, {}),
    "examples_above_declared": (101, {}),
    "accuracy_above_1": (100, {"train_accuracy": 1.5}),
    "dp_enabled_2": (100, {"dp_enabled": 2.0}),
}


def test_undefined_enums_and_absurd_numbers_leave_no_trace(bunker: Bunker) -> None:
    """Items 4 and 5: each bad Report and update header is INVALID_ARGUMENT naming the
    problem; none marks the client failed or stores anything: the attacker's valid
    update afterwards is accepted, and the round records it with its true numbers."""
    evil = bunker.client(EVIL, num_examples=100)
    try:
        task = _train_task(evil)
        for case, fields in BAD_REPORTS.items():
            kind = fields.pop("kind", cpb.TRAIN)
            request = cpb.ReportRequest(task_id=task.task_id, job_id=task.job_id,
                                        round=task.round, kind=kind,  # type: ignore[arg-type]
                                        reason=case, **fields)  # type: ignore[arg-type]
            try:
                evil.coordinator.Report(request, metadata=evil.metadata(), timeout=10)
            except grpc.RpcError as exc:
                refusal = refusal_of(exc)
                assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT, (case, refusal)
            else:
                raise AssertionError(f"{case}: the report was accepted")
        for case, (examples, metrics) in BAD_HEADERS.items():
            up = evil.sealed(task, evil.zero_delta(task), num_examples=examples,
                             metrics=metrics)
            try:
                evil.submit(up.messages())
            except grpc.RpcError as exc:
                refusal = refusal_of(exc)
                assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT, (case, refusal)
            else:
                raise AssertionError(f"{case}: the update was accepted")
        # not marked failed by any of it: its one valid update is taken
        up = evil.sealed(task, evil.zero_delta(task), num_examples=100,
                         metrics={"train_loss": 0.25, "train_accuracy": 0.5})
        evil.submit(up.messages())
        evil.close_tasks()
        row = wait_for(lambda: next((r for r in read_rounds(bunker.state_dir)
                                     if r.round == task.round), None), 30,
                       f"round {task.round} to be recorded")
        assert row.state == "completed"
        assert EVIL in row.accepted and EVIL not in row.failures, row
        assert row.metrics["clients"][EVIL]["num_examples"] == 100
        assert row.metrics["clients"][EVIL].get("train_loss") == 0.25
        status = bunker.status()
        summary = next(s for s in status.rounds if s.round == task.round)
        assert all(math.isfinite(v) for v in summary.metrics.values())
        assert 0 <= summary.metrics.get("train_accuracy", 0.5) <= 1
    finally:
        evil.close()
    bunker.assert_serving()
    bunker.rounds_keep_completing(1)



# ----------------------------------------------------------------- item 2


def _huge(task: cpb.Task) -> dict[str, torch.Tensor]:
    """Finite, well-formed, absurd: 1e30 everywhere. With num_examples=1 the float32
    sum stays finite, so only the model's use shows it is poison."""
    return {s.name: torch.full(tuple(s.shape), 1e30, dtype=torch.float32)
            for s in task.model_manifest.tensors}


def _poisoned_round_is_retried_without_the_attacker(bunker: Bunker, evil: HostileClient,
                                                    task: cpb.Task, why: str) -> None:
    row = wait_for(lambda: next((r for r in read_rounds(bunker.state_dir)
                                 if r.round == task.round), None), 60,
                   f"round {task.round} to be recorded")
    assert row.state == "completed", row
    assert row.metrics["attempt"] >= 2, row.metrics
    assert EVIL not in row.accepted and HONEST in row.accepted, row
    assert why in row.failures.get(EVIL, ""), row.failures
    status = bunker.status()
    assert status.job_state == "running"
    last = status.rounds[-1]
    state = checkpoint_state(bunker.state_dir, status.job_id, last.round)
    assert all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e6
               for t in state.values() if t.is_floating_point())
    assert status.model_sha256 == last.model_sha256
    bunker.assert_serving()
    bunker.rounds_keep_completing(1)


def test_update_far_above_the_others_is_left_out(bunker: Bunker) -> None:
    """Item 2, the norm bound (on by default): an update of 1e30 beside an honest one
    spoils that attempt; the retry runs without it and names it in the failures."""
    evil = bunker.client(EVIL)
    try:
        task = _train_task(evil)
        evil.close_tasks()  # so that later rounds do not wait for it
        up = evil.sealed(task, _huge(task), num_examples=1)
        evil.submit(up.messages())
        _poisoned_round_is_retried_without_the_attacker(bunker, evil, task, "norm")
    finally:
        evil.close()


def test_model_that_cannot_be_evaluated_is_rejected_not_the_job(bunker: Bunker) -> None:
    """Item 2, the model check: the attacker's 1e30 update is the round's only one (the
    honest hospital holds its update), so no update-to-update comparison can see it;
    FedAvg's aggregate is finite but unusable (a step of ~1e30 against a model of norm
    ~10, which the server's evaluation (--eval_data) may or may not also choke on,
    depending on the model). The attempt is rejected, the model put back, and the
    retry runs without the attacker."""
    evil = bunker.client(EVIL)
    HONEST_MAY_SUBMIT.clear()
    try:
        task = _train_task(evil)
        evil.close_tasks()
        up = evil.sealed(task, _huge(task), num_examples=1)
        evil.submit(up.messages())
        time.sleep(ROUND_DEADLINE_S + 1)  # the attempt closes on the attacker's update alone
        HONEST_MAY_SUBMIT.set()
        _poisoned_round_is_retried_without_the_attacker(bunker, evil, task, "not usable")
    finally:
        HONEST_MAY_SUBMIT.set()
        evil.close()
