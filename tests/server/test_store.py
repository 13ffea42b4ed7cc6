"""Durable server state: exactly-once rounds, verified checkpoints, restart, corruption."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import gc
import json
import os
import sqlite3
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fl_server.store as store_mod
from fl_server.checkpoint_file import write_tensors_file
from fl_server.store import (
    CheckpointError,
    DecodedMetrics,
    Report,
    RoundAlreadyRecorded,
    RoundSummary,
    Store,
    StoreError,
    held_size,
    state_sha256,
)

SUMMARY = RoundSummary(selected=3, reported=3, failed=0, seconds=1.5, metrics={"loss": 0.5})


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Deliberately not in sorted order: the order is part of the model.
    return {
        "fc.weight": torch.randn(4, 3, generator=g),
        "bn.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "emb.half": torch.randn(2, 2, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "scalar64": torch.tensor(1.25 + seed, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


def strategy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"m/fc.weight": torch.full((4, 3), float(seed)), "v/fc.weight": torch.ones(4, 3)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def new_job(store: Store, job_id: str = "job1") -> None:
    store.create_job(job_id, "pneumonia", "fedadam", {"eta": 0.01, "rounds": 3}, total_rounds=10)


# ------------------------------------------------------------------------------ hashing
def test_state_sha256_is_independent_hashlib_over_name_dtype_shape_bytes() -> None:
    import hashlib
    import json

    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor(3)}
    h = hashlib.sha256()
    cases: list[tuple[str, np.ndarray, str]] = [
        ("a", np.arange(6, dtype=np.float32).reshape(2, 3), "float32"),
        ("b", np.array(3, dtype=np.int64), "int64"),
    ]
    for name, arr, dtype in cases:
        header = json.dumps([name, dtype, list(arr.shape), arr.size], separators=(",", ":"))
        h.update(header.encode() + b"\n" + arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    assert state_sha256(state) == h.hexdigest()
    swapped = {"b": state["b"], "a": state["a"]}
    assert state_sha256(swapped) != state_sha256(state)
    reshaped = {"a": state["a"].reshape(3, 2), "b": state["b"]}
    assert state_sha256(reshaped) != state_sha256(state)
    recast = {"a": state["a"].view(torch.int32), "b": state["b"]}
    assert state_sha256(recast) != state_sha256(state)


# ------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_keeps_dtypes_order_and_values(store: Store) -> None:
    new_job(store)
    initial = model_state(0)
    store.save_initial_model("job1", initial)
    record = store.complete_round("job1", 1, SUMMARY, model_state(1), strategy_state(1))
    assert record.model_sha256 == state_sha256(model_state(1))
    assert record.state == "completed" and record.metrics == {"loss": 0.5}
    model, strat = store.load_checkpoint("job1", 1)
    assert_same(model, model_state(1))
    assert_same(strat, strategy_state(1))
    model0, strat0 = store.load_checkpoint("job1", 0)
    assert_same(model0, initial)
    assert strat0 == {}
    with pytest.raises(RoundAlreadyRecorded, match="initial model"):
        store.save_initial_model("job1", initial)


def test_tied_and_non_contiguous_tensors_are_saved(store: Store) -> None:
    new_job(store)
    base = torch.randn(3, 4)
    state = {"a": base, "tied": base, "t": base.t(), "view": base[1]}
    store.complete_round("job1", 1, SUMMARY, state, {})
    model, _ = store.load_checkpoint("job1", 1)
    assert_same(model, {k: v.contiguous() for k, v in state.items()})


def test_rounds_are_recorded_exactly_once(store: Store) -> None:
    new_job(store)
    assert store.last_model_sha256("job1") == ""
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    path = store.checkpoint_path("job1", 1)
    before = path.read_bytes()
    with pytest.raises(RoundAlreadyRecorded, match="round 1 is already recorded"):
        store.complete_round("job1", 1, SUMMARY, model_state(9), {})
    assert path.read_bytes() == before, "a refused duplicate must not touch the checkpoint"
    failed = store.record_failed_round("job1", 2, SUMMARY, reason="no quorum")
    assert failed.state == "failed" and failed.metrics["reason"] == "no quorum"
    with pytest.raises(RoundAlreadyRecorded):
        store.record_failed_round("job1", 2, SUMMARY, reason="again")
    with pytest.raises(RoundAlreadyRecorded):
        store.complete_round("job1", 2, SUMMARY, model_state(2), {})
    with pytest.raises(StoreError, match="numbered from 1"):
        store.complete_round("job1", 0, SUMMARY, model_state(2), {})
    # A round interrupted by a crash was never recorded; its number may be skipped.
    store.complete_round("job1", 4, SUMMARY, model_state(4), {})
    with pytest.raises(StoreError, match="round 3 is older than the last recorded round 4"):
        store.complete_round("job1", 3, SUMMARY, model_state(3), {})
    assert [(r.round, r.state) for r in store.rounds("job1")] == [
        (1, "completed"),
        (2, "failed"),
        (4, "completed"),
    ]
    assert store.last_completed_round("job1") == 4
    assert store.last_model_sha256("job1") == state_sha256(model_state(4))
    store.record_failed_round("job1", 5, SUMMARY, reason="no quorum")
    assert store.last_model_sha256("job1") == state_sha256(model_state(4)), \
        "a failed round after it has no model: the last model stays round 4's"
    with pytest.raises(CheckpointError, match="no completed round 2"):
        store.load_checkpoint("job1", 2)
    with pytest.raises(StoreError, match="unknown job 'nope'"):
        store.complete_round("nope", 1, SUMMARY, model_state(1), {})


def test_concurrent_duplicate_round_is_recorded_once(store: Store) -> None:
    new_job(store)
    outcomes: list[str] = []

    def attempt(seed: int) -> None:
        try:
            store.complete_round("job1", 1, SUMMARY, model_state(seed), {})
            outcomes.append("ok")
        except RoundAlreadyRecorded:
            outcomes.append("dup")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["dup", "dup", "dup", "ok"]
    store.load_checkpoint("job1", 1)  # the recorded round's file is the one written


def test_restart_sees_the_same_job_and_round(tmp_path: Path) -> None:
    with Store(tmp_path) as first:
        new_job(first)
        first.save_initial_model("job1", model_state(0))
        first.complete_round("job1", 1, SUMMARY, model_state(1), strategy_state(1))
        first.complete_round("job1", 2, SUMMARY, model_state(2), strategy_state(2))
        first.record_failed_round("job1", 3, SUMMARY, reason="deadline")
    with Store(tmp_path) as second:
        job = second.latest_job()
        assert job is not None
        assert (job.job_id, job.model_type, job.strategy, job.total_rounds, job.state) == (
            "job1",
            "pneumonia",
            "fedadam",
            10,
            "running",
        )
        assert job.config == {"eta": 0.01, "rounds": 3}
        assert second.last_completed_round("job1") == 2
        assert second.last_round("job1") == 3
        model, strat = second.load_checkpoint("job1", 2)
        assert_same(model, model_state(2))
        assert_same(strat, strategy_state(2))
        second.complete_round("job1", 4, SUMMARY, model_state(4), {})


def test_jobs(store: Store) -> None:
    assert store.latest_job() is None
    new_job(store, "a")
    new_job(store, "b")
    latest = store.latest_job()
    assert latest is not None and latest.job_id == "b"
    assert store.get_job("missing") is None
    store.set_job_state("a", "completed")
    job_a = store.get_job("a")
    assert job_a is not None and job_a.state == "completed"
    with pytest.raises(StoreError, match="already exists"):
        new_job(store, "a")
    with pytest.raises(StoreError, match="not one of"):
        store.set_job_state("a", "exploded")
    with pytest.raises(StoreError, match="unknown job"):
        store.set_job_state("zzz", "failed")
    for bad in ("../escape", "", "a/b", "x\n"):
        with pytest.raises(StoreError, match="job id"):
            store.create_job(bad, "m", "fedavg", {}, 1)
    assert store.last_completed_round("a") == 0


def test_jobs_by_state_keep_the_queue_order(store: Store) -> None:
    states = {"j1": "completed", "j2": "queued", "j3": "running", "j4": "queued",
              "j5": "failed", "j6": "queued"}
    for job_id in ("j1", "j2", "j3", "j4", "j5", "j6"):
        new_job(store, job_id)
    for job_id, state in states.items():
        store.set_job_state(job_id, state)
    assert [j.job_id for j in store.jobs()] == ["j1", "j2", "j3", "j4", "j5", "j6"]
    assert [j.job_id for j in store.jobs(("queued",))] == ["j2", "j4", "j6"]
    assert [(j.job_id, j.state) for j in store.jobs(("failed", "running"))] == [
        ("j3", "running"), ("j5", "failed")]
    assert store.jobs(()) == [] and store.jobs(("cancelled",)) == []
    queued = store.jobs(("queued",))[0]
    assert queued.config == {"eta": 0.01, "rounds": 3} and queued.model_type == "pneumonia"


# ------------------------------------------------------------------------ corruption
def test_corrupt_checkpoint_is_an_error_naming_the_file(store: Store) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), strategy_state(1))
    path = store.checkpoint_path("job1", 1)
    original = path.read_bytes()

    flipped = bytearray(original)
    flipped[-3] ^= 0xFF  # inside the tensor data: parses, hash differs
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"{path.name}.*sha256"):
        store.load_checkpoint("job1", 1)

    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name}.*cannot be read"):
        store.load_checkpoint("job1", 1)

    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path.name}.*missing"):
        store.load_checkpoint("job1", 1)


def test_checkpoint_of_another_round_is_refused(store: Store) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    store.complete_round("job1", 2, SUMMARY, model_state(2), {})
    p1, p2 = store.checkpoint_path("job1", 1), store.checkpoint_path("job1", 2)
    p2.write_bytes(p1.read_bytes())
    with pytest.raises(CheckpointError, match="belongs to job 'job1' round 1"):
        store.load_checkpoint("job1", 2)


def make_db(tmp_path: Path) -> Path:
    with Store(tmp_path) as s:
        new_job(s)
        for i in range(30):
            s.record_event("noise", {"i": i, "pad": "x" * 1500}, job_id="job1")
    return tmp_path / "server.db"


def test_corrupt_database_header_is_an_error_naming_the_file(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    data = bytearray(db.read_bytes())
    data[:16] = b"not a database!!"
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{db}.*(corrupt|not a SQLite database)"):
        Store(tmp_path)


def test_corrupt_database_pages_are_detected_at_open(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    for offset in range(2 * page, len(data), page):  # every b-tree page but the first
        data[offset : offset + 64] = os.urandom(64)
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(db)):
        Store(tmp_path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "server.db")
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="no schema_version"):
        Store(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "server.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path)


def test_a_round_finds_the_checkpointed_rounds_by_index_in_old_databases_too(
        tmp_path: Path) -> None:
    """Each recorded round looks up the rounds that still name a checkpoint; without an
    index that scanned every round of the job, so a round's cost grew with the job. A
    database made before the index gets it when opened."""
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "server.db")
    conn.execute("DROP INDEX rounds_with_checkpoint")  # as a database from before it
    conn.commit()
    conn.close()
    queries = (
        ("SELECT round FROM rounds WHERE job_id=? AND checkpoint IS NOT NULL "
         "ORDER BY round DESC LIMIT -1 OFFSET ?", ("job1", 5)),
        ("SELECT checkpoint FROM rounds WHERE job_id=? AND checkpoint IS NOT NULL", ("job1",)),
    )
    with Store(tmp_path) as store:
        plans = [store._conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
                 for sql, args in queries]
    for plan in plans:
        assert any("rounds_with_checkpoint" in row[-1] for row in plan), plan


# ---------------------------------------------------------------------------- pruning
def test_only_the_last_k_checkpoints_and_round_zero_are_kept(tmp_path: Path) -> None:
    with Store(tmp_path, keep_checkpoints=3) as store:
        new_job(store)
        store.save_initial_model("job1", model_state(0))
        for r in range(1, 8):
            if r == 5:
                store.record_failed_round("job1", r, SUMMARY, reason="x")
            else:
                store.complete_round("job1", r, SUMMARY, model_state(r), {})
        job_dir = tmp_path / "checkpoints" / "job1"
        files = sorted(p.name for p in job_dir.iterdir())
        expected = ["round_000000.safetensors"] + [f"round_{r:06d}.safetensors" for r in (4, 6, 7)]
        assert files == expected
        with pytest.raises(CheckpointError, match="round 2 was pruned"):
            store.load_checkpoint("job1", 2)
        assert_same(store.load_checkpoint("job1", 4)[0], model_state(4))
        assert_same(store.load_checkpoint("job1", 0)[0], model_state(0))


def test_orphaned_and_temp_files_are_swept(tmp_path: Path) -> None:
    with Store(tmp_path, keep_checkpoints=2) as store:
        new_job(store)
        store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    job_dir = tmp_path / "checkpoints" / "job1"
    (job_dir / ".round_000002.safetensors.abc.tmp").write_bytes(b"half")
    (job_dir / "round_000002.safetensors").write_bytes(b"written, never recorded")
    with Store(tmp_path, keep_checkpoints=2) as store:
        assert not list(job_dir.glob("*.tmp"))
        store.complete_round("job1", 3, SUMMARY, model_state(3), {})
        names = sorted(p.name for p in job_dir.iterdir())
        assert names == ["round_000001.safetensors", "round_000003.safetensors"]


# ---------------------------------------------------------------------- failed writes
@pytest.mark.parametrize(
    ("code", "hint"), [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only")]
)
def test_failed_checkpoint_write_leaves_previous_intact(
    store: Store, monkeypatch: pytest.MonkeyPatch, code: int, hint: str
) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), strategy_state(1))
    real_save = write_tensors_file

    def failing_save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any) -> None:
        real_save(tensors, filename, metadata=metadata)  # a partial file exists, then:
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(store_mod, "write_tensors_file", failing_save)
    with pytest.raises(StoreError, match=rf"round_000002.*{hint}.*not recorded"):
        store.complete_round("job1", 2, SUMMARY, model_state(2), {})
    monkeypatch.undo()
    assert store.last_completed_round("job1") == 1
    assert [r.round for r in store.rounds("job1")] == [1]
    assert sorted(p.name for p in store.checkpoint_path("job1", 1).parent.iterdir()) == [
        "round_000001.safetensors"
    ]
    assert_same(store.load_checkpoint("job1", 1)[0], model_state(1))
    store.complete_round("job1", 2, SUMMARY, model_state(2), {})  # retry once space is back


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x00000010


def _set_immutable(path: Path, on: bool) -> None:
    """chattr +i / -i: an immutable directory refuses new entries (EPERM) even to root."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        flags[0] = flags[0] | FS_IMMUTABLE_FL if on else flags[0] & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[str]:
    """The directory made unwritable: by its mode for an ordinary user, and for root
    (which ignores modes, and is who runs the tests here) by the immutable attribute.
    Yields how."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield "mode 0500"
        finally:
            directory.chmod(0o700)
        return
    try:
        _set_immutable(directory, True)
    except OSError as exc:  # no CAP_LINUX_IMMUTABLE, or a file system without it
        pytest.skip(f"root, and the immutable attribute is not available here: {exc}")
    try:
        yield "immutable"
    finally:
        _set_immutable(directory, False)


def test_read_only_checkpoint_directory(store: Store) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    job_dir = store.checkpoint_path("job1", 1).parent
    before = sorted(p.name for p in job_dir.iterdir())
    with unwritable(job_dir), pytest.raises(StoreError) as info:
        store.complete_round("job1", 2, SUMMARY, model_state(2), {})
    message = str(info.value)
    assert f"cannot write checkpoint {store.checkpoint_path('job1', 2)}" in message, message
    assert "(read-only or not writable)" in message, message
    assert "the round is not recorded and earlier checkpoints are untouched" in message
    assert store.last_completed_round("job1") == 1
    assert sorted(p.name for p in job_dir.iterdir()) == before  # no temporary file left
    assert_same(store.load_checkpoint("job1", 1)[0], model_state(1))
    store.complete_round("job1", 2, SUMMARY, model_state(2), {})  # writable again: recorded


def test_checkpoint_directory_that_is_a_file(store: Store) -> None:
    """Works as root too: the job's checkpoint path cannot be created."""
    new_job(store, "job2")
    (store.checkpoint_dir / "job2").write_bytes(b"in the way")
    with pytest.raises(StoreError, match="cannot write checkpoint"):
        store.complete_round("job2", 1, SUMMARY, model_state(1), {})
    assert store.last_completed_round("job2") == 0


