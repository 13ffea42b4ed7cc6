"""One hospital's link to the server: the mTLS channel, the session (JWT and key
agreement) and the two sealed transfers, each resumable after a cut.

Kept apart from the daemon loop so tests and benchmarks can drive a real client
connection without the training around it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fl_core.allocator import fix_thresholds
from fl_core.constants import (
    CLIENT_MMAP_THRESHOLD_BYTES,
    CLIENT_TRIM_THRESHOLD_BYTES,
    GCM_TAG_BYTES,
    RPC_TIMEOUT_S,
)
from fl_core.sealing import (
    SealError,
    StreamContext,
    StreamOpener,
    StreamSealer,
    generate_keypair,
    manifest_digest,
    serialize_stream_message,
    session_secret,
    stream_key,
    stream_message_parser,
)
from fl_core.stream_ids import download_stream_id, upload_stream_id
from fl_core.tensor_codec import (
    EXTRA_DIGESTS,
    CodecError,
    StreamAssembler,
    TrailingDigests,
    build_manifest,
    check_manifest,
    iter_chunks,
    preferred_digest,
)
from fl_core.tls import channel_credentials, channel_options, target
from fl_proto import aggregator_pb2 as apb
from fl_proto import aggregator_pb2_grpc as apb_grpc
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from fl_proto import tensors_pb2 as tpb

log = logging.getLogger("fl_client.connection")

# Statuses after which the same call may succeed on a fresh connection.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.UNKNOWN})
TOKEN_REFRESH_MARGIN_S = 60
TRANSFER_ATTEMPTS = 5

ProgressFn = Callable[[int, int], None]


class TransferError(Exception):
    """A transfer the client gave up on, with the server's reason."""



