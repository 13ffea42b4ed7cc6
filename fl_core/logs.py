"""Structured one-line logs for daemons that run for months.

One event per line, key=value (or JSON), so an operator can grep a round or a
client across days of logs and a collector can parse them without a schema.
Fields are passed as `extra={"fields": {...}}` or through `log_event`.
"""

from __future__ import annotations

import json as _json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["KeyValueFormatter", "JsonFormatter", "log_event", "setup_logging"]

_RESERVED = ("ts", "level", "logger", "msg")
_MARK = "_fl_core_handler"


def _timestamp(record: logging.LogRecord) -> str:
    return (
        datetime.fromtimestamp(record.created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    out: dict[str, Any] = {}
    if isinstance(fields, dict):
        for key, value in fields.items():
            # A field may not overwrite the line's own keys.
            out[f"field_{key}" if key in _RESERVED else str(key)] = value
    return out


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t'):
        return text
    return _json.dumps(text)  # quotes and escapes, newlines included: one line stays one line


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=INFO logger=fl_server msg="..." key=value ...` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        parts.update(_fields(record))
        if record.exc_info:
            parts["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_quote(value)}" for key, value in parts.items())


class JsonFormatter(logging.Formatter):
    """The same content as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        parts: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        parts.update(_fields(record))
        if record.exc_info:
            parts["exc"] = self.formatException(record.exc_info)
        return _json.dumps(parts, default=str)


def setup_logging(
    name: str = "",
    level: int | str = logging.INFO,
    json: bool = False,
    stream: IO[str] | None = None,
) -> logging.Logger:
    """Send logger `name` (and its children) to stderr, one structured line per event.

    Calling it again replaces the handler it installed rather than adding another,
    so lines are never duplicated.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    for handler in list(logger.handlers):
        if getattr(handler, _MARK, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else KeyValueFormatter())
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    if name:
        logger.propagate = False
    return logger


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured fields: `log_event(log, "round_closed", round=3)`."""
    logger.log(level, event, extra={"fields": fields}, stacklevel=2)
