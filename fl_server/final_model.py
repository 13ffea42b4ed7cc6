"""The final global model's way back to the hospitals that trained it (issue 15 item 3).

When a job completes, the STOP task a participating hospital receives carries the
final model's manifest and round, so its daemon can fetch the model over the same
sealed, resumable FetchModel path as any round's model (keys bound to the job, the
round, the client and the stream) and check it against that manifest. Only the
hospitals that contributed an accepted update to some round of the job are offered
it (read from the store, so a server restarted after the job ended still knows
them); any other connected hospital gets a plain STOP. A failed or stopped job
delivers nothing.

A server run with ``--exit_when_done`` waits (at most ``FINAL_MODEL_GRACE_S``) while
``awaited``: an offered hospital that has not streamed the model to its last chunk is
still connected; it does not close under a download in progress, and does not wait
for a hospital that left (or a client that does not fetch).
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb
from fl_server.store import Store

if TYPE_CHECKING:  # rounds.py imports this module
    from fl_server.rounds import ModelVersion


def participants(store: Store, job_id: str) -> set[str]:
    """Hospitals with an accepted update in any completed round of the job."""
    found: set[str] = set()
    for row in store.rounds(job_id):
        clients = row.metrics.get("clients") if row.state == "completed" else None
        if isinstance(clients, dict):
            found.update(str(c) for c in clients)
    return found


def final_metrics(store: Store, job_id: str) -> dict[str, float]:
    """The numeric figures of the job's last completed round (its evaluation, loss,
    epsilon): what the model card reports as the server's."""
    for row in reversed(store.rounds(job_id)):
        if row.state == "completed":
            return {k: float(v) for k, v in row.metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                    and math.isfinite(v)}
    return {}


class FinalDelivery:
    """The final-model tasks of one completed job: who may fetch what."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, cpb.Task] = {}
        self._model: ModelVersion | None = None  # the offered model, whatever runs next
        self._pending: set[str] = set()
        self._model_type = ""
        self._strategy = ""
        self._store: Store | None = None

    def begin_job(self, job_id: str, model_type: str, strategy: str = "",
                  store: Store | None = None) -> None:
        """A new job runs: its STOP tasks name its model type, so a hospital serving
        other studies knows the STOP is not about its work; the completed job's STOP
        carries its strategy and final figures (from `store`) for the model card. The
        previous job's model stays offered until this one completes."""
        with self._lock:
            self._model_type = model_type
            self._strategy = strategy
            self._store = store

    def open(self, job_id: str, round_no: int, model: ModelVersion,
             manifest_of: Callable[[str], tpb.TensorManifest], clients: set[str]) -> None:
        """Offer ``model``, the job's last round's (``round_no``), to ``clients``;
        ``manifest_of(client)`` is the model's manifest in that hospital's digest.

        The model is kept here, not looked up in the engine when a hospital fetches it:
        the next queued job starts as soon as this one completes, and its engine serves
        its own model from then on, while this job's hospitals are still fetching
        theirs (a hospital's fetch used to be refused FAILED_PRECONDITION then). A large
        model is its checkpoint file's mapping, so keeping it costs page cache only."""
        figures = final_metrics(self._store, job_id) if self._store is not None else {}
        with self._lock:
            self._model = model
            self._tasks = {
                cid: cpb.Task(task_id=uuid.uuid4().hex, kind=cpb.STOP, job_id=job_id,
                              round=round_no, model_manifest=manifest_of(cid),
                              model_type=self._model_type, job_state="completed",
                              strategy=self._strategy, final_metrics=figures)
                for cid in clients}
            self._pending = set(clients)

    def stop_task(self, client_id: str, job_id: str, round_no: int) -> cpb.Task:
        """The STOP task for ``client_id``: with the final model when it is offered one."""
        with self._lock:
            offered = self._tasks.get(client_id)
            model_type = self._model_type
        if offered is not None and offered.job_id == job_id:
            return offered
        return cpb.Task(task_id=uuid.uuid4().hex, kind=cpb.STOP, job_id=job_id, round=round_no,
                        model_type=model_type)

    def offer_of(self, client_id: str, task_id: str) -> tuple[cpb.Task, ModelVersion] | None:
        """The final-model task ``task_id`` of ``client_id`` and the model it offers, or
        None when it is not one."""
        with self._lock:
            task, model = self._tasks.get(client_id), self._model
        if task is None or task.task_id != task_id or model is None:
            return None
        return task, model

    def awaited(self, connected: Iterable[str]) -> bool:
        """True while an offered hospital that has not fetched the model yet is still
        connected (one that left, or a client that does not fetch, is not waited for)."""
        with self._lock:
            return bool(self._pending.intersection(connected))

    def fetched(self, client_id: str) -> None:
        """``client_id`` has streamed the whole model."""
        with self._lock:
            self._pending.discard(client_id)
