"""The round engine alone: a fake registry stands for the connected hospitals and a
fake store records what the engine would make durable, so each rule of a round
(selection, quorum, retries, refusals, aggregation, what is recorded) is checked
without sockets or processes. The real store and services are covered by the
integration suites."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fl_core.constants import PARALLEL_HASH_MIN_BYTES
from fl_core.tensor_codec import FAST_DIGEST, build_manifest
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb
from fl_server.config import ServerConfig
from fl_server.rounds import ModelVersion, RoundEngine, RoundRefusal
from fl_server.store import RoundSummary, Store, state_sha256
from fl_server.strategies import make_strategy
from fl_server.strategies.fedavg import FedAvg

TIMEOUT_S = 20.0


class FakeRegistry:
    """Who is connected, and the tasks the engine hands out (as a test can read them)."""

    def __init__(self, connected: list[str]) -> None:
        self._connected = connected
        self.cv = threading.Condition()
        self.pending: dict[str, cpb.Task] = {}
        self.stops = 0
        self.digests: dict[str, int] = {}  # what each hospital declared at Join

    def wait_for_connected(self, minimum: int, timeout_s: float,
                           stop: threading.Event) -> list[str]:
        return list(self._connected)

    def connected(self) -> list[str]:
        return list(self._connected)

    def digest_of(self, client_id: str) -> int:
        return self.digests.get(client_id, 0)  # 0: declared no digest but SHA-256

    def assign(self, client_id: str, task: cpb.Task) -> None:
        with self.cv:
            self.pending[client_id] = task
            self.cv.notify_all()

    def clear_task(self, client_id: str, task_id: str) -> None:
        with self.cv:
            if client_id in self.pending and self.pending[client_id].task_id == task_id:
                del self.pending[client_id]

    def broadcast(self, factory: Callable[[str], cpb.Task]) -> None:
        self.stops += 1

    def wait_task(self, client_id: str, kind: int, round_no: int) -> cpb.Task:
        deadline = time.monotonic() + TIMEOUT_S
        with self.cv:
            while True:
                task = self.pending.get(client_id)
                if task is not None and task.kind == kind and task.round == round_no:
                    return task
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no task for {client_id} in round {round_no}"
                self.cv.wait(remaining)


@dataclass
class FakeStore:
    """What the engine records, in memory."""

    completed: dict[int, tuple[RoundSummary, dict[str, torch.Tensor]]] = field(
        default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    job_state: str = "running"

    def last_completed_round(self, job_id: str) -> int:
        return max(self.completed, default=0)

    def record_event(self, kind: str, payload: dict[str, Any], job_id: str = "") -> None:
        self.events.append((kind, payload))

    def record_failed_round(self, job_id: str, round_no: int, summary: RoundSummary,
                            reason: str) -> None:
        self.failed[round_no] = reason

    def complete_round(self, job_id: str, round_no: int, summary: RoundSummary,
                       model_state: dict[str, torch.Tensor], strategy_state: Any,
                       model_sha256: str | None = None, pending: Any = None) -> None:
        assert pending is None, "the engine's models here are below the write-ahead size"
        assert round_no not in self.completed, "a round recorded twice"
        self.completed[round_no] = (summary, {k: v.clone() for k, v in model_state.items()})

    def set_job_state(self, job_id: str, state: str) -> None:
        self.job_state = state

    def rounds(self, job_id: str) -> list[Any]:
        """The recorded rounds, as the final-model delivery reads them."""
        return [SimpleNamespace(round=n, state="completed", metrics=summary.metrics)
                for n, (summary, _) in sorted(self.completed.items())]


GLOBAL = {"w": torch.zeros(4), "b": torch.zeros(1)}


def make_engine(clients: list[str], strategy: str = "fedavg", **cfg_values: Any
                ) -> tuple[RoundEngine, FakeRegistry, FakeStore]:
    values: dict[str, Any] = {"rounds": 1, "min_clients": 1, "quorum": 1.0,
                              "round_deadline_s": 5.0, "fed_eval": False,
                              "max_round_attempts": 1, **cfg_values}
    cfg = ServerConfig(**values)
    registry, store = FakeRegistry(clients), FakeStore()
    engine = RoundEngine(cfg, store, registry, make_strategy(strategy), task=None,  # type: ignore[arg-type]
                         job_id="job-t", train_config=cpb.TrainConfig())
    engine.set_model(0, GLOBAL)
    return engine, registry, store


def make_stored_engine(store: Store, clients: list[str], **cfg_values: Any
                       ) -> tuple[RoundEngine, FakeRegistry]:
    """An engine over a real Store (job "job-t", FedAvg, from w = 1, b = 1)."""
    values: dict[str, Any] = {"min_clients": 1, "quorum": 1.0, "round_deadline_s": 5.0,
                              "fed_eval": False, "max_round_attempts": 1, **cfg_values}
    store.create_job("job-t", "sized", "fedavg", {}, total_rounds=values["rounds"])
    registry = FakeRegistry(clients)
    engine = RoundEngine(ServerConfig(**values), store, registry,  # type: ignore[arg-type]
                         make_strategy("fedavg"), task=None, job_id="job-t",
                         train_config=cpb.TrainConfig())
    engine.set_model(0, {"w": torch.ones(4), "b": torch.ones(1)})
    return engine, registry


def run_in_thread(engine: RoundEngine) -> threading.Thread:
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    return thread


def send(engine: RoundEngine, registry: FakeRegistry, client: str, round_no: int,
         value: float, examples: int, loss: float) -> None:
    task = registry.wait_task(client, cpb.TRAIN, round_no)
    delta = {"w": torch.full((4,), value), "b": torch.full((1,), value)}
    engine.accept_update(client, task.task_id, task.job_id, task.round, delta, examples,
                         {"train_loss": loss, "epsilon_total": value})


def test_a_round_averages_by_examples_and_records_once() -> None:
    engine, registry, store = make_engine(["a", "b", "c"], rounds=2)
    thread = run_in_thread(engine)
    for round_no in (1, 2):
        send(engine, registry, "a", round_no, 1.0, 10, 0.5)
        send(engine, registry, "b", round_no, 4.0, 30, 0.1)
        send(engine, registry, "c", round_no, 0.0, 60, 0.9)
    thread.join(TIMEOUT_S)
    assert engine.job_state == "completed" and store.job_state == "completed"
    assert sorted(store.completed) == [1, 2] and not store.failed
    summary, model = store.completed[1]
    # FedAvg: 0.1 x 1 + 0.3 x 4 + 0.6 x 0 = 1.3 added to the zero model
    assert torch.allclose(model["w"], torch.full((4,), 1.3))
    assert torch.allclose(store.completed[2][1]["w"], torch.full((4,), 2.6))
    assert summary.metrics["train_loss"] == pytest.approx(0.1 * 0.5 + 0.3 * 0.1 + 0.6 * 0.9)
    assert summary.metrics["epsilon_max"] == 4.0  # the largest, never averaged
    assert (summary.selected, summary.reported, summary.failed) == (3, 3, 0)
    assert summary.metrics["wait_seconds"] >= 0 and summary.seconds >= 0
    assert registry.stops == 1  # the hospitals are told the job ended


def test_the_step_bound_measures_each_models_norm_once(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """The round's step is bounded relative to the old model's norm. The pass that
    measures a new model's step measures its norm too and keeps it with the version,
    so only the model the job started from is measured on its own."""
    asked: list[tuple[int, bool]] = []  # (model version, measured by a pass of its own)
    real = ModelVersion.measured_norm

    def spied(self: Any) -> float:
        asked.append((self.version, self.norm is None))
        return real(self)

    monkeypatch.setattr(ModelVersion, "measured_norm", spied)
    engine, registry, store = make_engine(["a"], rounds=3)
    thread = run_in_thread(engine)
    for round_no in (1, 2, 3):
        send(engine, registry, "a", round_no, float(round_no), 10, 0.5)
    thread.join(TIMEOUT_S)
    assert engine.job_state == "completed" and sorted(store.completed) == [1, 2, 3]
    assert asked == [(0, True), (1, False), (2, False)]  # only the model started from
    final = store.completed[3][1]
    expected = float(torch.cat([t.double().reshape(-1) for t in final.values()]).norm())
    assert engine.current_model().norm == pytest.approx(expected, rel=1e-6)  # 6 x sqrt(5)


def test_a_large_models_checkpoint_is_written_ahead_and_an_unusable_ones_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From PARALLEL_HASH_MIN_BYTES the new model's checkpoint is written while the
    model is hashed and checked (store.PendingCheckpoint): a usable model's round is
    recorded with a checkpoint that verifies; an unusable model's attempt (its step
    above the bound) records nothing and leaves no file behind."""
    monkeypatch.setattr("fl_server.rounds.PARALLEL_HASH_MIN_BYTES", 0)  # every model
    started: list[int] = []
    real_write_ahead = Store.write_ahead

    def spied(self: Store, job_id: str, round_no: int, *args: Any) -> Any:
        started.append(round_no)
        return real_write_ahead(self, job_id, round_no, *args)

    monkeypatch.setattr(Store, "write_ahead", spied)
    store = Store(tmp_path / "state")
    try:
        engine, registry = make_stored_engine(store, ["a", "b"], rounds=2,
                                              max_round_attempts=2, update_norm_factor=10.0)
        thread = run_in_thread(engine)
        send(engine, registry, "a", 1, 0.5, 10, 0.5)
        send(engine, registry, "b", 1, 0.5, 10, 0.5)
        # round 2, attempt 1: the two updates agree with each other, but the step moves
        # the model by far more than 10 x its norm; the larger one (b's) is left out
        send(engine, registry, "a", 2, 1e6, 10, 0.5)
        send(engine, registry, "b", 2, 2e6, 10, 0.5)
        # attempt 2 runs without b
        send(engine, registry, "a", 2, 0.5, 10, 0.5)
        thread.join(TIMEOUT_S)
        assert engine.job_state == "completed"
        assert started == [1, 2, 2]  # both attempts of round 2 were written ahead
        assert [r.round for r in store.rounds("job-t")] == [1, 2]
        for round_no, value in ((1, 1.5), (2, 2.0)):
            model, _ = store.load_checkpoint("job-t", round_no)  # verifies its hash
            assert torch.equal(model["w"], torch.full((4,), value)), (round_no, model)
        job_dir = store.checkpoint_path("job-t", 1).parent
        assert not list(job_dir.glob(".*.tmp"))  # the refused attempt's file is gone
        assert engine.current_model().sha256 == store.rounds("job-t")[-1].model_sha256
    finally:
        store.close()


