"""A hospital that dies or loses its network in the middle of an upload.

SIGKILL mid-upload: the round closes on quorum at its deadline and the half-received
(poisoned) update has no effect at all: the new model is exactly the mean of the two
complete updates. A connection cut mid-upload (a TCP proxy the test controls drops
it): the client asks the server how far it got and resumes from there; the bytes it
sent are accounted for chunk by chunk, and the update is applied exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from fl_client.connection import ServerConnection
from fl_core.stream_ids import upload_stream_id
from fl_core.tensor_codec import FAST_DIGEST, build_manifest
from fl_core.tls import channel_credentials, channel_options
from fl_demo.launcher import Federation
from fl_proto import aggregator_pb2 as apb
from fl_proto import aggregator_pb2_grpc as apb_grpc
from fl_proto import coordinator_pb2 as cpb
from tests.faults.proxy import CutProxy
from tests.hostile.kit import (
    ScriptedClient,
    checkpoint_state,
    chunked_uploads,
    deterministic_delta,
    env_with_repo,
    read_jobs,
    read_rounds,
    scripted_clients,
    site_identity,
    wait_for,
)

pytestmark = pytest.mark.slow

FLAGS = ["--no_fed_eval", "--seed", "3", "--wait_for_clients_s", "120"]


def expected_model(state_dir: Path, job_id: str, deltas: list[dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
    """Round 0's model plus the mean of the deltas (equal example counts), computed as
    FedAvg computes it: float32 sum, divide, add to the global tensor."""
    start = checkpoint_state(state_dir, job_id, 0)
    out = {}
    for name, g in start.items():
        total = torch.zeros_like(g)
        for d in deltas:
            total.add_(d[name], alpha=64.0)
        out[name] = total.div_(64.0 * len(deltas)).add_(g)
    return out


def test_client_sigkilled_mid_upload_has_no_effect(fed: Federation) -> None:
    port = fed.start_server([*FLAGS, "--rounds", "1", "--min_clients", "3", "--quorum", "0.6",
                             "--round_deadline_s", "6", "--exit_when_done",
                             "--final_model_grace_s", "2"])
    state_dir = fed.workdir / "server_state"
    marker = fed.workdir / "mid-upload"
    dying = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.slow_uploader", str(port), str(fed.workdir),
         "hospital_3", str(marker)],
        stdout=subprocess.DEVNULL, stderr=open(fed.log_dir / "dying.log", "wb"),  # noqa: SIM115
        env=env_with_repo(), cwd=str(Path(__file__).resolve().parents[2]))
    honest = [ScriptedClient(lambda: port, site_identity(fed.workdir, f"hospital_{i + 1}"),
                             f"hospital_{i + 1}", i) for i in range(2)]
    try:
        with scripted_clients(honest):
            sent, total = map(int, wait_for(lambda: marker.exists() and marker.read_text(),
                                            90, "the upload to be half sent").split())
            assert 0 < sent < total
            # the server holds a partial upload for it right now
            spools = wait_for(lambda: list((state_dir / "spool").glob("*hospital_3*.spool")),
                              10, "the partial upload's spool file")
            assert spools
            dying.send_signal(signal.SIGKILL)
            assert dying.wait(timeout=10) == -signal.SIGKILL
            assert fed.wait_server(timeout_s=60) == 0, fed.tail("server.log")
    finally:
        if dying.poll() is None:
            dying.kill()
            dying.wait(timeout=10)
    job_id, job_state = read_jobs(state_dir)[0]
    assert job_state == "completed"
    (row,) = read_rounds(state_dir, job_id)
    assert row.state == "completed" and row.accepted == {"hospital_1", "hospital_2"}
    assert "deadline" in row.failures["hospital_3"]
    manifest = build_manifest(checkpoint_state(state_dir, job_id, 0))
    want = expected_model(state_dir, job_id, [deterministic_delta(manifest, 1, i)
                                              for i in range(2)])
    got = checkpoint_state(state_dir, job_id, 1)
    assert all(torch.equal(got[n], want[n]) for n in want), "the model is not exactly" \
        " the mean of the two complete updates"
    assert not list((state_dir / "spool").glob("*.spool")), "the partial upload was kept"


class CountingConnection(ServerConnection):
    """The real client connection; records where each resumed upload restarted and
    how many bytes had been sent when it asked."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.positions: list[tuple[int, int]] = []  # (bytes_sent so far, resume chunk)

    def _upload_position(self, stream_id: str) -> int:
        position = super()._upload_position(stream_id)
        self.positions.append((self.bytes_sent, position))
        return position