# ------------------------------------------------------- checkpoints written ahead
def test_a_checkpoint_written_ahead_is_the_same_file_once_recorded(tmp_path: Path) -> None:
    """write_ahead starts the file before the model's hash is known; complete_round
    writes the hash in: the file the synchronous write gives, verified by the store's
    own read."""
    files = {}
    for way in ("now", "ahead"):
        store = Store(tmp_path / way)
        try:
            new_job(store)
            state, strategy = model_state(1), strategy_state(1)
            pending = store.write_ahead("job1", 1, state, strategy) if way == "ahead" else None
            record = store.complete_round("job1", 1, SUMMARY, state, strategy, pending=pending)
            assert record.model_sha256 == state_sha256(state)
            model, strat = store.load_checkpoint("job1", 1)
            assert_same(model, state)
            assert_same(strat, strategy)
            path = store.checkpoint_path("job1", 1)
            files[way] = path.read_bytes()
            assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left
        finally:
            store.close()
    def parts(data: bytes) -> tuple[Any, bytes]:
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + size]), data[8 + size:]

    # the same header (safetensors orders its metadata differently from file to file)
    # and the same tensor bytes
    assert parts(files["ahead"]) == parts(files["now"])


def test_a_checkpoint_written_ahead_and_discarded_leaves_nothing(store: Store) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    job_dir = store.checkpoint_path("job1", 1).parent
    before = sorted(p.name for p in job_dir.iterdir())
    pending = store.write_ahead("job1", 2, model_state(2), {})
    pending.discard()
    pending.discard()  # twice: a no-op
    assert sorted(p.name for p in job_dir.iterdir()) == before
    assert store.last_completed_round("job1") == 1
    store.complete_round("job1", 2, SUMMARY, model_state(2), {})  # the round, written now
    assert_same(store.load_checkpoint("job1", 2)[0], model_state(2))


