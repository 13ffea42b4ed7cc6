"""The pieces both doctors (`python -m fl_client.doctor`, `python -m fl_server.doctor`)
are made of: one result per check, printed as one line with its fix, and the
certificate and key checks both kinds of site need.

A doctor is for the hour before a site goes live, when the operator can still fix a
file: every check runs even after one fails (so one run lists everything that is
wrong), and each failing line names the file and the command that fixes it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from fl_core.constants import CERT_EXPIRY_WARN_DAYS

__all__ = ["FAIL", "OK", "SKIP", "WARN", "CertFiles", "Check", "bind_problem",
           "check_cert_files", "check_port", "check_resolves", "check_writable", "report"]

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN, FAIL or SKIP
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return f"{text} -> fix: {self.fix}" if self.fix and self.status != OK else text


def report(checks: Iterable[Check], stream: IO[str] | None = None) -> int:
    """Print one line per check; 1 when any check FAILed, else 0."""
    out = stream or sys.stdout
    failed = 0
    for check in checks:
        print(check.line(), file=out, flush=True)
        failed += check.status == FAIL
    print(f"{'FAIL' if failed else 'OK'}: {failed} check(s) failed", file=out)
    return 1 if failed else 0


@dataclass(frozen=True)
class CertFiles:
    """A site's certificate, its key and the CA that should have signed it; `how` says
    how to get a new certificate (differs for a hospital and for the server)."""

    ca: Path
    cert: Path
    key: Path
    who: str  # "this hospital's" / "the server's"
    renew: str


def _load_cert(path: Path) -> tuple[x509.Certificate | None, str]:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()), ""
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    except ValueError:
        return None, "not a PEM certificate"


def _load_key(path: Path) -> tuple[PrivateKeyTypes | None, str]:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None), ""
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    except (ValueError, TypeError):
        return None, "not an unencrypted PEM private key"


def _dates(name: str, cert: x509.Certificate, path: Path, renew: str,
           now: datetime) -> Check:
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if after <= now:
        return Check(FAIL, name, f"{path} expired on {after:%Y-%m-%d %H:%M} UTC", renew)
    if before > now:
        return Check(FAIL, name, f"{path} is valid only from {before:%Y-%m-%d %H:%M} UTC;"
                     f" this machine's clock reads {now:%Y-%m-%d %H:%M} UTC",
                     "fix this machine's clock (NTP), or " + renew)
    left = after - now
    if left < timedelta(days=CERT_EXPIRY_WARN_DAYS):
        return Check(WARN, name, f"{path} expires in {left.days} days"
                     f" ({after:%Y-%m-%d})", renew)
    return Check(OK, name, f"{path} valid until {after:%Y-%m-%d} ({left.days} days)")


def _private(path: Path) -> Check | None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check(FAIL, "key permissions", f"{path} is readable by others"
                     f" (mode {stat.S_IMODE(mode):04o})", f"chmod 600 {path}")
    return Check(OK, "key permissions", f"{path} is private (mode {stat.S_IMODE(mode):04o})")


def check_cert_files(files: CertFiles, now: datetime | None = None) -> list[Check]:
    """Present and readable, key matches certificate, certificate signed by the CA,
    both within their dates, key not readable by others."""
    now = now or datetime.now(UTC)
    checks: list[Check] = []
    ca, ca_problem = _load_cert(files.ca)
    cert, cert_problem = _load_cert(files.cert)
    key, key_problem = _load_key(files.key)
    for path, problem, what in ((files.ca, ca_problem, "the federation's CA certificate"),
                                (files.cert, cert_problem, f"{files.who} certificate"),
                                (files.key, key_problem, f"{files.who} private key")):
        if problem:
            fix = ("get ca.crt from the federation's operator" if path == files.ca
                   else files.renew)
            checks.append(Check(FAIL, "file", f"{path} ({what}) is {problem}", fix))
        else:
            checks.append(Check(OK, "file", f"{path} ({what})"))
    if key is not None:
        perms = _private(files.key)
        if perms is not None:
            checks.append(perms)
    if cert is not None and key is not None:
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki):
            checks.append(Check(OK, "key matches certificate", f"{files.key} <-> {files.cert}"))
        else:
            checks.append(Check(FAIL, "key matches certificate",
                                f"{files.cert} does not belong to {files.key}",
                                f"put the certificate issued for {files.key}'s CSR in"
                                f" {files.cert}, or {files.renew}"))
    if cert is not None and ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
            checks.append(Check(OK, "certificate chain", f"{files.cert} is signed by {files.ca}"))
        except (ValueError, TypeError, InvalidSignature):
            checks.append(Check(FAIL, "certificate chain",
                                f"{files.cert} is not signed by the CA in {files.ca}",
                                f"{files.ca} and {files.cert} must come from the same"
                                f" federation: get ca.crt from the operator, or {files.renew}"))
    if cert is not None:
        checks.append(_dates("certificate dates", cert, files.cert, files.renew, now))
    if ca is not None:
        checks.append(_dates("CA dates", ca, files.ca,
                             "the operator must create a new CA and re-issue every"
                             " certificate", now))
    return checks


def check_resolves(host: str, port: int, name: str = "name resolution") -> Check:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Check(FAIL, name, f"{host!r} does not resolve ({exc.strerror})",
                     "check the host name and this machine's DNS or /etc/hosts")
    addresses = sorted({str(info[4][0]) for info in infos})
    return Check(OK, name, f"{host} -> {', '.join(addresses)}")


def check_port(host: str, port: int, timeout: float) -> Check:
    """Something accepts TCP connections at host:port (the client's side)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Check(OK, "port reachable", f"{host}:{port} accepts connections")
    except OSError as exc:
        return Check(FAIL, "port reachable", f"{host}:{port}:"
                     f" {exc.strerror or type(exc).__name__}",
                     "check that the server runs, the port in --server_url, and any"
                     " firewall between")


def check_writable(folder: Path, name: str = "state folder") -> Check:
    """`folder` exists (or can be made) and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".doctor-{os.getpid()}.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return Check(FAIL, name, f"{folder} is not writable ({exc.strerror})",
                     f"create {folder} and give the daemon's user write access to it")
    free = os.statvfs(folder)
    free_gib = free.f_bavail * free.f_frsize / 2**30
    if free_gib < 1:
        return Check(WARN, name, f"{folder} is writable, {free_gib:.2f} GiB free",
                     "free some disk space: checkpoints and spools need room")
    return Check(OK, name, f"{folder} is writable, {free_gib:.1f} GiB free")


def bind_problem(host: str, port: int) -> tuple[str, str] | None:
    """None if `host:port` can be bound now, else (the OS's reason, the fix).

    The same question gRPC answers only with "Failed to bind"; SO_REUSEPORT is not set
    here, so a port another server holds is reported as in use.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (f"{host}:{port} is in use by another process",
                    "stop it (another fl-server?) or choose another --port")
        if exc.errno == errno.EADDRNOTAVAIL:
            return (f"{host} is not an address of this machine",
                    "use 0.0.0.0 or one of this machine's addresses for --host")
        if exc.errno == errno.EACCES:
            return f"port {port} needs privileges", "use a port above 1023"
        return f"{host}:{port}: {exc.strerror or exc}", "check --host and --port"
    return None
