"""The server's audit trail (STATE_DIR/audit.jsonl) and the recent events the dashboard
shows; `python -m fl_server.audit verify FILE` checks a trail (see fl_core.audit).

Recorded: joins, admin calls, refused calls and how every round ended. The hooks in
the services are one call each into this module; before `open_server_trail` (an
engine driven in-process by a test) they only feed the in-memory event list.

Admin reads are recorded once per admin and method every ADMIN_READ_AUDIT_INTERVAL_S:
the dashboard polls Status every second, and a trail that holds thousands of
identical reads hides the records that matter.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from fl_core.audit import AuditError, AuditTrail, open_trail
from fl_core.audit import main as audit_main
from fl_proto import tensors_pb2 as tpb
from fl_server.grpc_types import Handler, WrappingInterceptor, rewrap
from fl_server.metrics import OBSERVED

log = logging.getLogger("fl_server.audit")

ADMIN_READ_AUDIT_INTERVAL_S = 600.0
ERROR_DETAIL_KEY = "fl-error-bin"  # the first wave's ErrorDetail trailer
STATUS_DETAILS_KEY = "grpc-status-details-bin"  # google.rpc.Status (fl_core.errors)
RECENT_EVENTS = 50
REFUSALS_AUDITED_PER_MINUTE = 30  # per caller and reason; the rest counted, see refused()
COALESCED = frozenset({"join", "refusal"})  # repeats of one client shown once, counted

_lock = threading.Lock()
_trail: AuditTrail | None = None
_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
_admin_reads: dict[tuple[str, str], float] = {}
_refusals: dict[tuple[str, str], tuple[float, int, int]] = {}


def open_server_trail(state_dir: Path) -> AuditTrail | None:
    """Start recording into state_dir/audit.jsonl (the daemon calls this once)."""
    global _trail
    trail = open_trail(state_dir)
    with _lock:
        _trail = trail
    return trail


def _record(event: str, client_id: str, summary: str, audit: bool = True,
            **data: Any) -> None:
    now_ms = int(time.time() * 1000)
    with _lock:
        last = _events[-1] if _events else None
        if last and event in COALESCED and (last["kind"], last["client_id"]) == (event, client_id):
            # a reconnecting client must not push the rounds out of the recent events
            last["repeats"] = last.get("repeats", 1) + 1
            last["unix_ms"] = now_ms
            last["message"] = f"{summary[:280]} (x{last['repeats']})"
        else:
            _events.append({"unix_ms": now_ms, "kind": event, "client_id": client_id,
                            "message": summary[:300]})
        trail = _trail
    if audit and trail is not None:
        try:
            trail.append(event, client=client_id, **data)
        except AuditError as exc:  # the call goes on; the operator sees why in the log
            log.error("audit record not written: %s", exc)


def recent_events() -> list[dict[str, Any]]:
    """Newest first, as StatusEvent fields."""
    with _lock:
        return [{k: v for k, v in e.items() if k != "repeats"} for e in reversed(_events)]


def joined(client_id: str, session_id: str, num_examples: int, cert_sha256: str) -> None:
    _record("join", client_id, f"joined with {num_examples} examples", session=session_id,
            num_examples=num_examples, cert_sha256=cert_sha256)


def admin_call(admin: str, method: str, cert_sha256: str) -> None:
    now = time.monotonic()
    with _lock:
        last = _admin_reads.get((admin, method))
        due = last is None or now - last >= ADMIN_READ_AUDIT_INTERVAL_S
        if due:
            _admin_reads[(admin, method)] = now
    if due:
        _record("admin_call", admin, f"{method}", method=method, cert_sha256=cert_sha256)


def _refusal_budget(caller: str, code: str) -> tuple[bool, int]:
    """(write it, refusals left out since the last written one) for this caller and code:
    at most REFUSALS_AUDITED_PER_MINUTE records each, so a client looping on a refused
    call cannot make the server fsync once per call; the next record carries the count."""
    now = time.monotonic()
    key = (caller, code)
    with _lock:
        if len(_refusals) > 10_000:
            _refusals.clear()
        start, count, left_out = _refusals.get(key, (now, 0, 0))
        if now - start >= 60.0:
            start, count = now, 0
        count += 1
        write = count <= REFUSALS_AUDITED_PER_MINUTE
        _refusals[key] = (start, count, 0 if write else left_out + 1)
    return write, left_out if write else 0


def refused(code: str, message: str, client_id: str = "", method: str = "",
            peer: str = "") -> None:
    """A call refused (by the interceptor or a service); counted in the metrics too."""
    OBSERVED.refused(code, client_id)
    caller = client_id or peer.rsplit(":", 1)[0]
    write, left_out = _refusal_budget(caller, code)
    _record("refusal", client_id or peer, f"{code}: {message}", audit=write, code=code,
            message=message, method=method, peer=peer, not_audited_before=left_out)


def _detail_code(context: grpc.ServicerContext) -> str:
    """The machine-readable reason the service sent in its trailers, if any: an
    ErrorInfo in the standard `grpc-status-details-bin` or the older ErrorDetail."""
    try:
        trailing = context.trailing_metadata() or ()
    except Exception:
        return ""
    for key, value in trailing:
        if not isinstance(value, bytes):
            continue
        try:
            if key == STATUS_DETAILS_KEY:
                status = status_pb2.Status.FromString(value)
                for any_detail in status.details:
                    info = error_details_pb2.ErrorInfo()
                    if any_detail.Unpack(info):
                        return str(info.reason)
            elif key == ERROR_DETAIL_KEY:
                return tpb.ErrorDetail.FromString(value).code
        except Exception:  # a malformed trailer is not worth failing the call over
            return ""
    return ""


def _caller(context: grpc.ServicerContext) -> str:
    try:
        names = cast(list[bytes], context.auth_context().get("x509_common_name") or [])
    except Exception:
        return ""
    return bytes(names[0]).decode("utf-8", "replace") if names else ""


def _observe_end(context: grpc.ServicerContext, method: str) -> None:
    code = context.code()  # type: ignore[attr-defined]
    if code is None or code == grpc.StatusCode.OK:
        return
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    if name == "CANCELLED":
        return  # the peer went away: not a refusal
    details = context.details()  # type: ignore[attr-defined]
    message = details.decode("utf-8", "replace") if isinstance(details, bytes) else str(details)
    refused(_detail_code(context) or name, message, client_id=_caller(context),
            method=method, peer=context.peer())


class RefusalObserver(WrappingInterceptor):
    """Outermost interceptor: every call that ends with an error status (refused by the
    authentication interceptor or by a service's abort) is counted by code, audited and
    shown among the recent events, without a hook at each of the many abort sites."""

    def _wrap(self, handler: Handler, method: str) -> Handler:

        def unary(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            def observed(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(request, context)
                finally:
                    _observe_end(context, method)
            return observed

        def streaming(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                finally:
                    _observe_end(context, method)
            return observed

        return rewrap(handler, lambda behavior, _in, streaming_out:
                      streaming(behavior) if streaming_out else unary(behavior))


def job_event(event: str, job_id: str, summary: str, **data: Any) -> None:
    """A job's life: submitted, started, ended, aborted, its model downloaded."""
    _record(event, "", summary, job=job_id, **data)


def update_accepted(client_id: str, round_no: int, nbytes: int,
                    metrics: dict[str, float]) -> None:
    OBSERVED.update_accepted(client_id, metrics)
    _record("update_accepted", client_id, f"round {round_no} update accepted ({nbytes} bytes)",
            audit=False)


def round_completed(job_id: str, round_no: int, seconds: float, selected: int, accepted: int,
                    failed: dict[str, str], model_sha256: str) -> None:
    from fl_server.metrics import round_outcome

    round_outcome("completed", seconds)
    _record("round_completed", "", f"round {round_no} completed in {seconds:.2f}s"
            f" ({accepted}/{selected} updates)", job=job_id, round=round_no,
            seconds=round(seconds, 3), selected=selected, accepted=accepted, failed=failed,
            model_sha256=model_sha256)


def round_failed(job_id: str, round_no: int, attempt: int, reason: str,
                 final: bool = False) -> None:
    from fl_server.metrics import round_outcome

    round_outcome("failed" if final else "attempt_failed")
    _record("round_failed" if final else "round_attempt_failed", "",
            f"round {round_no} attempt {attempt}: {reason}", job=job_id, round=round_no,
            attempt=attempt, reason=reason)


def main(argv: list[str] | None = None) -> int:
    return audit_main(argv, prog="python -m fl_server.audit")


if __name__ == "__main__":
    sys.exit(main())