def test_a_checkpoint_written_ahead_of_another_model_is_refused(store: Store) -> None:
    new_job(store)
    state = model_state(1)
    pending = store.write_ahead("job1", 1, state, {})
    with pytest.raises(StoreError, match="written ahead is not job 'job1' round 1's model"):
        store.complete_round("job1", 1, SUMMARY, model_state(1), {}, pending=pending)
    with pytest.raises(StoreError, match="written ahead is not job 'job1' round 2's model"):
        store.complete_round("job1", 2, SUMMARY, state, {}, pending=pending)
    assert store.last_completed_round("job1") == 0
    pending.discard()
    assert not store.checkpoint_path("job1", 1).parent.exists() \
        or not list(store.checkpoint_path("job1", 1).parent.iterdir())
    # views of the same tensors are the same model (the engine's detach().contiguous())
    pending = store.write_ahead("job1", 1, state, {})
    views = {k: v.detach().contiguous() for k, v in state.items()}
    store.complete_round("job1", 1, SUMMARY, views, {}, pending=pending)
    assert_same(store.load_checkpoint("job1", 1)[0], state)


def test_a_checkpoint_written_ahead_that_fails_is_not_recorded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    real_save = write_tensors_file

    def failing_save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any) -> None:
        real_save(tensors, filename, metadata=metadata)  # a partial file exists, then:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(store_mod, "write_tensors_file", failing_save)
    pending = store.write_ahead("job1", 2, model_state(2), {})
    with pytest.raises(StoreError, match=r"round_000002.*\(disk full\).*not recorded"):
        store.complete_round("job1", 2, SUMMARY, pending.model_state, {}, pending=pending)
    pending.discard()
    monkeypatch.undo()
    assert [r.round for r in store.rounds("job1")] == [1]
    assert sorted(p.name for p in store.checkpoint_path("job1", 1).parent.iterdir()) == [
        "round_000001.safetensors"
    ]
    store.complete_round("job1", 2, SUMMARY, model_state(2), {})  # retry once space is back