def backoff_delays(base_s: float, max_s: float,
                   rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with full jitter: 0..base*2^k, capped; endless generator."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield rng.uniform(0, min(max_s, base_s * (2 ** attempt)))
        attempt = min(attempt + 1, 30)


@dataclass
class SessionInfo:
    session_id: str
    token: str
    expires: float
    secret: bytes
    job_id: str
    client_id: str
    # what this session's uploads are hashed with: the fast digest when the server
    # declared it checks it, else SHA-256 (tensors.proto Digest)
    upload_digest: int = 0


def keep_transfer_buffers() -> bool:
    """Fixes glibc's thresholds for a process that moves models (CLIENT_MMAP_THRESHOLD_BYTES,
    CLIENT_TRIM_THRESHOLD_BYTES); True where both took effect (False without glibc).

    Every transfer allocates and frees the same message-sized buffers: gRPC's read
    slices, each 1 MiB message, each sealed chunk. With glibc's dynamic thresholds a
    freed run of them at the top of a thread's heap was handed back to the system and
    the next ones were faulted in and zeroed again, page by page. The daemon's heaps now
    keep up to CLIENT_TRIM_THRESHOLD_BYTES free for reuse; a model's tensors (from
    CLIENT_MMAP_THRESHOLD_BYTES) still get mappings of their own, given back when freed.
    Process-wide, and the same every time, so each connection may call it."""
    return fix_thresholds(CLIENT_MMAP_THRESHOLD_BYTES, CLIENT_TRIM_THRESHOLD_BYTES)


class ServerConnection:
    def __init__(self, server_target: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes,
                 client_id: str, model_type: str, num_examples: int,
                 server_name: str | None = None, replace_session: bool = False,
                 epsilon_budget: float = 0.0) -> None:
        self.target = server_target
        self.client_id = client_id
        self.model_type = model_type
        self.num_examples = num_examples
        keep_transfer_buffers()
        self._creds = channel_credentials(ca_pem, cert_pem, key_pem)
        self._options = channel_options(server_name)
        self._lock = threading.Lock()
        self.channel: grpc.Channel | None = None
        self.session: SessionInfo | None = None
        # Named at every re-join (token renewal, reconnect) so the server can tell this
        # process from a second daemon started with the same identity.
        self.last_session_id = ""
        self.replace_session = replace_session
        self.epsilon_budget = epsilon_budget
        # every study this daemon serves (model type -> examples; issue 15) and, from the
        # last Join, the model types of the server's running and queued jobs
        self.studies: dict[str, int] = {model_type: num_examples}
        self.job_model_types: list[str] = []
        # the digest algorithms declared at Join besides SHA-256: the server then hashes
        # this hospital's models with the fastest (an empty tuple: as a client from
        # before the choice, SHA-256 only)
        self.digests: tuple[tpb.Digest, ...] = EXTRA_DIGESTS
        self.bytes_sent = 0
        self.bytes_received = 0
        self.resumes = 0
        # a one-chunk update goes in one unary call (SubmitSmallUpdate) until a server
        # without it answers UNIMPLEMENTED; then this connection streams them
        self.small_updates = True

    # connection and session ---------------------------------------------------------
    def connect(self) -> None:
        self.close()
        self.channel = grpc.secure_channel(self.target, self._creds, options=self._options)
        self.coordinator = cpb_grpc.CoordinatorStub(self.channel)
        self.aggregator = AggregatorStub(self.channel)
        self.session = None
        self.small_updates = True  # this channel's server may be another version

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def join(self) -> SessionInfo:
        private, public = generate_keypair()
        reply = self.coordinator.Join(
            cpb.JoinRequest(x25519_public_key=public, model_type=self.model_type,
                            num_examples=self.num_examples, client_version="fl.v1",
                            previous_session_id=self.last_session_id,
                            replace_session=self.replace_session,
                            epsilon_budget=self.epsilon_budget,
                            studies=[cpb.ServedStudy(model_type=k, num_examples=v)
                                     for k, v in self.studies.items()],
                            digests=self.digests),
            timeout=RPC_TIMEOUT_S)
        self.job_model_types = list(reply.job_model_types)
        self.replace_session = False  # displace the other daemon once, not at every renewal
        self.last_session_id = reply.session_id
        if reply.client_id != self.client_id:
            raise TransferError(f"server says this certificate belongs to {reply.client_id!r},"
                                f" not {self.client_id!r}")
        secret = session_secret(private, bytes(reply.server_x25519_public_key),
                                reply.session_id)
        self.session = SessionInfo(reply.session_id, reply.token,
                                   float(reply.token_expires_unix), secret, reply.job_id,
                                   reply.client_id, preferred_digest(reply.digests))
        log.info("joined job=%s session=%s", reply.job_id, reply.session_id[:8])
        return self.session

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Bearer token for the next call, re-joining first if it is about to expire."""
        if self.session is None or self.session.expires - time.time() < TOKEN_REFRESH_MARGIN_S:
            self.join()
        assert self.session is not None
        return (("authorization", f"Bearer {self.session.token}"),)

    def tasks(self) -> Any:
        """The server-streamed task feed (iterate it; `.cancel()` ends it)."""
        metadata = self.metadata()  # first: it may re-join, and the session must be the token's
        assert self.session is not None
        return self.coordinator.Tasks(
            cpb.TaskStreamRequest(session_id=self.session.session_id), metadata=metadata)

    def report(self, request: cpb.ReportRequest) -> None:
        self.coordinator.Report(request, metadata=self.metadata(), timeout=RPC_TIMEOUT_S)

    # download ---------------------------------------------------------------------
    def fetch_model(self, task: cpb.Task, expected: Mapping[str, torch.Tensor] | tpb.TensorManifest,
                    on_progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
        """The task's global model, verified against `expected` before any chunk is
        accepted and against every hash at the end; resumes a cut stream."""
        check_manifest(task.model_manifest, expected)
        carried = self._carried_model(task, expected, on_progress)
        if carried is not None:
            return carried
        assembler: StreamAssembler | None = None
        opener: StreamOpener | None = None
        session_id = ""
        for attempt in range(TRANSFER_ATTEMPTS):
            metadata = self.metadata()
            assert self.session is not None
            if assembler is not None and session_id != self.session.session_id:
                assembler, opener = None, None  # a new session means new keys: start over
            start = assembler.next_sequence if assembler is not None else 0
            try:
                stream = self.aggregator.FetchModel(
                    apb.FetchModelRequest(job_id=task.job_id, round=task.round,
                                          task_id=task.task_id, resume_from=start),
                    metadata=metadata, timeout=max(RPC_TIMEOUT_S, _deadline_left(task)))
                for msg in stream:
                    if msg.HasField("header"):
                        header = msg.header
                        if header.stream_id != download_stream_id(
                                task.job_id, task.round, task.task_id, self.session.session_id):
                            raise TransferError(f"unexpected download stream {header.stream_id}")
                        if header.manifest.SerializeToString(deterministic=True) != \
                                task.model_manifest.SerializeToString(deterministic=True):
                            raise TransferError("the model streamed is not the one the task"
                                                " announced")
                        if assembler is None:
                            assembler, opener = self._download(task, header.stream_id,
                                                               expected)
                            session_id = self.session.session_id
                        continue
                    if assembler is None or opener is None:
                        raise TransferError("the model stream did not start with its header")
                    received = assembler.bytes_received
                    assembler.add_sealed(opener, msg.chunk)  # opened straight into place
                    self.bytes_received += assembler.bytes_received - received + GCM_TAG_BYTES
                    if on_progress:
                        on_progress(assembler.next_sequence, header.manifest.chunk_count)
                if assembler is None or opener is None:
                    raise TransferError("the model stream was empty")
                opener.finish()
                return assembler.finish()
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.session = None
                elif code not in RETRYABLE or attempt == TRANSFER_ATTEMPTS - 1:
                    raise TransferError(f"download refused: {code.name}:"
                                        f" {exc.details()}") from exc
                self.resumes += 1
                log.warning("download interrupted (%s) at chunk %d; resuming", code.name,
                            assembler.next_sequence if assembler else 0)
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
        raise TransferError("download failed after retries")

    def _download(self, task: cpb.Task, stream_id: str,
                  expected: Mapping[str, torch.Tensor] | tpb.TensorManifest
                  ) -> tuple[StreamAssembler, StreamOpener]:
        """The assembler and opener of the task's download stream (`stream_id`, this
        session's keys), FetchModel's or the one the task carries."""
        assert self.session is not None
        assembler = StreamAssembler(task.model_manifest, expected=expected)
        ctx = StreamContext(task.job_id, task.round, self.client_id, "down", stream_id,
                            manifest_digest(task.model_manifest))
        return assembler, StreamOpener(stream_key(self.session.secret, ctx), ctx)

    def _carried_model(self, task: cpb.Task,
                       expected: Mapping[str, torch.Tensor] | tpb.TensorManifest,
                       on_progress: ProgressFn | None) -> dict[str, torch.Tensor] | None:
        """The small model the task carries (fl_server/model_stream.py), opened and
        verified exactly as FetchModel's stream would be; None when there is none or it
        cannot be used here (sealed for another session, a chunk that does not open,
        a hash that does not match): the caller then fetches the model."""
        if not task.model_chunks or self.session is None:
            return None
        stream_id = download_stream_id(task.job_id, task.round, task.task_id,
                                       self.session.session_id)
        if task.model_stream_id != stream_id:
            return None
        try:
            assembler, opener = self._download(task, stream_id, expected)
            for chunk in task.model_chunks:
                assembler.add_sealed(opener, chunk)
            opener.finish()
            model = assembler.finish()
        except (CodecError, SealError) as exc:
            log.warning("the model carried by task %s is unusable (%s); fetching it",
                        task.task_id, exc)
            return None
        self.bytes_received += task.model_manifest.total_bytes \
            + len(task.model_chunks) * GCM_TAG_BYTES
        if on_progress:
            on_progress(task.model_manifest.chunk_count, task.model_manifest.chunk_count)
        return model

    # upload -----------------------------------------------------------------------
    def submit_update(self, task: cpb.Task, state: Mapping[str, torch.Tensor],
                      num_examples: int, metrics: Mapping[str, float],
                      on_progress: ProgressFn | None = None,
                      stop: threading.Event | None = None) -> apb.UpdateReceipt:
        """Stream the update sealed; on a cut connection ask the server how far it got
        and continue from there, not from zero. An update of one chunk (a small
        model's) goes whole in one unary call instead (SubmitSmallUpdate), where the
        server has it: a failed one is sent again whole.

        The digests trail the data (issue 16): the first chunk leaves at once while
        the model is hashed on other threads, and the final chunk carries the digests.
        """
        manifest: tpb.TensorManifest | None = None
        digests: TrailingDigests | None = None
        resume_from = 0
        session_id = ""
        attempt = 0
        while attempt < TRANSFER_ATTEMPTS:
            metadata = self.metadata()
            assert self.session is not None
            if session_id and session_id != self.session.session_id:
                resume_from = 0  # new session, new keys, new stream
            session_id = self.session.session_id
            if manifest is None or manifest.digest != self.session.upload_digest:
                # hashed with what this session's server checks (a re-join may have
                # reached a server of another version)
                manifest = build_manifest(state, digests=False,
                                          digest=self.session.upload_digest)
                digests = TrailingDigests(state, manifest.digest,
                                          overlap=manifest.chunk_count > 1)
            assert digests is not None
            count = manifest.chunk_count
            stream_id = upload_stream_id(task.job_id, task.round, task.task_id, session_id)
            ctx = StreamContext(task.job_id, task.round, self.client_id, "up", stream_id,
                                manifest_digest(manifest))
            sealer = StreamSealer(stream_key(self.session.secret, ctx), ctx)
            header = apb.UpdateStreamHeader(
                job_id=task.job_id, round=task.round, task_id=task.task_id,
                stream_id=stream_id, manifest=manifest, num_examples=num_examples,
                resume_from=resume_from, metrics=dict(metrics))
            messages = self._update_messages(header, state, manifest, sealer, digests, stop,
                                             on_progress)
            timeout = max(RPC_TIMEOUT_S, _deadline_left(task))
            small = self.small_updates and count == 1 and resume_from == 0
            try:
                receipt: apb.UpdateReceipt
                if small:
                    receipt = self.aggregator.SubmitSmallUpdate(
                        _small_update(header, messages, stop), metadata=metadata,
                        timeout=timeout)
                else:
                    receipt = self.aggregator.SubmitUpdate(messages, metadata=metadata,
                                                           timeout=timeout)
                return receipt
            except grpc.RpcError as exc:
                code = exc.code()
                if stop is not None and stop.is_set():
                    raise TransferError("upload abandoned: the client is stopping") from exc
                if small and code == grpc.StatusCode.UNIMPLEMENTED:
                    self.small_updates = False
                    log.info("the server predates SubmitSmallUpdate: streaming this"
                             " connection's updates instead")
                    continue  # the same attempt, streamed
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.session = None
                    resume_from = 0
                elif code not in RETRYABLE or attempt == TRANSFER_ATTEMPTS - 1:
                    raise TransferError(f"upload refused: {code.name}:"
                                        f" {exc.details()}") from exc
                else:
                    resume_from = self._upload_position(stream_id)
                self.resumes += 1
                log.warning("upload interrupted (%s); resuming at chunk %d of %d", code.name,
                            resume_from, count)
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
                attempt += 1
        raise TransferError("upload failed after retries")

    def _update_messages(self, header: apb.UpdateStreamHeader,
                         state: Mapping[str, torch.Tensor], manifest: tpb.TensorManifest,
                         sealer: StreamSealer, digests: TrailingDigests,
                         stop: threading.Event | None,
                         on_progress: ProgressFn | None
                         ) -> Iterator[apb.UpdateStreamMessage | bytes]:
        """Header, then the sealed chunks from `header.resume_from` on, sealed lazily so
        only about one chunk of ciphertext exists at a time; the final one carries
        the digests (waited for only then)."""
        yield apb.UpdateStreamMessage(header=header)
        wire = isinstance(self.aggregator, AggregatorStub)  # else a stub that wants messages
        count = manifest.chunk_count
        first = int(header.resume_from)
        for seq, plain in enumerate(iter_chunks(state, manifest, start=first), start=first):
            if stop is not None and stop.is_set():
                return
            final = seq == count - 1
            trailer = digests.trailer() if final else b""
            if wire:  # serialised here, the ciphertext copied once
                yield sealer.seal_message(seq, plain, final, trailer)
            else:
                msg = apb.UpdateStreamMessage()
                # sealed in place: a chunk put into a message afterwards is copied whole
                sealer.seal_into(msg.chunk, seq, plain, final, trailer)
                yield msg
            self.bytes_sent += len(plain) + GCM_TAG_BYTES
            if on_progress:
                on_progress(seq + 1, count)

    def _upload_position(self, stream_id: str) -> int:
        for _ in range(3):
            try:
                reply = self.aggregator.UploadStatus(
                    apb.UploadStatusRequest(stream_id=stream_id), metadata=self.metadata(),
                    timeout=RPC_TIMEOUT_S)
                return int(reply.next_sequence)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return 0
                time.sleep(0.5)
        return 0


def _small_update(header: apb.UpdateStreamHeader,
                  messages: Iterator[apb.UpdateStreamMessage | bytes],
                  stop: threading.Event | None) -> apb.SmallUpdate | bytes:
    """A one-chunk upload's two stream messages as one SmallUpdate: serialised, the
    header message's bytes then the chunk message's (aggregator.proto)."""
    sent = list(messages)
    if len(sent) != 2:  # the generator stopped before the chunk
        raise TransferError("upload abandoned: the client is stopping")
    chunk = sent[1]
    if isinstance(chunk, bytes):
        return apb.UpdateStreamMessage(header=header).SerializeToString() + chunk
    return apb.SmallUpdate(header=header, chunk=chunk.chunk)


class AggregatorStub:
    """`apb_grpc.AggregatorStub` with the transfer streams' chunks framed directly
    (`fl_core.sealing`'s wire functions; issue 16 item 1): a downloaded chunk's
    ciphertext is a view of the message gRPC received, an uploaded chunk is
    serialised once by `StreamSealer.seal_message`. The same bytes on the wire;
    headers and anything unusual still go through protobuf."""

    def __init__(self, channel: grpc.Channel) -> None:
        plain = apb_grpc.AggregatorStub(channel)
        self.UploadStatus = plain.UploadStatus
        self.FetchModel = channel.unary_stream(
            "/fl.v1.Aggregator/FetchModel",
            request_serializer=apb.FetchModelRequest.SerializeToString,
            response_deserializer=stream_message_parser(apb.ModelStreamMessage))
        self.SubmitUpdate = channel.stream_unary(
            "/fl.v1.Aggregator/SubmitUpdate",
            request_serializer=serialize_stream_message,
            response_deserializer=apb.UpdateReceipt.FromString)
        self.SubmitSmallUpdate = channel.unary_unary(
            "/fl.v1.Aggregator/SubmitSmallUpdate",
            request_serializer=serialize_stream_message,
            response_deserializer=apb.UpdateReceipt.FromString)


def _deadline_left(task: cpb.Task) -> float:
    if not task.deadline_unix_ms:
        return RPC_TIMEOUT_S
    return max(5.0, task.deadline_unix_ms / 1000 - time.time() + 5.0)


def server_target(host: str, port: int) -> str:
    return target(host, port)
