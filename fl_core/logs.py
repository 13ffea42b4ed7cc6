"""Structured one-line logs for daemons that run for months.

One event per line, key=value (or JSON), so an operator can grep a round or a
client across days of logs and a collector can parse them without a schema.
Fields are passed as `extra={"fields": {...}}` or through `log_event`.

Lines go to stderr (journald or a terminal keeps them), or with `--log_file` to a
file rotated by size (`--log_max_bytes`, `--log_backups`), so a daemon that runs for
months on a hospital machine cannot fill its disk with logs.
"""

from __future__ import annotations

import argparse
import json as _json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fl_core.constants import LOG_FILE_BACKUPS, LOG_FILE_MAX_BYTES

__all__ = ["KeyValueFormatter", "JsonFormatter", "add_log_file_flags", "log_event",
           "setup_logging", "setup_logging_from_args"]

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
    log_file: Path | None = None,
    max_bytes: int = LOG_FILE_MAX_BYTES,
    backups: int = LOG_FILE_BACKUPS,
) -> logging.Logger:
    """Send logger `name` (and its children) to stderr, one structured line per event;
    or, with `log_file`, to that file, rotated at `max_bytes` keeping `backups` old
    files (`daemon.log.1` .. `.N`; `backups=0` truncates instead of keeping any).

    Calling it again replaces the handler it installed rather than adding another,
    so lines are never duplicated. OSError if the log file cannot be opened.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    for old in list(logger.handlers):
        if getattr(old, _MARK, False):
            logger.removeHandler(old)
            old.close()
    handler: logging.Handler
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else KeyValueFormatter())
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    if name:
        logger.propagate = False
    return logger


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of bytes")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def add_log_file_flags(parser: argparse.ArgumentParser) -> None:
    """`--log_file`, `--log_max_bytes`, `--log_backups`: the same on both daemons."""
    parser.add_argument("--log_file", type=Path, default=None,
                        help="write the log here instead of stderr, rotated by size")
    parser.add_argument("--log_max_bytes", type=_positive, default=LOG_FILE_MAX_BYTES,
                        help="rotate --log_file when it reaches this many bytes")
    parser.add_argument("--log_backups", type=_count, default=LOG_FILE_BACKUPS,
                        help="rotated files kept (daemon.log.1 .. .N)")


def setup_logging_from_args(name: str, args: argparse.Namespace) -> logging.Logger:
    """`setup_logging` with `--log_level` and the flags `add_log_file_flags` added."""
    return setup_logging(name, args.log_level, log_file=getattr(args, "log_file", None),
                         max_bytes=getattr(args, "log_max_bytes", LOG_FILE_MAX_BYTES),
                         backups=getattr(args, "log_backups", LOG_FILE_BACKUPS))


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured fields: `log_event(log, "round_closed", round=3)`."""
    logger.log(level, event, extra={"fields": fields}, stacklevel=2)