def test_a_checkpoint_written_ahead_for_a_recorded_round_is_refused(store: Store) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    recorded = store.checkpoint_path("job1", 1).read_bytes()
    state = model_state(5)
    pending = store.write_ahead("job1", 1, state, {})
    with pytest.raises(RoundAlreadyRecorded):
        store.complete_round("job1", 1, SUMMARY, state, {}, pending=pending)
    pending.discard()
    assert store.checkpoint_path("job1", 1).read_bytes() == recorded  # the recorded file
    assert [p.name for p in store.checkpoint_path("job1", 1).parent.iterdir()] == [
        "round_000001.safetensors"
    ]


# ---------------------------------------------------------------- clients and reports
def test_reports_clients_and_events(store: Store) -> None:
    new_job(store)
    store.upsert_client("hospital_1", status="joined")
    report = Report(
        job_id="job1",
        round=1,
        client_id="hospital_1",
        task_id="t-1",
        kind="train",
        status="ok",
        metrics={"loss": 0.25},
        num_examples=120,
        epsilon_round=0.5,
        epsilon_total=1.5,
    )
    assert store.record_report(report) is True
    assert store.record_report(report) is False, "a retried report is stored once"
    refusal = Report("job1", 1, "hospital_2", "t-2", "train", "refused", reason="budget spent")
    assert store.record_report(refusal)
    assert store.reports("job1", 1) == [report, refusal]
    assert store.reports("job1", 2) == []
    clients = {c.client_id: c for c in store.clients()}
    h1 = clients["hospital_1"]
    assert (h1.num_examples, h1.epsilon_total, h1.last_status) == (120, 1.5, "ok")
    assert h1.first_seen <= h1.last_seen
    store.upsert_client("hospital_1", status="left")
    h1b = {c.client_id: c for c in store.clients()}["hospital_1"]
    assert (h1b.num_examples, h1b.epsilon_total, h1b.last_status) == (120, 1.5, "left")
    assert h1b.first_seen == h1.first_seen
    store.record_event("custom", {"why": "test"}, job_id="job1")
    kinds = [e.kind for e in store.events("job1")]
    assert kinds[0] == "job_created" and kinds[-1] == "custom"
    assert store.events("job1")[-1].detail == {"why": "test"}


