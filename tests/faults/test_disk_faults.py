"""The disk fails the server at checkpoint time: full, or read-only.

The checkpoints folder is its own small tmpfs (disk full) or a read-only bind mount
of itself (read-only: tests run as root, and root ignores file modes but not a
read-only mount). The database and upload spools stay on the normal disk, so it is
the checkpoint write of round 2 that fails. Expected: a clear error naming the
cause, no round recorded without its checkpoint, the previous checkpoint intact,
the job left resumable (not marked failed, so a restart is not a new job), and,
once the operator has freed space, the same job continues from round 2."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_demo.launcher import Federation
from tests.hostile.kit import (
    ScriptedClient,
    checkpoint_sha,
    chunked_uploads,
    read_jobs,
    read_rounds,
    scripted_clients,
    site_identity,
    wait_for,
)

pytestmark = pytest.mark.slow

FLAGS = ["--rounds", "3", "--min_clients", "1", "--no_fed_eval", "--seed", "4",
         "--round_deadline_s", "30", "--wait_for_clients_s", "120"]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def mounted(kind: str, path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "tmpfs":
            _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path))
        else:
            _mount("--bind", str(path), str(path))
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"cannot mount here ({detail.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True,
                       timeout=30)


def fill(folder: Path) -> Path:
    """Fill the filesystem under `folder` to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 8, 1 << 4, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_checkpoint_write_fails(fed: Federation, fault: str) -> None:
    state = fed.workdir / "server_state"
    checkpoints = state / "checkpoints"
    with mounted("tmpfs" if fault == "disk_full" else "bind", checkpoints):
        port = fed.start_server(FLAGS)
        hold = threading.Event()
        client = ScriptedClient(lambda: fed.port, site_identity(fed.workdir, "hospital_1"),
                                "hospital_1", 0,
                                before_submit=lambda r: r == 2 and hold.wait(120) and None)
        with scripted_clients([client]):
            wait_for(lambda: len(read_rounds(state)) == 1, 60, "round 1")
            (job_id, _), = read_jobs(state)
            round1 = read_rounds(state, job_id)[0]
            # round 2's update is held back while the disk fails
            if fault == "disk_full":
                filler = fill(checkpoints)
            else:
                _mount("-o", "remount,bind,ro", str(checkpoints))
            hold.set()
            wait_for(lambda: "cannot write checkpoint" in (fed.log_dir / "server.log")
                     .read_text(), 60, "the checkpoint failure")
            log = (fed.log_dir / "server.log").read_text()
            cause = "(disk full)" if fault == "disk_full" else "(read-only or not writable)"
            assert cause in log
            status = fed.status()
            assert status.job_state == "failed" and status.phase == "failed"
            # nothing recorded without its checkpoint; round 1's checkpoint intact
            assert [r.round for r in read_rounds(state, job_id)] == [1]
            assert checkpoint_sha(state, job_id, 1) == round1.model_sha256
            assert not [p for p in checkpoints.rglob("*.tmp")], "a temp file was left"
            # the job stays resumable: not marked failed in the database
            assert read_jobs(state) == [(job_id, "running")]
            assert fed.server is not None and fed.server.poll() is None
            fed.kill_server()  # the operator restarts it (a hard stop is the worst case)
            # the operator frees space (or makes the disk writable) and restarts
            if fault == "disk_full":
                filler.unlink()
            else:
                _mount("-o", "remount,bind,rw", str(checkpoints))
            fed.start_server([*FLAGS, "--exit_when_done",
                             "--final_model_grace_s", "2"], port=port)
            assert fed.wait_server(timeout_s=120) == 0, fed.tail("server.log")
            rounds = read_rounds(state, job_id)
            assert [r.round for r in rounds] == [1, 2, 3]
            assert read_jobs(state) == [(job_id, "completed")]  # the same job, finished
            assert rounds[0].model_sha256 == round1.model_sha256
            assert checkpoint_sha(state, job_id, 3) == rounds[2].model_sha256


@contextlib.contextmanager
def spool_full_when_uploading(fed: Federation) -> Iterator[tuple[ScriptedClient, Path]]:
    """A one-round server whose spool folder is a 1 MiB tmpfs, and one scripted
    hospital held just before its upload until that tmpfs is full; yields the client
    (its upload now under way) and the file that fills the disk."""
    spool = fed.workdir / "server_state" / "spool"
    with mounted("tmpfs", spool):
        fed.start_server(["--rounds", "1", *FLAGS[2:], "--exit_when_done",
                          "--final_model_grace_s", "2"])
        holding, hold = threading.Event(), threading.Event()

        def before_submit(round_no: int) -> None:
            holding.set()
            hold.wait(120)

        client = ScriptedClient(lambda: fed.port, site_identity(fed.workdir, "hospital_1"),
                                "hospital_1", 0, before_submit=before_submit)
        with scripted_clients([client]):
            assert holding.wait(60)
            filler = fill(spool)
            hold.set()
            try:
                yield client, filler
            finally:
                filler.unlink(missing_ok=True)


def assert_completed_once(fed: Federation, client: ScriptedClient) -> None:
    (job_id, job_state), = read_jobs(fed.workdir / "server_state")
    (row,) = read_rounds(fed.workdir / "server_state", job_id)
    assert job_state == "completed" and row.accepted == {"hospital_1"}
    assert len(client.receipts) == 1


def test_disk_full_while_receiving_an_upload(fed: Federation,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload spool's disk fills up mid-round: the upload is refused as the
    server's storage problem (RESOURCE_EXHAUSTED, dropped so it cannot resume into a
    half-hashed state), the server keeps serving, and once space is freed the client's
    retry goes through and the round completes with its update applied exactly once."""
    chunked_uploads(monkeypatch, 64)  # a one-chunk upload would not touch the disk
    with spool_full_when_uploading(fed) as (client, filler):
        wait_for(lambda: any("RESOURCE_EXHAUSTED" in e for e in client.errors), 60,
                 "the refused upload")
        assert any("disk full" in e for e in client.errors), client.errors
        assert "upload_spool_failed" in (fed.log_dir / "server.log").read_text()
        status = fed.status()
        assert status.job_state == "running" and not status.rounds
        filler.unlink()  # the operator frees space; the client's next try succeeds
        assert fed.wait_server(timeout_s=120) == 0, fed.tail("server.log")
    assert_completed_once(fed, client)


def test_a_small_one_chunk_upload_is_received_in_memory(fed: Federation) -> None:
    """A small model's update is one chunk: the server receives it into memory, not a
    spool file (issue 16 item 2), so with the spool's disk full it is still taken, and
    the round completes with it applied exactly once."""
    with spool_full_when_uploading(fed) as (client, _):
        assert fed.wait_server(timeout_s=120) == 0, fed.tail("server.log")
    assert client.errors == [], client.errors
    assert "upload_spool_failed" not in (fed.log_dir / "server.log").read_text()
    assert_completed_once(fed, client)
