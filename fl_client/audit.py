"""The hospital's own audit trail (STATE_DIR/audit.jsonl), and its verify command:

    python -m fl_client.audit verify STATE_DIR/audit.jsonl

Why the hospital keeps it: its privacy officer must be able to show, from records
the server never touches, every transfer that left the site (job, round, stream,
the update's digest, bytes, epsilon charged, whether secure aggregation hid it, and
which server certificate received it) and every refusal. The format and the checks
(hash chain, fsync, first bad line) live in fl_core.audit.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from fl_core.audit import AuditError, AuditTrail, open_trail
from fl_core.audit import main as audit_main
from fl_core.tls import parse_server_url

log = logging.getLogger("fl_client.audit")

FINGERPRINT_TTL_S = 300.0
HANDSHAKE_TIMEOUT_S = 10.0


def _tls_file(keys_dir: Path, name: str) -> Path:
    """As fl_client.identity looks for them: keys_dir, then keys_dir/clients."""
    direct = keys_dir / name
    return direct if direct.exists() else keys_dir / "clients" / name


def server_fingerprint(server_url: str, keys_dir: Path, client_id: str,
                       server_name: str | None) -> str:
    """SHA-256 of the server certificate, read in a verified mTLS handshake with the
    hospital's own certificate against its CA (gRPC does not expose the peer
    certificate to a client); 'unverified: <why>' when that handshake fails."""
    host, port = parse_server_url(server_url)
    ctx = ssl.create_default_context(cafile=str(_tls_file(keys_dir, "ca.crt")))
    ctx.load_cert_chain(str(_tls_file(keys_dir, f"{client_id}.crt")),
                        str(_tls_file(keys_dir, f"{client_id}.key")))
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name or host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        return f"unverified: {exc}"[:200]
    return hashlib.sha256(der or b"").hexdigest()


class ClientAudit:
    """What the client daemon records; each method is one record."""

    def __init__(self, state_dir: Path, server_url: str, keys_dir: Path, client_id: str,
                 server_name: str | None = None) -> None:
        self.trail: AuditTrail | None = open_trail(state_dir)
        self._server = (server_url, keys_dir, client_id, server_name)
        self._fingerprint = ("", 0.0)

    def fingerprint(self) -> str:
        value, when = self._fingerprint
        if not value or time.monotonic() - when > FINGERPRINT_TTL_S:
            value = server_fingerprint(*self._server)
            self._fingerprint = (value, time.monotonic())
        return value

    def _append(self, event: str, **data: Any) -> None:
        if self.trail is None:
            return
        try:
            self.trail.append(event, **data)
        except AuditError as exc:
            log.error("audit record not written: %s", exc)

    def started(self, **settings: Any) -> None:
        self._append("client_started", **settings)

    def update_sent(self, job_id: str, round_no: int, stream_id: str, digest: bytes,
                    nbytes: int, epsilon_round: float, dp_enabled: bool) -> None:
        self._append("update_sent", job=job_id, round=round_no, stream=stream_id,
                     manifest_sha256=digest.hex(), bytes=nbytes, epsilon_charged=epsilon_round,
                     dp_enabled=dp_enabled, secure_aggregation=False,
                     server_cert_sha256=self.fingerprint())

    def report_sent(self, job_id: str, round_no: int, kind: str, status: str, reason: str,
                    metrics: dict[str, float]) -> None:
        event = "refusal" if status == "REFUSED" else "report_sent"
        self._append(event, job=job_id, round=round_no, kind=kind, status=status,
                     reason=reason, metrics=metrics, server_cert_sha256=self.fingerprint())

    def refused_by_server(self, job_id: str, round_no: int, reason: str) -> None:
        self._append("refused_by_server", job=job_id, round=round_no, reason=reason)


def main(argv: list[str] | None = None) -> int:
    return audit_main(argv, prog="python -m fl_client.audit")


if __name__ == "__main__":
    sys.exit(main())
