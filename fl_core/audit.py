"""Append-only, hash-chained audit trail (JSON lines), shared by both daemons and fl-keys.

Why: a hospital's privacy officer must be able to show, from the hospital's own
records, what left the building and when; the operator must be able to show who
joined, who was refused and how every round ended. Log lines rotate and are edited
freely; this file is written once per event and checked by `verify`.

Each line is one JSON object with sorted keys:
    {"data": {...}, "event": "update_sent", "hash": H, "prev": P, "seq": N, "ts": T}
`seq` counts from 1, `prev` is the `hash` of the line before (64 zeros for the first),
and `hash` is the SHA-256 of the line's canonical JSON without the `hash` key. Every
append is written with O_APPEND under an exclusive flock (several processes may share
one trail) and fsynced before `append` returns.

What `verify` finds, and what it cannot: an edited line (its own hash no longer
matches, or, when the editor re-hashed it, the next line's `prev` no longer does), a
removed line (a gap in `seq` or a broken link), and reordered lines (a `seq` that goes
back, or arrives before its turn), each by its line number. A chain without a secret
cannot stop someone who rewrites every line after an edit, nor show that the newest
lines were cut off: `verify` prints the head hash, and keeping that value elsewhere
(a ticket, a second machine) closes both gaps.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
AUDIT_FILE = "audit.jsonl"


class AuditError(Exception):
    """The trail cannot be written or read (its message names the file)."""


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=True).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON without its own `hash`."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _plain(value: Any) -> Any:
    """JSON-safe copy: floats that are not finite become strings, unknown types str()."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class AuditTrail:
    """One audit file. Thread-safe; several processes may append to the same file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            if fresh:
                _fsync_dir(self.path.parent)
        except OSError as exc:
            raise AuditError(f"cannot open audit trail {self.path}: {exc}") from exc

    def append(self, event: str, **data: Any) -> dict[str, Any]:
        """Write one record and fsync it; returns the record as written."""
        with self._lock:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    last = _last_record(self._fd, self.path)
                    record: dict[str, Any] = {
                        "seq": (int(last["seq"]) + 1) if last else 1,
                        "prev": str(last["hash"]) if last else GENESIS,
                        "ts": round(time.time(), 6), "event": event, "data": _plain(data)}
                    record["hash"] = record_hash(record)
                    os.write(self._fd, _canonical(record) + b"\n")
                    os.fsync(self._fd)
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError as exc:
                raise AuditError(f"cannot append to audit trail {self.path}: {exc}") from exc
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_record(fd: int, path: Path) -> dict[str, Any] | None:
    """The last line of the file, parsed (read backwards: appends stay O(1))."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    block = 4096
    tail = b""
    pos = size
    while pos > 0:
        step = min(block, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped or pos == 0:
            line = stripped.rsplit(b"\n", 1)[-1]
            try:
                last = json.loads(line)
                if not isinstance(last, dict) or "seq" not in last or "hash" not in last:
                    raise ValueError("not an audit record")
                return last
            except ValueError as exc:
                raise AuditError(f"audit trail {path}: its last line is damaged ({exc});"
                                 " run verify, and start a new file once it is kept") from exc
        block *= 2
    return None


@dataclass
class Verdict:
    """What `verify_trail` found: ok, or the first bad line and what is wrong with it."""

    ok: bool
    records: int
    head: str
    line: int = 0
    problem: str = ""


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            yield number, raw.rstrip(b"\n")


def verify_trail(path: Path) -> Verdict:
    """Check every record of the file; name the first edited, removed or reordered one."""
    try:
        lines = list(_lines(path))
    except OSError as exc:
        raise AuditError(f"cannot read audit trail {path}: {exc}") from exc
    records: list[dict[str, Any]] = []
    for number, raw in lines:
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not {"seq", "prev", "hash", "event"} <= set(rec) \
                    or not isinstance(rec["seq"], int):
                raise ValueError("missing fields")
        except ValueError:
            return Verdict(False, number - 1, records[-1]["hash"] if records else GENESIS,
                           number, "not an audit record (edited or damaged)")
        records.append(rec)
    prev_hash, expected_seq = GENESIS, 1
    for index, rec in enumerate(records):
        found = _check_one(records, index, prev_hash, expected_seq)
        if found:
            line, problem = found
            return Verdict(False, line - 1, records[line - 2]["hash"] if line > 1 else GENESIS,
                           line, problem)
        prev_hash, expected_seq = rec["hash"], rec["seq"] + 1
    return Verdict(True, len(records), prev_hash)


def _check_one(records: list[dict[str, Any]], index: int, prev_hash: str,
               expected_seq: int) -> tuple[int, str] | None:
    rec = records[index]
    number = index + 1
    seq = rec["seq"]
    if seq < expected_seq:
        return number, (f"record seq {seq} is out of order (expected {expected_seq}):"
                        " records were reordered")
    if seq > expected_seq:
        later = any(r.get("seq") == expected_seq for r in records[index + 1:])
        if later:
            return number, (f"record seq {seq} comes before seq {expected_seq}:"
                            " records were reordered")
        if expected_seq == 1:
            return number, f"the trail starts at seq {seq}: records 1..{seq - 1} were removed"
        return number, (f"record(s) seq {expected_seq}..{seq - 1} were removed before"
                        " this line")
    if record_hash(rec) != rec["hash"]:
        return number, "record edited: its hash does not match its content"
    if rec["prev"] != prev_hash:
        if index == 0:
            return number, "the first record does not start the chain (edited)"
        return number - 1, (f"record edited and re-hashed: line {number}'s link to it"
                            " no longer matches")
    return None


def open_trail(folder: Path | None) -> AuditTrail | None:
    """The trail `folder/audit.jsonl`, or None when there is no folder to keep it in."""
    return AuditTrail(Path(folder) / AUDIT_FILE) if folder is not None else None


def record_in(folder: Path, event: str, **data: Any) -> None:
    """Append one record to `folder/audit.jsonl` and close it (fl-keys: each command is
    one short process, and the keys folder is where its trail belongs)."""
    trail = AuditTrail(Path(folder) / AUDIT_FILE)
    try:
        trail.append(event, **data)
    finally:
        trail.close()


def main(argv: list[str] | None = None, prog: str = "fl-audit") -> int:
    """`verify FILE`: exit 0 when intact, 1 naming the first bad line, 2 when unreadable."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Check a hash-chained audit trail (audit.jsonl).")
    sub = parser.add_subparsers(dest="command", required=True)
    ver = sub.add_parser("verify", help="check every record; name the first bad line")
    ver.add_argument("file", type=Path)
    show = sub.add_parser("show", help="print the records as a table")
    show.add_argument("file", type=Path)
    show.add_argument("--last", type=int, default=0, help="only the newest N records")
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            rows = [json.loads(raw) for _, raw in _lines(args.file) if raw.strip()]
            for rec in rows[-args.last:] if args.last else rows:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(rec.get("ts", 0))))
                data = json.dumps(rec.get("data", {}), sort_keys=True)
                print(f"{rec.get('seq', '?'):>6}  {when}Z  {rec.get('event', '?'):<22} {data}")
            return 0
        verdict = verify_trail(args.file)
    except (AuditError, OSError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if verdict.ok:
        print(f"{args.file}: OK, {verdict.records} records, head {verdict.head}")
        return 0
    print(f"{args.file}: line {verdict.line}: {verdict.problem}"
          f" ({verdict.records} records before it verified)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
