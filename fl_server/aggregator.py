"""Aggregator service: the global model down, updates up, as sealed chunk streams.

Downloads are sealed on the fly from the one in-memory global model (no copy per
client). Uploads are opened chunk by chunk into a spool file on disk (a small
one-chunk upload into memory, within a budget); only a complete, verified, finite
update reaches the strategy, so a client cut off mid-stream has no effect on the
round and can resume where the server stopped. A small upload whose stream has
arrived whole is handled on the server's event loop (`runs_on_loop`), with no
worker thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import mmap
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import torch

from fl_core.allocator import can_drop_pages, drop_pages, fix_thresholds
from fl_core.constants import (
    GCM_TAG_BYTES,
    SERVER_MMAP_THRESHOLD_BYTES,
    SERVER_TRIM_THRESHOLD_BYTES,
    UPLOAD_BUSY_WAIT_S,
    UPLOAD_MEMORY_BUDGET_BYTES,
    UPLOAD_MEMORY_MAX_BYTES,
)
from fl_core.errors import Refusal, abort
from fl_core.logs import log_event
from fl_core.sealing import (
    SealError,
    StreamContext,
    StreamOpener,
    UnreadableMessage,
    manifest_digest,
    serialize_stream_message,
    small_update_parser,
    stream_key,
    stream_message_parser,
)
from fl_core.stream_ids import upload_stream_id
from fl_core.tensor_codec import (
    CodecError,
    IntegrityError,
    StreamAssembler,
    check_manifest,
    has_non_finite,
    iter_chunks,
)
from fl_proto import aggregator_pb2 as apb
from fl_proto import aggregator_pb2_grpc as apb_grpc
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb
from fl_server import audit
from fl_server.auth import identity_of
from fl_server.clients import ClientRegistry, Session
from fl_server.metrics import OBSERVED, RESUMED, SPOOLS_REUSED
from fl_server.model_stream import download_sealer, model_version_for
from fl_server.rounds import RoundEngine, RoundRefusal, RoundState
from fl_server.spool_pool import SpoolPool
from fl_server.strategies.base import MeasuredUpdate
from fl_server.validation import check_update_header

log = logging.getLogger("fl_server.aggregator")

def abort_refusal(context: grpc.ServicerContext, refusal: RoundRefusal) -> NoReturn:
    abort(context, getattr(grpc.StatusCode, refusal.code), refusal.message, refusal.reason)


@dataclass
class Upload:
    """One update being received; kept across a cut connection so it can resume."""

    client_id: str
    task_id: str
    round_state: RoundState
    manifest: tpb.TensorManifest
    assembler: StreamAssembler
    opener: StreamOpener
    spool_path: Path | None  # None: received into memory (a small one-chunk upload)
    lock: threading.Lock
    context: Any = None
    memory: int = 0  # bytes of the in-memory budget it holds until discarded


class _DeltaView(Mapping[str, torch.Tensor]):
    """Weights minus the global model, computed one tensor at a time on access, so a
    WEIGHTS update never needs a second full model in memory."""

    def __init__(self, weights: Mapping[str, torch.Tensor],
                 global_state: Mapping[str, torch.Tensor]) -> None:
        self._w = weights
        self._g = global_state

    def __getitem__(self, key: str) -> torch.Tensor:
        w = self._w[key]
        if not w.is_floating_point():
            return w
        return w - self._g[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._w)

    def __len__(self) -> int:
        return len(self._w)


_PAGE = mmap.PAGESIZE


def return_freed_tensors_to_the_os() -> bool:
    """Fixes glibc's mmap threshold at SERVER_MMAP_THRESHOLD_BYTES; True where it took
    effect. Otherwise, after the first round every 16 MiB tensor (running sums, the new
    and the old global model) comes from a per-thread heap that keeps it once freed: a
    100 MB x 4 server held 600-700 MB of such anonymous memory at its peak instead of
    giving each round's model back (BENCHMARKS.md section 3, issue 16 item 3). The trim
    threshold goes up with it, so message-sized buffers are reused, not faulted in anew."""
    return fix_thresholds(SERVER_MMAP_THRESHOLD_BYTES, SERVER_TRIM_THRESHOLD_BYTES)


class _SpoolPages:
    """Drops the resident pages of a spooled update's tensors once a pass has read them.

    A finished upload is a private mapping of its spool file, and every pass over it
    (the finiteness check, the norm, the strategy's checks, the fold) would leave the
    whole update resident: one more model in the server's RSS while it folds. The
    pages of a clean private file mapping can be dropped at any time
    (MADV_DONTNEED): a later read maps them again from the page cache, so each pass
    keeps about one tensor resident. Only for a spool mapping nothing writes to: on
    anonymous or written (copy-on-write) pages the same call would discard data."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._ranges: dict[str, tuple[int, int]] = {}
        if not can_drop_pages():
            return
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if size:
                # whole pages around the tensor: its neighbours are spool pages too
                start = t.data_ptr() // _PAGE * _PAGE
                end = -(-(t.data_ptr() + size) // _PAGE) * _PAGE
                self._ranges[name] = (start, end - start)

    def release(self, name: str) -> None:
        span = self._ranges.get(name)
        if span is not None:
            drop_pages(*span)


class AggregatorService(apb_grpc.AggregatorServicer):
    def __init__(self, engine: RoundEngine, registry: ClientRegistry, spool_dir: Path) -> None:
        self.engine = engine
        self.registry = registry
        self.spool_dir = spool_dir
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.spool_dir.glob("*.spool"):  # kept ones too (`SpoolPool`)
            stale.unlink(missing_ok=True)
        self.spools = SpoolPool(self.spool_dir)
        # in every spool's name: a new session's upload for the same task never
        # shares a file with one its old session may still be writing
        self._spool_serial = itertools.count()
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()
        self._memory_held = 0  # bytes of uploads received into memory (_memory_for)
        # Completed uploads are mapped, checked and folded one at a time: a mapped
        # spool is a whole model of resident pages once checked, and uploads that
        # finish together would otherwise each hold one while queueing for the fold.
        self._fold_gate = threading.Lock()
        # FetchModel yields serialised chunk messages (registered by `add_to_server`,
        # whose serializer passes bytes through); protobuf messages otherwise
        self.wire_chunks = False
        engine.on_round_closed.append(self._round_closed)
        return_freed_tensors_to_the_os()  # process-wide: the service is the server's

    # helpers -------------------------------------------------------------------
    def _session(self, context: grpc.ServicerContext) -> tuple[str, Session]:
        ident = identity_of(context)
        session = self.registry.session(ident.client_id, ident.session_id)
        if session is None:
            abort(context, grpc.StatusCode.UNAUTHENTICATED,
                  "session unknown to this server (it may have restarted): join again")
        self.registry.touch(ident.client_id)
        return ident.client_id, session

    def _round_closed(self, rs: RoundState) -> None:
        """Cancel uploads still streaming into a closed round and drop their spools."""
        with self._lock:
            stale = [sid for sid, up in self._uploads.items() if up.round_state is rs]
            uploads = [self._uploads.pop(sid) for sid in stale]
        for up in uploads:
            if up.context is not None:
                up.context.cancel()
            self._discard(up)

    # FetchModel ------------------------------------------------------------------
    def FetchModel(self, request: apb.FetchModelRequest, context: grpc.ServicerContext
                   ) -> Iterator[apb.ModelStreamMessage | bytes]:
        client_id, session = self._session(context)
        # a completed job's final model, offered in the STOP task (fl_server/final_model.py):
        # served from the delivery desk, since the next job's engine may already run
        final = self.engine.final.offer_of(client_id, request.task_id)
        try:
            if final is not None:
                task, model = final
                job_id, round_no, wanted_version = task.job_id, task.round, task.round
            else:
                rs, task = self.engine.task_of(client_id, request.task_id)
                job_id, round_no = rs.job_id, rs.round
                wanted_version = model_version_for(task, rs.round)
                model = self.engine.current_model()
        except RoundRefusal as refusal:
            abort_refusal(context, refusal)
        if model.version != wanted_version or request.round != round_no \
                or request.job_id != job_id:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"task {task.task_id} needs the model of job {job_id} round {round_no}")
        # the task's manifest: the model's, hashed with this hospital's digest algorithm
        manifest = task.model_manifest
        count = manifest.chunk_count
        if request.resume_from >= count:
            abort(context, grpc.StatusCode.OUT_OF_RANGE,
                  f"resume_from {request.resume_from} is past the last chunk ({count - 1})")
        stream_id, sealer = download_sealer(session.secret, client_id, job_id, round_no,
                                            task.task_id, session.session_id, manifest)
        yield apb.ModelStreamMessage(header=apb.ModelStreamHeader(
            job_id=job_id, round=round_no, stream_id=stream_id, manifest=manifest))
        start = int(request.resume_from)
        for seq, plain in enumerate(iter_chunks(model.state, manifest, start=start),
                                    start=start):
            if self.wire_chunks:  # serialised here, the ciphertext copied once
                yield sealer.seal_message(seq, plain, seq == count - 1)
            else:
                msg = apb.ModelStreamMessage()
                # sealed in place: a chunk put into a message afterwards is copied whole
                sealer.seal_into(msg.chunk, seq, plain, seq == count - 1)
                yield msg
            OBSERVED.download(client_id, task.task_id, seq == count - 1,
                              len(plain) + GCM_TAG_BYTES, resumed=0 < start == seq)
            if model.pages is not None:  # served from the checkpoint file: drop what was sent
                sent = seq * manifest.chunk_size
                model.pages.release_stream(sent, sent + len(plain))
        if final is not None:
            self.engine.final.fetched(client_id)

    # UploadStatus ----------------------------------------------------------------
    def UploadStatus(self, request: apb.UploadStatusRequest,
                     context: grpc.ServicerContext) -> apb.UploadStatusReply:
        client_id, _ = self._session(context)
        with self._lock:
            up = self._uploads.get(request.stream_id)
        if up is None or up.client_id != client_id:
            abort(context, grpc.StatusCode.NOT_FOUND,
                  f"no upload in progress with stream id {request.stream_id!r}")
        return apb.UploadStatusReply(stream_id=request.stream_id,
                                     next_sequence=up.opener.next_sequence, complete=False)

    # SubmitUpdate ----------------------------------------------------------------
    def runs_on_loop(self, messages: Sequence[Any]) -> bool:
        """Whether a SubmitUpdate stream read whole (`messages`) may be handled on the
        event loop (fl_server/serving.py): a fresh upload of one chunk small enough to
        be received into memory, that no other stream is sending. Its handler then
        waits on nothing another call holds: not the upload's lock (the one wait that
        can last, UPLOAD_BUSY_WAIT_S, stays on a worker), nor the fold gate (a memory
        bound that an upload this small does not need), and its work is bounded by one
        small chunk. Anything else, including every malformed stream, goes to a worker,
        where the handler refuses it as before."""
        if len(messages) != 2 or not messages[0].HasField("header") \
                or not messages[1].HasField("chunk"):
            return False
        header = messages[0].header
        manifest = header.manifest
        if header.resume_from != 0 or manifest.chunk_count != 1 \
                or not 0 < manifest.total_bytes <= UPLOAD_MEMORY_MAX_BYTES:
            return False
        with self._lock:
            up = self._uploads.get(header.stream_id)
        return up is None or not up.lock.locked()

    def SubmitUpdate(self, request_iterator: Iterator[apb.UpdateStreamMessage],
                     context: grpc.ServicerContext) -> apb.UpdateReceipt:
        client_id, session = self._session(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "an update stream must start with its header", "BAD_HEADER")
        header = first.header
        up = self._open_upload(client_id, session, header, context)
        on_loop = bool(getattr(context, "on_loop", False))  # see runs_on_loop
        # On the loop the lock was free a moment ago (`runs_on_loop`); a stream that
        # took it since is sending this upload now, so this one is the second sender.
        if not up.lock.acquire(blocking=False) and (
                on_loop or not up.lock.acquire(timeout=UPLOAD_BUSY_WAIT_S)):
            abort(context, grpc.StatusCode.ABORTED,
                  "another stream is already sending this upload", "BUSY")
        try:
            up.context = context
            return self._receive(up, header, request_iterator, context, on_loop)
        finally:
            up.context = None
            up.lock.release()

    def SubmitSmallUpdate(self, request: Sequence[apb.UpdateStreamMessage],
                          context: grpc.ServicerContext) -> apb.UpdateReceipt:
        """SubmitUpdate's stream of one chunk in one unary call (`request`: the header's
        message and the chunk's, from `small_update_parser`): a stream per upload was
        most of what gRPC spent on a small round's hospital (issue 16 item 2). The
        same handler takes it, so the checks, refusals, audit and receipt are the
        stream's; only what a one-message call cannot carry is refused first."""
        if len(request) == 1 and isinstance(request[0], UnreadableMessage):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"the request is not a readable SmallUpdate: {request[0].error}",
                  Refusal.UNREADABLE)
        if len(request) != 2 or not request[0].HasField("header") \
                or not request[1].HasField("chunk"):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "a small update holds its header and its one chunk", Refusal.BAD_HEADER)
        if request[0].header.manifest.chunk_count != 1:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"a small update is one chunk; this manifest has"
                  f" {request[0].header.manifest.chunk_count}: stream it with SubmitUpdate",
                  Refusal.NOT_ONE_CHUNK, "manifest.chunk_count")
        return self.SubmitUpdate(iter(request), context)

    def _open_upload(self, client_id: str, session: Session, header: apb.UpdateStreamHeader,
                     context: grpc.ServicerContext) -> Upload:
        try:
            rs = self.engine.check_update_allowed(client_id, header.task_id, header.job_id,
                                                  header.round)
            model = self.engine.current_model()
            # a secure round takes one masked int32 vector, and only from a hospital
            # whose shares went out (refused before any of its bytes are stored)
            expected: Any = model.manifest
            secagg = getattr(rs, "secagg", None)
            if secagg is not None:
                secagg.check_upload(client_id)
                expected = secagg.upload_layout()
        except RoundRefusal as refusal:
            abort_refusal(context, refusal)
        expected_id = upload_stream_id(rs.job_id, rs.round, header.task_id, session.session_id)
        if header.stream_id != expected_id:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"stream id {header.stream_id!r} is not this task's upload stream",
                  "WRONG_STREAM")
        problem = check_update_header(header, self.registry.num_examples(client_id))
        if problem:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem, "BAD_VALUE")
        with self._lock:
            up = self._uploads.get(expected_id)
        if up is not None:
            if header.manifest.SerializeToString(deterministic=True) != \
                    up.manifest.SerializeToString(deterministic=True):
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "a resumed upload must carry the same manifest", "MANIFEST_CHANGED")
            if header.resume_from != up.opener.next_sequence:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      f"resume from chunk {up.opener.next_sequence}, not"
                      f" {header.resume_from}", "RESUME_MISMATCH")
            RESUMED.labels("up").inc()
            return up
        if header.resume_from != 0:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "no partial upload to resume: start from chunk 0", "RESUME_MISMATCH")
        try:
            check_manifest(header.manifest, expected)
        except CodecError as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"manifest refused: {exc}",
                  exc.code, getattr(exc, "field", ""))
        ctx = StreamContext(rs.job_id, rs.round, client_id, "up", expected_id,
                            manifest_digest(header.manifest))
        memory = self._memory_for(header.manifest)
        spool = None if memory else self.spool_dir / \
            f"{rs.job_id}-{rs.round}-{rs.attempt}-{client_id}-{next(self._spool_serial)}.spool"
        if spool is not None and self.spools.claim(spool, int(header.manifest.total_bytes)):
            SPOOLS_REUSED.inc()
        try:
            # measured as it arrives: the finiteness check and the norms need no
            # second read of the update
            assembler = StreamAssembler(header.manifest, expected=expected,
                                        spool_path=spool, measure=True)
        except CodecError as exc:
            self._release_memory(memory)
            if spool is not None:  # a kept file may have been moved there for it
                spool.unlink(missing_ok=True)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"manifest refused: {exc}",
                  exc.code, getattr(exc, "field", ""))
        up = Upload(client_id, header.task_id, rs, header.manifest, assembler,
                    StreamOpener(stream_key(session.secret, ctx), ctx), spool, threading.Lock(),
                    memory=memory)
        with self._lock:
            self._uploads[expected_id] = up
        return up

    def _memory_for(self, manifest: tpb.TensorManifest) -> int:
        """Bytes of the in-memory budget taken for an upload of `manifest`; 0: spool it."""
        size = int(manifest.total_bytes)
        if manifest.chunk_count != 1 or not 0 < size <= UPLOAD_MEMORY_MAX_BYTES:
            return 0
        with self._lock:
            if self._memory_held + size > UPLOAD_MEMORY_BUDGET_BYTES:
                return 0
            self._memory_held += size
        return size

    def _release_memory(self, size: int) -> None:
        if size:
            with self._lock:
                self._memory_held -= size

    def _discard(self, up: Upload) -> None:
        """The upload's storage is no longer needed here: its memory leaves the budget,
        and its spool file goes to the pool once nothing reads it (a mapping of it
        lives on while a strategy holds the tensors). The file of an upload that did not
        finish is deleted: its handler may still be writing it."""
        if up.spool_path is not None:
            if up.assembler.finished:
                self.spools.give_back(up.spool_path, int(up.manifest.total_bytes),
                                      up.assembler.spool_mapping())
            else:
                up.spool_path.unlink(missing_ok=True)
        with self._lock:
            size, up.memory = up.memory, 0
            self._memory_held -= size

    def _drop(self, up: Upload, stream_id: str) -> None:
        with self._lock:
            if self._uploads.get(stream_id) is up:
                del self._uploads[stream_id]
        self._discard(up)

    def _receive(self, up: Upload, header: apb.UpdateStreamHeader,
                 messages: Iterator[apb.UpdateStreamMessage],
                 context: grpc.ServicerContext, on_loop: bool = False) -> apb.UpdateReceipt:
        stream_id = header.stream_id
        final_seen = False
        try:
            for msg in messages:
                if not msg.HasField("chunk"):
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          "only chunks may follow the header", "BAD_HEADER")
                if final_seen:
                    self._drop(up, stream_id)
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          "data after the final chunk", "AFTER_FINAL")
                chunk = msg.chunk
                received = up.assembler.bytes_received
                up.assembler.add_sealed(up.opener, chunk)  # opened straight into its place
                OBSERVED.chunk_received(up.client_id, up.task_id, chunk.sequence + 1,
                                        up.manifest.chunk_count,
                                        up.assembler.bytes_received - received + GCM_TAG_BYTES)
                if chunk.final:
                    final_seen = True
        except SealError as exc:
            status = grpc.StatusCode.INVALID_ARGUMENT
            abort(context, status, f"chunk refused: {exc}", exc.code)
        except CodecError as exc:
            self._drop(up, stream_id)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"chunk refused: {exc}", exc.code,
                  getattr(exc, "field", ""))
        except OSError as exc:
            # The spool write failed (disk full, I/O error). The assembler has already
            # hashed the chunk it could not store, so the upload cannot resume: drop it,
            # and tell the client it is the server's storage, not its data.
            self._drop(up, stream_id)
            full = exc.errno == errno.ENOSPC
            if full:  # the kept spools' blocks go first; the retry may fit
                self.spools.clear()
            log_event(log, "upload_spool_failed", logging.ERROR, client=up.client_id,
                      error=str(exc))
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED if full
                  else grpc.StatusCode.UNAVAILABLE,
                  f"the server cannot store this upload ({'disk full' if full else exc}):"
                  " start again from chunk 0 later", "SERVER_STORAGE")
        if not context.is_active():
            abort(context, grpc.StatusCode.CANCELLED, "upload cancelled")
        if not final_seen:
            abort(context, grpc.StatusCode.ABORTED,
                  f"stream ended before its final chunk: resume from chunk"
                  f" {up.opener.next_sequence}", "TRUNCATED")
        # an upload handled on the loop is one small chunk: it must not wait for the
        # gate, and the gate's memory bound does not need it (`runs_on_loop`)
        with nullcontext() if on_loop else self._fold_gate:
            try:
                up.opener.finish()
                tensors = up.assembler.finish()
            except (SealError, IntegrityError, CodecError) as exc:
                self._drop(up, stream_id)
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {exc}",
                      getattr(exc, "code", "INTEGRITY"))
            # (an upload in memory has no pages that could be dropped and read back)
            pages = _SpoolPages(tensors if up.spool_path is not None else {})
            norms = up.assembler.norms
            bad = None
            for name, tensor in tensors.items():  # a tensor's pages at a time
                if math.isfinite(norms.get(name, math.nan)):
                    continue  # measured on arrival: every element is finite
                bad = has_non_finite({name: tensor})
                pages.release(name)
                if bad is not None:
                    break
            if bad is not None:
                self._drop(up, stream_id)
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"update refused: tensor {bad!r} holds NaN or Inf", "NON_FINITE", bad)
            task_kind = up.round_state.tasks[up.client_id].config.update_kind
            model = self.engine.current_model()
            delta: Mapping[str, torch.Tensor] = MeasuredUpdate(tensors, norms)
            if task_kind == cpb.WEIGHTS:  # the norms measured are the weights', not the delta's
                delta = _DeltaView(tensors, model.state)
            metrics = dict(header.metrics)
            with self._lock:  # complete: no longer resumable, and not cancelled at round close
                self._uploads.pop(stream_id, None)
            try:
                self.engine.accept_update(up.client_id, up.task_id, header.job_id, header.round,
                                          delta, int(header.num_examples), metrics,
                                          pages.release)
            except RoundRefusal as refusal:
                self._discard(up)
                abort_refusal(context, refusal)
            finally:
                if self.engine.strategy.streaming:
                    del tensors, delta
        # Given back now even when a non-streaming strategy still reads the update: the
        # pool lets no upload write the file until the strategy lets go of its mapping.
        self._discard(up)
        self.registry.note_report(up.client_id, "OK", metrics.get("epsilon_total"))
        audit.update_accepted(up.client_id, header.round, up.manifest.total_bytes, metrics)
        # DEBUG: a line per hospital per round is the hot path's cost; the round summary
        # (stored with the round) and the recent events (Status) name every accepted update.
        log_event(log, "update_accepted", logging.DEBUG, client=up.client_id,
                  round=header.round, bytes=up.manifest.total_bytes,
                  chunks=up.manifest.chunk_count, examples=header.num_examples)
        # the assembler's manifest: with trailing digests, the header's had none
        return apb.UpdateReceipt(stream_id=stream_id, chunks_received=up.manifest.chunk_count,
                                 bytes_received=up.manifest.total_bytes,
                                 sha256=up.assembler.manifest.sha256)