class FullDiskConnection:
    """Delegates to a real connection but fails round inserts like a full disk would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        if "INTO rounds" in sql:
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_database_write_failure_records_nothing(store: Store) -> None:
    new_job(store)
    store.complete_round("job1", 1, SUMMARY, model_state(1), {})
    real = store._conn
    store._conn = FullDiskConnection(real)  # type: ignore[assignment]
    try:
        with pytest.raises(StoreError, match=r"server.db: database or disk is full"):
            store.complete_round("job1", 2, SUMMARY, model_state(2), {})
    finally:
        store._conn = real
    assert not real.in_transaction
    assert store.last_completed_round("job1") == 1
    assert [e.kind for e in store.events("job1")].count("round_completed") == 1
    store.complete_round("job1", 2, SUMMARY, model_state(2), {})  # the retry succeeds
    assert_same(store.load_checkpoint("job1", 2)[0], model_state(2))


def _round_metrics_text(round_no: int, hospitals: int) -> str:
    return json.dumps({"attempt": 1, "train_loss": 0.25, "wait_seconds": 0.001 * round_no,
                       "failures": {}, "clients": {
                           f"hospital_{k}": {"num_examples": 100 + k, "train_loss": 0.1 * k}
                           for k in range(hospitals)}}, sort_keys=True)


def test_decoded_round_metrics_are_kept_within_a_budget_of_memory() -> None:
    """Status decodes every round's metrics each time it is asked, so they are kept
    decoded; a round's metrics carry a summary per hospital, so what is kept is bounded
    by the memory it holds, not by a count of rounds (thousands of hospitals a round)."""
    texts = [json.dumps({"round": i, "loss": 0.5}) for i in range(8)]
    one = sys.getsizeof(texts[0]) + held_size(json.loads(texts[0]))
    cache = DecodedMetrics(max_bytes=3 * one)
    first = cache.get(texts[0])
    assert first == {"round": 0, "loss": 0.5} and cache.get(texts[0]) is first
    for text in texts[1:]:
        assert cache.get(text) == json.loads(text)
    assert cache.held_bytes <= 3 * one and len(cache) == 3  # the latest fit
    assert all(text in cache._items for text in texts[-3:])
    assert cache.get(texts[0]) is not first  # evicted, decoded again
    huge = json.dumps({"clients": {f"h{i}": {"loss": 0.1} for i in range(20)}})
    assert cache.get(huge) == json.loads(huge)
    assert huge not in cache._items and cache.held_bytes <= 3 * one  # too large to keep


def test_decoded_round_metrics_hold_no_more_memory_than_their_budget() -> None:
    """What the cache holds, measured by the allocator, stays within its budget: decoded,
    a round's metrics take several times their JSON text, which is what a budget of text
    let through (16 MiB of text held ~80-110 MB)."""
    budget = 2 << 20
    texts = [_round_metrics_text(r, 10) for r in range(4000)]  # ~3 MB of text in all
    cache = DecodedMetrics(max_bytes=budget)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for text in texts:
            cache.get(text)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    kept = len(cache)
    assert 0 < kept < len(texts) and cache.held_bytes <= budget
    assert sum(len(t) for t in texts[-kept:]) * 4 < budget  # text alone would keep far more
    # every text here was made before tracing: what is traced is the decoded objects
    # and the cache's table, which held_size's count (with the texts) bounds
    assert held <= budget, f"{held} bytes held for a budget of {budget}"
    assert cache.get(texts[-1]) is cache.get(texts[-1])  # the latest is kept
