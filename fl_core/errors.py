"""How a refusal travels: one enum of reasons and the standard gRPC rich error model.

A refusal is a gRPC status code (what a generic client can act on) plus a
machine-readable reason from `Refusal` and, where there is one, the field or
tensor concerned. They travel as a `google.rpc.Status` whose details hold one
`google.rpc.ErrorInfo` (domain `fl.v1`, reason, metadata {"field": ...}) in the
standard `grpc-status-details-bin` trailer, so grpcurl, Envoy and any gRPC client
library can read them without knowing this project. Both daemons and the tests
decode them with `refusal_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "fl.v1"


class Refusal(StrEnum):
    """Every reason the server gives for refusing a call (ErrorInfo.reason)."""

    # authentication and authorization
    NO_CERTIFICATE = "NO_CERTIFICATE"
    CERT_REVOKED = "CERT_REVOKED"
    BAD_TOKEN = "BAD_TOKEN"
    TOKEN_CERT_MISMATCH = "TOKEN_CERT_MISMATCH"
    NOT_ADMIN = "NOT_ADMIN"
    SESSION_MISMATCH = "SESSION_MISMATCH"
    SESSION_ACTIVE = "SESSION_ACTIVE"
    NO_SESSION = "NO_SESSION"
    WRONG_MODEL_TYPE = "WRONG_MODEL_TYPE"
    # rounds
    NO_ROUND = "NO_ROUND"
    NOT_SELECTED = "NOT_SELECTED"
    WRONG_TASK = "WRONG_TASK"
    WRONG_ROUND = "WRONG_ROUND"
    DUPLICATE_UPDATE = "DUPLICATE_UPDATE"
    ALREADY_FAILED = "ALREADY_FAILED"
    ROUND_CLOSED = "ROUND_CLOSED"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    # streams and content
    BAD_VALUE = "BAD_VALUE"
    BAD_HEADER = "BAD_HEADER"
    UNREADABLE = "UNREADABLE"  # a message protobuf cannot read
    UNKNOWN_STREAM = "UNKNOWN_STREAM"
    RESUME_MISMATCH = "RESUME_MISMATCH"
    MANIFEST_MISMATCH = "MANIFEST_MISMATCH"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_CHANGED = "MANIFEST_CHANGED"
    UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
    HASH_MISMATCH = "HASH_MISMATCH"
    STREAM_OVERSIZE = "STREAM_OVERSIZE"
    NOT_ONE_CHUNK = "NOT_ONE_CHUNK"  # SubmitSmallUpdate takes one chunk
    INCOMPLETE = "INCOMPLETE"
    NON_FINITE = "NON_FINITE"
    SERVER_STORAGE = "SERVER_STORAGE"
    CANCELLED = "CANCELLED"
    BUSY = "BUSY"
    # the sealing layer's own codes (fl_core.sealing) travel as they are
    SEAL_INVALID = "SEAL_INVALID"
    OUT_OF_ORDER = "OUT_OF_ORDER"
    WRONG_STREAM = "WRONG_STREAM"
    AFTER_FINAL = "AFTER_FINAL"
    TRUNCATED = "TRUNCATED"
    BAD_PUBLIC_KEY = "BAD_PUBLIC_KEY"
    BAD_KEY = "BAD_KEY"
    BAD_CONTEXT = "BAD_CONTEXT"


@dataclass(frozen=True)
class RefusalInfo:
    """A refusal as a client sees it: status code, reason, message, field."""

    code: grpc.StatusCode
    reason: str
    message: str
    field: str = ""


def status_of(code: grpc.StatusCode, message: str, reason: str = "",
              field: str = "") -> grpc.Status:
    """The rich status for a refusal, ready for `context.abort_with_status`."""
    info = error_details_pb2.ErrorInfo(reason=reason or code.name, domain=ERROR_DOMAIN)
    if field:
        info.metadata["field"] = field
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(proto)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          reason: str = "", field: str = "") -> NoReturn:
    """End the call with `code`, `message` and an ErrorInfo naming the reason."""
    context.abort_with_status(status_of(code, message, reason, field))
    raise AssertionError("unreachable")  # abort_with_status raises


def refusal_of(error: Any) -> RefusalInfo:
    """Decode a failed call (grpc.RpcError / grpc.Call) into its refusal.

    A status without rich details (from gRPC itself: deadline, unavailable) still
    decodes, with the status code's name as the reason.
    """
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    reason, field = code.name, ""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason = info.reason
                field = info.metadata.get("field", "")
                break
    return RefusalInfo(code, reason, message or "", field)