def add_to_server(service: AggregatorService, server: Any) -> None:
    """`apb_grpc.add_AggregatorServicer_to_server`, with the two transfer streams'
    chunks written and read directly (`fl_core.sealing`'s wire functions) instead of
    through protobuf messages: three fewer copies of every megabyte at this end
    (issue 16 items 1 and 3). The same bytes on the wire, the same messages handed
    to the handlers for everything but a chunk, and protobuf still reads anything
    unusual, so clients see no difference."""
    service.wire_chunks = True
    handlers = {
        "FetchModel": grpc.unary_stream_rpc_method_handler(
            service.FetchModel,
            request_deserializer=apb.FetchModelRequest.FromString,
            response_serializer=serialize_stream_message),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            service.SubmitUpdate,
            request_deserializer=stream_message_parser(apb.UpdateStreamMessage),
            response_serializer=apb.UpdateReceipt.SerializeToString),
        "SubmitSmallUpdate": grpc.unary_unary_rpc_method_handler(
            service.SubmitSmallUpdate,
            request_deserializer=small_update_parser(apb.SmallUpdate, apb.UpdateStreamMessage),
            response_serializer=apb.UpdateReceipt.SerializeToString),
        "UploadStatus": grpc.unary_unary_rpc_method_handler(
            service.UploadStatus,
            request_deserializer=apb.UploadStatusRequest.FromString,
            response_serializer=apb.UploadStatusReply.SerializeToString),
    }
    service_name = apb.DESCRIPTOR.services_by_name["Aggregator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name,
                                                                         handlers),))
    server.add_registered_method_handlers(service_name, handlers)
    on_loop = getattr(server, "run_on_loop_when_read", None)  # fl_server.serving.AioServer
    if on_loop is not None:
        on_loop(f"/{service_name}/SubmitUpdate", service.runs_on_loop)
        # a unary call's one request: the stream's two messages
        on_loop(f"/{service_name}/SubmitSmallUpdate", lambda requests: service.runs_on_loop(
            requests[0]))