def test_a_round_writes_its_sums_into_the_memory_of_the_model_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large model is served from its checkpoint once recorded; the in-memory model
    it replaced, once nothing holds it, is given to FedAvg, and the next round's sums
    are written into that memory instead of a fresh model's worth of pages. The
    recorded models are unchanged by it."""
    monkeypatch.setattr("fl_server.rounds.MAPPED_MODEL_MIN_BYTES", 0)  # every model
    reused: list[bool] = []
    real_spare_for = FedAvg._spare_for

    def spied(self: FedAvg, name: str, like: torch.Tensor) -> torch.Tensor | None:
        spare = real_spare_for(self, name, like)
        reused.append(spare is not None)
        return spare

    monkeypatch.setattr(FedAvg, "_spare_for", spied)
    store = Store(tmp_path / "state")
    try:
        engine, registry = make_stored_engine(store, ["a"], rounds=3)
        thread = run_in_thread(engine)
        for round_no in (1, 2, 3):
            send(engine, registry, "a", round_no, 0.5, 10, 0.5)
        thread.join(TIMEOUT_S)
        assert engine.job_state == "completed"
        # round 1's sums are fresh (the model before it is the initial one, not sums);
        # rounds 2 and 3 write into the memory of the model the round before made
        assert reused == [False, False, True, True, True, True], reused
        for round_no in (1, 2, 3):
            model, _ = store.load_checkpoint("job-t", round_no)  # verifies its hash
            assert torch.equal(model["w"], torch.full((4,), 1 + 0.5 * round_no))
        assert engine.current_model().pages is not None  # served from the checkpoint
        assert torch.equal(engine.current_model().state["w"], torch.full((4,), 2.5))
    finally:
        store.close()


def test_each_hospital_is_sent_the_models_manifest_in_its_own_digest() -> None:
    """A hospital that declared BLAKE3 gets the model's BLAKE3 manifest, one from before
    its SHA-256 manifest: the same model, each digest its algorithm's own; the SHA-256
    one is made once per model version."""
    engine, registry, _ = make_engine(["fast", "old"])
    registry.digests["fast"] = tpb.BLAKE3
    thread = run_in_thread(engine)
    fast = registry.wait_task("fast", cpb.TRAIN, 1)
    old = registry.wait_task("old", cpb.TRAIN, 1)
    chunk = fast.model_manifest.chunk_size
    assert fast.model_manifest == build_manifest(GLOBAL, chunk, digest=tpb.BLAKE3)
    assert old.model_manifest == build_manifest(GLOBAL, chunk, digest=tpb.SHA256)
    model = engine.current_model()
    assert model.manifest_for(tpb.SHA256) is model.manifest_for(tpb.SHA256)
    send(engine, registry, "fast", 1, 1.0, 10, 0.5)
    send(engine, registry, "old", 1, 1.0, 10, 0.5)
    thread.join(TIMEOUT_S)
    assert engine.job_state == "completed"


@pytest.mark.parametrize("tensor_bytes", [16, PARALLEL_HASH_MIN_BYTES // 2])
def test_a_new_model_has_its_record_hash_and_manifest_of_its_own_bytes(
        tensor_bytes: int) -> None:
    """Small models are hashed on the engine's thread; from PARALLEL_HASH_MIN_BYTES the
    record's SHA-256 is taken on a thread beside the manifest's digests. Either way
    each is the hash of the model set, not of another version's."""
    engine, _, _ = make_engine(["a"])
    gen = torch.Generator().manual_seed(tensor_bytes)
    state = {"w": torch.randn(tensor_bytes // 4, generator=gen),
             "b": torch.randn(tensor_bytes // 4, generator=gen)}
    engine.set_model(3, state)
    model = engine.current_model()
    assert model.version == 3 and model.sha256 == state_sha256(state)
    assert model.manifest == build_manifest(state, model.manifest.chunk_size,
                                            digest=FAST_DIGEST)
    assert model.sha256 != state_sha256(GLOBAL)


def test_a_carried_models_plaintext_is_cut_once_per_version() -> None:
    """Every selected hospital is sent the same plaintext (sealed under its own key):
    the chunks are the model's bytes in manifest order, cut once for the version and
    shared by its manifests in either digest; a new version cuts its own."""
    engine, _, _ = make_engine(["a"])
    state = {"w": torch.arange(70_000, dtype=torch.float32),
             "b": torch.arange(3, dtype=torch.float32)}
    engine.set_model(3, state)
    model = engine.current_model()
    chunks = model.plain_chunks(model.manifest)
    assert len(chunks) == model.manifest.chunk_count
    expected = b"".join(state[s.name].numpy().tobytes() for s in model.manifest.tensors)
    assert b"".join(bytes(c) for c in chunks) == expected
    assert model.plain_chunks(model.manifest_for(tpb.SHA256)) is chunks
    engine.set_model(4, {k: v + 1 for k, v in state.items()})
    newer = engine.current_model().plain_chunks(engine.current_model().manifest)
    assert newer is not chunks and bytes(newer[0]) != bytes(chunks[0])


def test_robust_strategies_average_metrics_with_equal_weights() -> None:
    engine, registry, store = make_engine(["a", "b", "c"], strategy="median")
    thread = run_in_thread(engine)
    for client, value, examples, loss in (("a", 1.0, 1, 0.3), ("b", 2.0, 1000, 0.6),
                                          ("c", 9.0, 1, 0.9)):
        send(engine, registry, client, 1, value, examples, loss)
    thread.join(TIMEOUT_S)
    summary, model = store.completed[1]
    assert torch.allclose(model["w"], torch.full((4,), 2.0))  # the median
    assert summary.metrics["train_loss"] == pytest.approx(0.6)  # not weighted by 1000


def test_refusals_name_their_reason_and_change_nothing() -> None:
    engine, registry, store = make_engine(["a", "b"], round_deadline_s=10.0)
    thread = run_in_thread(engine)
    task = registry.wait_task("a", cpb.TRAIN, 1)
    delta = {"w": torch.ones(4), "b": torch.ones(1)}
    with pytest.raises(RoundRefusal) as err:
        engine.accept_update("intruder", task.task_id, task.job_id, 1, delta, 5, {})
    assert (err.value.code, err.value.reason) == ("PERMISSION_DENIED", "NOT_SELECTED")
    with pytest.raises(RoundRefusal) as err:
        engine.accept_update("a", "not-the-task", task.job_id, 1, delta, 5, {})
    assert err.value.reason == "WRONG_TASK"
    with pytest.raises(RoundRefusal) as err:
        engine.accept_update("a", task.task_id, task.job_id, 7, delta, 5, {})
    assert err.value.reason == "WRONG_ROUND"
    engine.accept_update("a", task.task_id, task.job_id, 1, delta, 5, {})
    with pytest.raises(RoundRefusal) as err:
        engine.accept_update("a", task.task_id, task.job_id, 1, delta, 5, {})
    assert (err.value.code, err.value.reason) == ("ALREADY_EXISTS", "DUPLICATE_UPDATE")
    send(engine, registry, "b", 1, 1.0, 5, 0.2)
    thread.join(TIMEOUT_S)
    summary, model = store.completed[1]
    assert summary.reported == 2 and torch.allclose(model["w"], torch.ones(4))


def test_no_quorum_is_retried_then_fails_the_job_cleanly() -> None:
    engine, registry, store = make_engine(["a", "b"], round_deadline_s=0.3,
                                          max_round_attempts=2)
    thread = run_in_thread(engine)
    for attempt in (1, 2):
        task = registry.wait_task("a", cpb.TRAIN, 1)
        assert task.task_id  # a fresh task each attempt; "b" never answers
        engine.accept_update("a", task.task_id, task.job_id, 1,
                             {"w": torch.ones(4), "b": torch.ones(1)}, 5, {})
        deadline = time.monotonic() + TIMEOUT_S
        while (sum(kind == "round_attempt_failed" for kind, _ in store.events) < attempt
               and time.monotonic() < deadline):
            time.sleep(0.02)
    thread.join(TIMEOUT_S)
    failures = [p for kind, p in store.events if kind == "round_attempt_failed"]
    assert [p["attempt"] for p in failures] == [1, 2]
    assert "quorum not reached: 1 of 2 updates, need 2" in failures[0]["reason"]
    assert failures[0]["failures"] == {"b": "no update before the round deadline"}
    assert engine.job_state == "failed" and 1 in store.failed and not store.completed
    assert engine.current_model().state["w"].eq(0).all()  # the model is unchanged


def test_a_report_of_refusal_is_recorded_with_its_reason() -> None:
    engine, registry, store = make_engine(["a", "b"], quorum=0.5)
    thread = run_in_thread(engine)
    task = registry.wait_task("b", cpb.TRAIN, 1)
    engine.report("b", cpb.ReportRequest(task_id=task.task_id, job_id=task.job_id, round=1,
                                         kind=cpb.TRAIN, status=cpb.REFUSED,
                                         reason="budget exceeded"))
    send(engine, registry, "a", 1, 2.0, 5, 0.2)
    thread.join(TIMEOUT_S)
    summary, model = store.completed[1]
    assert summary.metrics["failures"] == {"b": "REFUSED: budget exceeded"}
    assert torch.allclose(model["w"], torch.full((4,), 2.0))  # only a's update


def test_a_small_models_rounds_trim_the_heaps_with_the_periodic_full_collection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Below TRIM_HEAP_MIN_MODEL_BYTES a round does not trim the heaps every time (the
    trim would cost more than it gives back), but with the full collection, at most
    every GC_FULL_INTERVAL_S: otherwise the free holes the small rounds leave in the
    threads' heaps stayed resident for as long as the job ran."""
    import fl_core.gc_policy as policy
    import fl_server.rounds as rounds
    from fl_core.allocator import release_free_heap
    from fl_core.constants import GC_FULL_INTERVAL_S

    trims: list[int] = []

    def counted() -> bool:
        trims.append(engine.round)
        return release_free_heap()

    monkeypatch.setattr(rounds, "release_free_heap", counted)
    # the interval has passed: the first round's collection is a full one
    monkeypatch.setitem(policy._full, "at", time.monotonic() - GC_FULL_INTERVAL_S)
    engine, registry, store = make_engine(["a"], rounds=3)
    thread = run_in_thread(engine)
    for round_no in (1, 2, 3):
        send(engine, registry, "a", round_no, 1.0, 10, 0.5)
    thread.join(TIMEOUT_S)
    assert sorted(store.completed) == [1, 2, 3]
    assert len(trims) == 1  # with round 1's full collection; rounds 2-3 within the interval