def test_connection_cut_mid_upload_resumes_from_the_last_acknowledged_chunk(
        fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk_size = 8  # tiny chunks: even the 62-parameter breast_cancer model is 31 of them
    chunked_uploads(monkeypatch, chunk_size)
    port = fed.start_server([*FLAGS, "--rounds", "1", "--min_clients", "1",
                             "--round_deadline_s", "60", "--exit_when_done",
                             "--final_model_grace_s", "2"])
    proxy = CutProxy(port)
    ident = site_identity(fed.workdir, "hospital_1")
    conn = CountingConnection(f"127.0.0.1:{proxy.port}", ident.ca, ident.cert, ident.key,
                              "hospital_1", "breast_cancer", 64)
    cut_at = 12
    try:
        conn.connect()
        conn.join()
        stream = conn.tasks()
        task = next(t for t in stream if t.kind == cpb.TRAIN)
        conn.fetch_model(task, task.model_manifest)
        state = deterministic_delta(task.model_manifest, task.round, 0)

        assert conn.session is not None
        digest = conn.session.upload_digest
        stream_id = upload_stream_id(task.job_id, task.round, task.task_id,
                                     conn.session.session_id)
        direct = grpc.secure_channel(f"127.0.0.1:{port}",
                                     channel_credentials(ident.ca, ident.cert, ident.key),
                                     options=channel_options())

        def server_has(chunks: int) -> bool:
            """The server's own count of the chunks it took (UploadStatus, asked on a
            channel that bypasses the proxy)."""
            try:
                reply = apb_grpc.AggregatorStub(direct).UploadStatus(
                    apb.UploadStatusRequest(stream_id=stream_id), metadata=conn.metadata(),
                    timeout=5)
            except grpc.RpcError:
                return False  # the upload is not open yet
            return int(reply.next_sequence) >= chunks

        def progress(done: int, total: int) -> None:
            if done == cut_at and proxy.cuts == 0:
                # cut only once the server holds every chunk sent so far
                wait_for(lambda: server_has(cut_at), 20, f"the server to hold {cut_at} chunks")
                proxy.cut()

        try:
            receipt = conn.submit_update(task, state, 64, {"loss": 0.5}, on_progress=progress)
        finally:
            direct.close()
        stream.cancel()
    finally:
        conn.close()
        proxy.close()
    # hashed with what the server declared it checks (BLAKE3 for this build)
    assert digest == FAST_DIGEST
    manifest = build_manifest(state, chunk_size=chunk_size, digest=digest)
    count = manifest.chunk_count
    assert count >= 30 and proxy.cuts == 1 and conn.resumes == 1
    assert receipt.chunks_received == count and receipt.sha256 == manifest.sha256
    (first_attempt_bytes, resumed_at), = conn.positions
    # from the chunks the server held at the cut (not from zero, none skipped)
    assert cut_at <= resumed_at <= cut_at + 1 < count, resumed_at
    cipher = [min(chunk_size, manifest.total_bytes - i * chunk_size) + 16 for i in range(count)]
    # every byte accounted for: attempt one, then exactly chunks resumed_at.. again
    assert conn.bytes_sent == first_attempt_bytes + sum(cipher[resumed_at:])
    assert sum(cipher[resumed_at:]) < sum(cipher)
    assert fed.wait_server(timeout_s=60) == 0, fed.tail("server.log")
    state_dir = fed.workdir / "server_state"
    job_id, _ = read_jobs(state_dir)[0]
    (row,) = read_rounds(state_dir, job_id)
    assert row.accepted == {"hospital_1"}
    want = expected_model(state_dir, job_id, [state])
    got = checkpoint_state(state_dir, job_id, 1)
    assert all(torch.equal(got[n], want[n]) for n in want)
