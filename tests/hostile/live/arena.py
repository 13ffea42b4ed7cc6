"""The arena every live hostile case runs in: one real server process, one
well-behaved hospital process that keeps rounds completing, and the identities an
attacker might hold. Cases run inside a *frozen round* (see `Arena.frozen_round`),
so each one can check that nothing changed while it attacked, and that the round
it attacked still completes with only the honest update in it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from fl_core.constants import MAX_MESSAGE_BYTES
from fl_demo.launcher import Federation
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from tests.hostile.kit import (
    SERVING,
    TIMEOUT,
    HostileClient,
    Identity,
    RoundRow,
    checkpoint_sha,
    health_status,
    read_jobs,
    read_rounds,
    site_identity,
    wait_for,
)

GOOD = "hospital_1"      # a real client daemon process: trains every round
EVIL = "hospital_2"      # driven by the test: the attacker with a real certificate
FREEZER = "hospital_3"   # driven by the test: holds each attacked round open
BYSTANDER = "hospital_4"  # joins but never opens a task stream: never selected
REVOKED = "hospital_revoked"
ROUND_DEADLINE_S = 6

SERVER_FLAGS = [
    "--rounds", "1000000", "--min_clients", "1", "--quorum", "0.25",
    "--round_deadline_s", str(ROUND_DEADLINE_S), "--wait_for_clients_s", "600",
    "--no_fed_eval", "--local_epochs", "1", "--no_dp", "--seed", "1",
    "--max_round_attempts", "3",
]


@dataclass
class Frozen:
    """A round the test holds open: the freezer (and the attacker, if any) hold its
    TRAIN tasks, so the global model cannot move while the case attacks."""

    round: int
    task: cpb.Task | None        # the attacker's TRAIN task
    freezer_task: cpb.Task
    sha_before: str
    freezer_session: str = ""  # the session id the freezer holds its task under
    evil_accepted: bool = False  # set by a case whose attacker sent one valid update
    close_by_deadline: bool = False  # the case lets the round deadline close it
    expect_attempt: int = 1

    @property
    def evil_task(self) -> cpb.Task:
        """The attacker's TRAIN task (a round frozen with an attacker has one)."""
        assert self.task is not None, "this frozen round has no attacker"
        return self.task


