"""Kept spool files (fl_server/spool_pool.py): a finished upload's file is overwritten
in place by the next upload of its size, never while a mapping of it is still read,
within the pool's limits; the aggregator keeps only finished uploads' files (issue 16
items 1 and 3)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fl_core import tensor_codec as tc
from fl_server.aggregator import AggregatorService, Upload
from fl_server.spool_pool import SpoolPool

CHUNK = 64


def state(seed: int, n: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(7, generator=g)}


def spooled(path: Path, values: dict[str, torch.Tensor],
            chunks: int | None = None) -> tc.StreamAssembler:
    """An assembler that received `chunks` (all by default) of `values` into `path`."""
    manifest = tc.build_manifest(values, CHUNK)
    assembler = tc.StreamAssembler(manifest, expected=values, spool_path=path)
    for sequence, chunk in enumerate(tc.iter_chunks(values, manifest)):
        if chunks is not None and sequence == chunks:
            break
        assembler.add_chunk(sequence, chunk)
    return assembler


def size_of(values: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in values.values())


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_finished_uploads_file_is_reused_only_once_its_tensors_are_gone(
        tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, min_free_bytes=0)
    one, two, three = state(1), state(2), state(3)
    first = spooled(tmp_path / "a.spool", one)
    tensors = first.finish()
    inode = (tmp_path / "a.spool").stat().st_ino
    pool.give_back(tmp_path / "a.spool", size_of(one), first.spool_mapping())
    assert not (tmp_path / "a.spool").exists()  # renamed at once: the name is free
    assert (pool.held_files, pool.free_files) == (1, 0)

    # still mapped: the next upload gets a new file, and the first one's tensors
    # keep reading their own bytes
    assert not pool.claim(tmp_path / "b.spool", size_of(two))
    got_two = spooled(tmp_path / "b.spool", two).finish()
    assert (tmp_path / "b.spool").stat().st_ino != inode
    assert same(tensors, one) and same(got_two, two)

    del tensors
    gc.collect()
    assert (pool.held_files, pool.free_files) == (0, 1)
    assert pool.claim(tmp_path / "c.spool", size_of(three))
    assert (tmp_path / "c.spool").stat().st_ino == inode and pool.reused == 1
    got_three = spooled(tmp_path / "c.spool", three).finish()
    assert same(got_three, three)  # every byte of the kept file rewritten


def test_only_a_file_of_the_uploads_size_is_taken(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, min_free_bytes=0)
    (tmp_path / "a.spool").write_bytes(bytes(400))
    pool.give_back(tmp_path / "a.spool", 400)
    assert not pool.claim(tmp_path / "b.spool", 800)
    assert not (tmp_path / "b.spool").exists()
    assert pool.claim(tmp_path / "b.spool", 400)
    assert not pool.claim(tmp_path / "c.spool", 400)  # taken once


def test_a_kept_file_of_another_size_is_resized_by_the_assembler(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    path.write_bytes(b"\xff" * 5000)
    values = state(4)
    assert same(spooled(path, values).finish(), values)
    assert path.stat().st_size == size_of(values)


def test_a_stream_resumed_in_a_kept_file_reads_back_only_its_own_chunks(
        tmp_path: Path) -> None:
    old, new = state(5), state(6)
    path = tmp_path / "s.spool"
    spooled(path, old).finish()  # the file holds a whole earlier upload
    partial = spooled(path, new, chunks=3)
    partial.flush()
    partial.close()
    manifest = tc.build_manifest(new, CHUNK)
    resumed = tc.StreamAssembler(manifest, expected=new, spool_path=path, resume_at=3)
    for sequence, chunk in enumerate(tc.iter_chunks(new, manifest)):
        if sequence >= 3:
            resumed.add_chunk(sequence, chunk)
    assert same(resumed.finish(), new)


def test_the_pools_limits_delete_the_oldest_free_files_first(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, max_files=2, max_bytes=1000, min_free_bytes=0)
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.spool").write_bytes(bytes(300))
        pool.give_back(tmp_path / f"{name}.spool", 300)
    kept = sorted(p.name for p in tmp_path.glob("*.spool"))
    assert len(kept) == 2 and pool.free_files == 2
    (tmp_path / "d.spool").write_bytes(bytes(900))
    pool.give_back(tmp_path / "d.spool", 900)  # 900 fits only once both others are gone
    assert [p.stat().st_size for p in tmp_path.glob("*.spool")] == [900]
    (tmp_path / "e.spool").write_bytes(bytes(1200))
    pool.give_back(tmp_path / "e.spool", 1200)  # larger than the whole pool: deleted
    assert not (tmp_path / "e.spool").exists()
    assert [p.stat().st_size for p in tmp_path.glob("*.spool")] == [900]


def test_files_given_back_at_once_stay_within_the_limits(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, max_files=3, min_free_bytes=0)
    paths = [tmp_path / f"{i}.spool" for i in range(16)]
    for path in paths:
        path.write_bytes(bytes(64))
    start = threading.Barrier(len(paths))

    def give(path: Path) -> None:
        start.wait(timeout=10)
        pool.give_back(path, 64)

    threads = [threading.Thread(target=give, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert pool.free_files == 3 and len(list(tmp_path.glob("*.spool"))) == 3


def test_a_file_is_not_kept_when_its_disk_is_nearly_full(tmp_path: Path) -> None:
    """Kept blocks must never be why a checkpoint cannot be written: below the free
    space asked for (here more than any disk has), the file is deleted as before."""
    pool = SpoolPool(tmp_path, min_free_bytes=1 << 62)
    (tmp_path / "a.spool").write_bytes(bytes(100))
    pool.give_back(tmp_path / "a.spool", 100)
    assert not list(tmp_path.glob("*.spool")) and pool.free_files == 0
    assert SpoolPool(tmp_path, min_free_bytes=0)._disk_has_room(100)


def test_a_held_file_counts_against_the_limits_and_is_never_deleted_for_room(
        tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, max_files=1, min_free_bytes=0)
    values = state(7)
    first = spooled(tmp_path / "a.spool", values)
    tensors = first.finish()
    pool.give_back(tmp_path / "a.spool", size_of(values), first.spool_mapping())
    (tmp_path / "b.spool").write_bytes(bytes(size_of(values)))
    pool.give_back(tmp_path / "b.spool", size_of(values))  # no room: deleted
    assert not (tmp_path / "b.spool").exists()
    assert pool.held_files == 1 and same(tensors, values)


def test_clear_deletes_every_kept_file_and_a_mapping_still_reads_its_own(
        tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, min_free_bytes=0)
    values = state(8)
    first = spooled(tmp_path / "a.spool", values)
    tensors = first.finish()
    pool.give_back(tmp_path / "a.spool", size_of(values), first.spool_mapping())
    (tmp_path / "b.spool").write_bytes(bytes(64))
    pool.give_back(tmp_path / "b.spool", 64)
    assert pool.clear() == 2
    assert not list(tmp_path.glob("*.spool"))
    assert same(tensors, values)
    del tensors
    gc.collect()
    assert (pool.held_files, pool.free_files) == (0, 0)  # the late finalizer adds nothing


def test_a_path_given_back_twice_is_kept_once(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, min_free_bytes=0)
    (tmp_path / "a.spool").write_bytes(bytes(10))
    pool.give_back(tmp_path / "a.spool", 10)
    pool.give_back(tmp_path / "a.spool", 10)
    assert pool.free_files == 1 and len(list(tmp_path.glob("*.spool"))) == 1


# --------------------------------------------------------------------------- the aggregator


def service(tmp_path: Path) -> AggregatorService:
    engine: Any = SimpleNamespace(on_round_closed=[])
    return AggregatorService(engine, SimpleNamespace(), tmp_path / "spool")  # type: ignore[arg-type]


def upload(path: Path, assembler: tc.StreamAssembler) -> Upload:
    return Upload("c", "t", SimpleNamespace(), assembler.manifest, assembler,  # type: ignore[arg-type]
                  SimpleNamespace(), path, threading.Lock())  # type: ignore[arg-type]


@pytest.mark.parametrize("finished", [True, False])
def test_the_aggregator_keeps_only_a_finished_uploads_file(tmp_path: Path,
                                                            finished: bool) -> None:
    """An upload cut short or refused mid-stream may still have a write in flight: its
    file is deleted, as before the pool. A finished one's goes to the pool."""
    svc = service(tmp_path)
    values = state(9)
    path = svc.spool_dir / "job-1-1-c-0.spool"
    assembler = spooled(path, values, chunks=None if finished else 2)
    if finished:
        assembler.finish()
    svc._discard(upload(path, assembler))
    gc.collect()
    assert not path.exists()
    assert svc.spools.free_files == (1 if finished else 0)
    assert len(list(svc.spool_dir.glob("*.spool"))) == (1 if finished else 0)


def test_the_aggregator_deletes_kept_files_left_by_an_earlier_process(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "pool-3.spool").write_bytes(bytes(8))
    (spool_dir / "job-2-1-c-5.spool").write_bytes(bytes(8))
    svc = service(tmp_path)
    assert not list(spool_dir.glob("*.spool"))
    assert not svc.spools.claim(spool_dir / "x.spool", 8)

