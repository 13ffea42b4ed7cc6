"""The client daemon's task handling, with the server replaced by an in-memory
connection: what it trains, charges, sends and refuses for each kind of task.
(The same daemon over real mTLS is covered by tests/integration and tests/faults.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_client.client import ClientDaemon, build_parser
from fl_core.statelock import StateLockError
from fl_demo.launcher import make_pki, site_keys
from fl_models.registry import get_task
from fl_proto import coordinator_pb2 as cpb

CLIENT = "hospital_1"


@dataclass
class Receipt:
    bytes_received: int = 0
    chunks_received: int = 0
    sha256: bytes = b""
    stream_id: str = ""


@dataclass
class FakeConnection:
    """Serves one global model and records what the daemon sends back."""

    global_state: dict[str, torch.Tensor]
    updates: list[tuple[cpb.Task, dict[str, torch.Tensor], int, dict[str, float]]] = field(
        default_factory=list)
    reports: list[cpb.ReportRequest] = field(default_factory=list)
    target: str = "127.0.0.1:0"
    job_model_types: list[str] = field(default_factory=list)

    def fetch_model(self, task: cpb.Task, expected: Any, on_progress: Any = None
                    ) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.global_state.items()}

    def submit_update(self, task: cpb.Task, state: Mapping[str, torch.Tensor],
                      num_examples: int, metrics: Mapping[str, float], on_progress: Any = None,
                      stop: Any = None) -> Receipt:
        self.updates.append((task, dict(state), num_examples, dict(metrics)))
        return Receipt(bytes_received=sum(t.numel() * t.element_size() for t in state.values()))

    def report(self, request: cpb.ReportRequest) -> None:
        self.reports.append(request)

    def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    make_pki(root, [CLIENT])
    get_task("breast_cancer").prepare(root / "data", clients=1, alpha=None, seed=3)
    return root


def make_daemon(site: Path, state: Path, *extra: str) -> tuple[ClientDaemon, FakeConnection]:
    args = build_parser().parse_args([
        "--client_id", CLIENT, "--server_url", "127.0.0.1:1",
        "--data_path", str(site / "data" / "hospital_1"), "--model_type", "breast_cancer",
        "--keys_dir", str(site_keys(site, CLIENT)), "--state_dir", str(state), *extra])
    daemon = ClientDaemon(args)
    fake = FakeConnection({k: v.clone() for k, v in daemon.reference.items()})
    daemon.conn = fake  # type: ignore[assignment]
    return daemon, fake


@pytest.fixture()
def daemon(site: Path, tmp_path: Path) -> Iterator[tuple[ClientDaemon, FakeConnection]]:
    made = make_daemon(site, tmp_path / "state")
    yield made
    made[0].state_lock.release()


def train_task(round_no: int = 1, *, dp: bool = True, noise: float = 1.0,
               max_grad_norm: float = 1.0) -> cpb.Task:
    privacy = cpb.PrivacyConfig(enabled=dp, noise_multiplier=noise, delta=1e-5,
                                max_grad_norm=max_grad_norm)
    return cpb.Task(task_id=f"t{round_no}", kind=cpb.TRAIN, job_id="job-1", round=round_no,
                    model_type="breast_cancer",
                    config=cpb.TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.05,
                                           update_kind=cpb.DELTA, privacy=privacy, seed=1))


def test_a_training_task_sends_one_update_and_charges_the_ledger_once(
        daemon: tuple[ClientDaemon, FakeConnection]) -> None:
    d, fake = daemon
    d._handle(train_task(1))
    assert len(fake.updates) == 1 and not fake.reports
    task, state, examples, metrics = fake.updates[0]
    assert examples == len(d.train_set)
    assert list(state) == list(d.reference)  # the global model's names, in order
    assert any(bool(t.abs().sum() > 0) for t in state.values())  # a real delta
    assert metrics["dp_enabled"] == 1.0 and metrics["epsilon_round"] > 0
    assert metrics["epsilon_total"] == pytest.approx(d.ledger.spent())
    assert len(d.ledger.entries()) == 1 and d.tasks_done == 1


def test_a_task_over_the_budget_is_refused_and_charges_nothing(
        site: Path, tmp_path: Path) -> None:
    d, fake = make_daemon(site, tmp_path / "state", "--epsilon_budget", "0.01")
    try:
        d._handle(train_task(1))
        assert not fake.updates and len(fake.reports) == 1
        report = fake.reports[0]
        assert report.status == cpb.REFUSED and "budget" in report.reason
        assert d.ledger.spent() == 0.0 and not d.ledger.entries()
    finally:
        d.state_lock.release()


@pytest.mark.parametrize("task, reason", [
    (train_task(dp=False), "--allow_no_dp"),
    (train_task(max_grad_norm=float("inf")), "max_grad_norm"),
    (train_task(noise=float("nan")), "noise_multiplier"),
])
def test_an_unsafe_task_is_refused_with_its_reason(
        daemon: tuple[ClientDaemon, FakeConnection], task: cpb.Task, reason: str) -> None:
    d, fake = daemon
    d._handle(task)
    assert not fake.updates and [r.status for r in fake.reports] == [cpb.REFUSED]
    assert reason in fake.reports[0].reason
    assert not d.ledger.entries()


def test_a_non_finite_global_model_is_refused(
        daemon: tuple[ClientDaemon, FakeConnection]) -> None:
    d, fake = daemon
    name = next(k for k, v in fake.global_state.items() if v.is_floating_point())
    fake.global_state[name].view(-1)[0] = float("nan")
    d._handle(train_task(1))
    assert not fake.updates and fake.reports[0].status == cpb.REFUSED
    assert not d.ledger.entries()


def test_one_daemon_per_state_folder(daemon: tuple[ClientDaemon, FakeConnection],
                                     site: Path, tmp_path: Path) -> None:
    with pytest.raises(StateLockError, match="in use by another fl-client"):
        make_daemon(site, tmp_path / "state")


class StoppedJobServer(FakeConnection):
    """A server whose job has ended: every task stream carries its STOP, then ends."""

    joins: int = 0

    def connect(self) -> None:
        return None

    def join(self) -> None:
        self.joins += 1

    def tasks(self) -> TaskCall:
        return TaskCall([cpb.Task(task_id="stop", kind=cpb.STOP, job_id="job-ended", round=3)])


class TaskCall:
    """A finished server stream, as gRPC hands it over: iterable and cancellable."""

    def __init__(self, tasks: list[cpb.Task]) -> None:
        self._tasks = tasks

    def __iter__(self) -> Iterator[cpb.Task]:
        return iter(self._tasks)

    def cancel(self) -> None:
        return None


def test_a_kept_running_client_waits_for_the_next_job_instead_of_rejoining(
        site: Path, tmp_path: Path) -> None:
    import threading
    import time

    d, _ = make_daemon(site, tmp_path / "state", "--keep_running")
    server = StoppedJobServer({})
    d.conn = server  # type: ignore[assignment]
    runner = threading.Thread(target=d.run, daemon=True)
    try:
        runner.start()
        time.sleep(3.0)  # before the fix: a join every few tens of milliseconds
        assert runner.is_alive(), "the daemon's loop died"
        assert server.joins == 1 and d.ended_jobs == {"job-ended"}
    finally:
        d.request_stop()
        runner.join(10)
        d.state_lock.release()
    assert not runner.is_alive()


def test_the_ledger_composes_with_the_accountant_the_hospital_chose(
        site: Path, tmp_path: Path) -> None:
    figures = {}
    for accountant in ("prv", "rdp"):
        d, fake = make_daemon(site, tmp_path / accountant, "--accountant", accountant)
        try:
            d._handle(train_task(1, noise=1.0))
            assert d.ledger.accountant == accountant and len(fake.updates) == 1
            figures[accountant] = d.ledger.spent()
        finally:
            d.state_lock.release()
    assert 0 < figures["prv"] < figures["rdp"]  # the same run, PRV's tighter figure


def test_a_task_of_a_study_the_hospital_does_not_serve_is_refused_untouched(
        daemon: tuple[ClientDaemon, FakeConnection]) -> None:
    d, fake = daemon
    task = train_task(1)
    task.model_type = "ecg"
    d._handle(task)
    assert not fake.updates and d.ledger.entries() == []
    (report,) = fake.reports
    assert report.status == cpb.REFUSED and "has no ecg data" in report.reason
