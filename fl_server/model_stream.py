"""The global model as one hospital's sealed download stream, and a small model carried
in the task itself.

Why the task carries it: on a small model (every task this project ships but the
largest images) a round's fixed cost per hospital is mostly per-call machinery, and
FetchModel is one whole call (request, header, chunk, status) a hospital makes every
round only to learn the bytes the server already knew it would ask for. Sealing the
same chunks into the task, for the session of the stream that delivers it, saves that
call and its round trip on both sides (issue 16 item 2). The cryptography is
FetchModel's: the same stream id, stream context, key and nonces, so a hospital that
falls back to FetchModel for the same task receives byte for byte the same chunks.
"""

from __future__ import annotations

from fl_core.constants import GCM_TAG_BYTES, INLINE_MODEL_MAX_BYTES
from fl_core.sealing import StreamContext, StreamSealer, manifest_digest, stream_key
from fl_core.stream_ids import download_stream_id
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb
from fl_server.clients import Session
from fl_server.metrics import OBSERVED
from fl_server.rounds import ModelVersion, RoundEngine, RoundRefusal


def model_version_for(task: cpb.Task, round_no: int) -> int:
    """The global model version a task works on: a TRAIN task the model its round
    starts from, an EVALUATE task the model its round produced."""
    return round_no - 1 if task.kind == cpb.TRAIN else round_no


def download_sealer(secret: bytes, client_id: str, job_id: str, round_no: int, task_id: str,
                    session_id: str, manifest: tpb.TensorManifest) -> tuple[str, StreamSealer]:
    """The download stream's id and sealer for one task and session."""
    stream_id = download_stream_id(job_id, round_no, task_id, session_id)
    ctx = StreamContext(job_id, round_no, client_id, "down", stream_id,
                        manifest_digest(manifest))
    return stream_id, StreamSealer(stream_key(secret, ctx), ctx)


def seal_into_task(task: cpb.Task, model: ModelVersion, client_id: str,
                   session: Session) -> cpb.Task:
    """A copy of `task` carrying `model` sealed for `session` (FetchModel's chunks,
    under the manifest the task announced: the model's, in the hospital's digest)."""
    carried = cpb.Task()
    carried.CopyFrom(task)
    manifest = task.model_manifest
    stream_id, sealer = download_sealer(session.secret, client_id, task.job_id, task.round,
                                        task.task_id, session.session_id, manifest)
    carried.model_stream_id = stream_id
    count = manifest.chunk_count
    for seq, plain in enumerate(model.plain_chunks(manifest)):
        sealer.seal_into(carried.model_chunks.add(), seq, plain, seq == count - 1)
        OBSERVED.download(client_id, task.task_id, seq == count - 1,
                          len(plain) + GCM_TAG_BYTES, resumed=False)
    return carried


def with_model(task: cpb.Task, engine: RoundEngine, client_id: str,
               session: Session | None) -> cpb.Task:
    """`task` with its model sealed in when that model is small and still the one the
    task needs; otherwise `task` as it is (the hospital calls FetchModel)."""
    if session is None or task.kind not in (cpb.TRAIN, cpb.EVALUATE) \
            or not 0 < task.model_manifest.total_bytes <= INLINE_MODEL_MAX_BYTES:
        return task
    try:
        rs, current = engine.task_of(client_id, task.task_id)
        model = engine.current_model()
    except RoundRefusal:
        return task  # the round moved on: the hospital's FetchModel gets the refusal
    if model.version != model_version_for(current, rs.round):
        return task  # (the client checks the chunks against the task's manifest)
    return seal_into_task(task, model, client_id, session)