@dataclass
class Arena:
    fed: Federation
    workdir: Path
    keys: Path
    port: int
    state_dir: Path
    job_id: str
    admin: Identity

    # views ---------------------------------------------------------------------------
    def status(self) -> cpb.StatusReply:
        with grpc.secure_channel(f"127.0.0.1:{self.port}", self.admin.credentials()) as ch:
            reply: cpb.StatusReply = cpb_grpc.CoordinatorStub(ch).Status(
                cpb.StatusRequest(), timeout=TIMEOUT)
            return reply

    def health(self) -> int:
        return health_status(self.port, self.admin)

    def identity(self, name: str) -> Identity:
        return site_identity(self.workdir, name)

    def client(self, name: str = EVIL, max_send_bytes: int = MAX_MESSAGE_BYTES) -> HostileClient:
        return HostileClient(self.port, self.identity(name), name,
                             max_send_bytes=max_send_bytes)

    def round_row(self, round_no: int) -> RoundRow | None:
        for row in read_rounds(self.state_dir, self.job_id):
            if row.round == round_no:
                return row
        return None

    def connected(self) -> set[str]:
        return {c.client_id for c in self.status().clients if c.connected}

    def _job_not_running(self) -> None:
        states = dict(read_jobs(self.state_dir))
        if states.get(self.job_id) != "running":
            raise AssertionError(f"the job is {states.get(self.job_id)!r}, not running:\n"
                                 + self.fed.tail("server.log"))

    def assert_alive(self) -> None:
        assert self.fed.server is not None and self.fed.server.poll() is None, \
            "the server process died:\n" + self.fed.tail("server.log")
        good = self.fed.clients[GOOD]
        assert good.poll() is None, "the honest hospital died:\n" + self.fed.tail(f"{GOOD}.log")
        assert self.health() == SERVING

    # the frozen round -------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen_round(self, evil: HostileClient | None = None) -> Iterator[Frozen]:
        """Hold the next round open while the case attacks, then check what every
        hostile case must leave behind: the server SERVING, the global model and its
        checkpoint unchanged during the attack, and the attacked round completing with
        only the honest update (plus the attacker's one valid update, if the case
        sent one)."""
        freezer = self.client(FREEZER)
        try:
            freezer_task, evil_task = self._freeze(freezer, evil)
            status = self.status()
            last = status.rounds[-1]
            assert last.round == freezer_task.round - 1 and last.state == "completed"
            assert status.model_sha256 == last.model_sha256
            assert checkpoint_sha(self.state_dir, self.job_id, last.round) == last.model_sha256
            assert freezer.session is not None
            frozen = Frozen(freezer_task.round, evil_task, freezer_task, last.model_sha256,
                            freezer_session=freezer.session.session_id)
            yield frozen
            # While the round was held, nothing the attacker did moved the model.
            after = self.status()
            assert after.job_state == "running", after.job_state
            if not frozen.close_by_deadline:
                assert after.model_sha256 == frozen.sha_before, "the global model changed"
            assert checkpoint_sha(self.state_dir, self.job_id, last.round) == frozen.sha_before
            self.assert_alive()
            # The server notices a closed task stream within a second; until it has, it
            # would still select the test clients for the next round (and wait for them).
            wait_for(lambda: not {FREEZER, EVIL} & self.connected(), 10,
                     "the test clients' task streams to be seen closed", interval=0.1)
            if not frozen.close_by_deadline:
                freezer.report_task(freezer_task)
                if evil is not None and evil_task is not None and not frozen.evil_accepted:
                    with contextlib.suppress(grpc.RpcError):
                        evil.report_task(evil_task)
            freezer.close_tasks()
            if evil is not None:
                evil.close_tasks()
            row = wait_for(lambda: self.round_row(frozen.round) or self._job_not_running(),
                           3 * ROUND_DEADLINE_S + 30, f"round {frozen.round} to be recorded")
            assert row.state == "completed", row
            assert row.metrics.get("attempt") == frozen.expect_attempt, row.metrics
            honest = {GOOD} | ({EVIL} if frozen.evil_accepted else set())
            assert row.accepted == honest, (row.accepted, row.failures)
            assert row.reported == len(honest)
            self.assert_alive()
        finally:
            freezer.close()
            if evil is not None:
                evil.close_tasks()

    def _freeze(self, freezer: HostileClient, evil: HostileClient | None
                ) -> tuple[cpb.Task, cpb.Task | None]:
        """Both test clients holding TRAIN tasks of the same round. A client that got
        a task of a round the other is not in gives it up (FAILED) and waits for the
        next round, which selects both (fraction 1 selects everyone connected)."""
        freezer.open_tasks()
        if evil is not None:
            evil.open_tasks()
        ft: cpb.Task | None = None
        et: cpb.Task | None = None
        alone_since: float | None = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ft = ft or freezer.poll_task(timeout=0.1)
            if evil is None:
                if ft is not None:
                    freezer.close_tasks()
                    return ft, None
                continue
            et = et or evil.poll_task(timeout=0.1)
            if ft is not None and et is not None:
                if ft.round == et.round:
                    # Holding the tasks is what holds the round; with the task streams
                    # closed, neither test client is selected for any later round.
                    freezer.close_tasks()
                    evil.close_tasks()
                    return ft, et
                if ft.round < et.round:
                    ft = self._give_up(freezer, ft)
                else:
                    et = self._give_up(evil, et)
            elif ft is not None or et is not None:
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > 1.0:
                    if ft is not None:
                        ft = self._give_up(freezer, ft)
                    if et is not None:
                        et = self._give_up(evil, et)
                    alone_since = None
        raise AssertionError("could not get the freezer and the attacker into one round")

    @staticmethod
    def _give_up(client: HostileClient, task: cpb.Task) -> None:
        with contextlib.suppress(grpc.RpcError):
            client.report_task(task)
