"""Name the cause of a failed mutual-TLS connection, and the file that fixes it.

gRPC reports every handshake failure as UNAVAILABLE, the status of a network outage,
with OpenSSL's words folded into `details()` (e.g. "Tls handshake failed
(TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED: unable to get local issuer
certificate", or "Hostname Verification Check failed"): enough to tell a trust failure
from an outage, not always enough to say which certificate is wrong and why. So the
client also dials the server once with Python's `ssl` module, using the same files,
which returns OpenSSL's verify code and lets us read the certificate the server
presents (its names, its issuer's key id, its dates) and put them in the message.

A trust failure does not heal by retrying the way a network outage does: the client
tries a bounded number of times (the server may be rotating its certificate) and then
exits naming the file to fix, instead of backing off for ever.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtensionOID

from fl_core.constants import TLS_PROBE_TIMEOUT_S, TRUST_FAILURE_ATTEMPTS

__all__ = [
    "Cause",
    "Diagnosis",
    "TlsFiles",
    "TrustFailures",
    "client_tls_files",
    "diagnose",
    "explain",
    "from_grpc_details",
    "looks_like_tls",
    "probe",
]

# HTTP/2 connection preface and an empty SETTINGS frame: what a gRPC server expects
# right after the handshake. Sending it makes the server answer (or send its alert).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Cause(enum.Enum):
    """Why a TLS connection failed. `trust` says whether retrying can help."""

    OK = ("ok", False)
    UNRESOLVED = ("the server's name does not resolve", False)
    UNREACHABLE = ("nothing answers at the server's address", False)
    NOT_TLS = ("the server's address does not speak TLS", True)
    UNKNOWN_CA = ("the server's certificate is not signed by our CA", True)
    NAME_MISMATCH = ("the server's certificate is for another name", True)
    SERVER_CERT_EXPIRED = ("the server's certificate has expired", True)
    SERVER_CERT_NOT_YET_VALID = ("the server's certificate is not valid yet", True)
    SERVER_CERT_REVOKED = ("the server's certificate is revoked", True)
    SERVER_CERT_WRONG_PURPOSE = ("the server presents a certificate not made for a server", True)
    CLIENT_CERT_REJECTED = ("the server refused this site's certificate", True)
    CLIENT_CERT_EXPIRED = ("the server says this site's certificate has expired", True)
    CLIENT_CERT_REVOKED = ("this site's certificate is revoked", True)
    OTHER_TLS = ("the TLS handshake failed", True)

    def __init__(self, summary: str, trust: bool) -> None:
        self.summary = summary
        self.trust = trust


@dataclass(frozen=True)
class TlsFiles:
    """The three files a site's mutual TLS is built from (for messages that name them)."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    detail: str  # what was seen, in the operator's words
    fix: str  # what to change, naming the file

    @property
    def trust(self) -> bool:
        return self.cause.trust

    def line(self) -> str:
        text = f"{self.cause.summary}: {self.detail}" if self.detail else self.cause.summary
        return f"{text}; fix: {self.fix}" if self.fix else text


# ------------------------------------------------------------------ gRPC's words

# Substrings of grpc-core / BoringSSL / OpenSSL messages (lower-cased), most specific first.
_GRPC_PATTERNS: tuple[tuple[str, Cause], ...] = (
    ("hostname verification check failed", Cause.NAME_MISMATCH),
    ("no match found for server name", Cause.NAME_MISMATCH),
    ("certificate has expired", Cause.SERVER_CERT_EXPIRED),
    ("certificate is not yet valid", Cause.SERVER_CERT_NOT_YET_VALID),
    ("certificate revoked", Cause.SERVER_CERT_REVOKED),
    ("unable to get local issuer certificate", Cause.UNKNOWN_CA),
    ("unable to get issuer certificate", Cause.UNKNOWN_CA),
    ("self-signed certificate", Cause.UNKNOWN_CA),
    ("self signed certificate", Cause.UNKNOWN_CA),
    ("certificate signature failure", Cause.UNKNOWN_CA),
    ("unable to verify the first certificate", Cause.UNKNOWN_CA),
    ("alert_certificate_expired", Cause.CLIENT_CERT_EXPIRED),
    ("alert_certificate_revoked", Cause.CLIENT_CERT_REVOKED),
    ("alert_unknown_ca", Cause.CLIENT_CERT_REJECTED),
    ("alert_bad_certificate", Cause.CLIENT_CERT_REJECTED),
    ("alert_certificate_required", Cause.CLIENT_CERT_REJECTED),
    ("alert_handshake_failure", Cause.OTHER_TLS),
    ("wrong_version_number", Cause.NOT_TLS),
    ("wrong version number", Cause.NOT_TLS),
    ("packet_length_too_long", Cause.NOT_TLS),
)
_TLS_MARKERS = ("tls handshake failed", "ssl_error", "tsi_", "handshake", "certificate",
                "custom verification", "ssl routines", "alert")


def looks_like_tls(details: str | None) -> bool:
    """Whether a gRPC error's details speak of TLS rather than of the network."""
    text = (details or "").lower()
    return any(marker in text for marker in _TLS_MARKERS)


def from_grpc_details(details: str | None) -> Cause | None:
    """The cause gRPC's details name, OTHER_TLS for an unnamed TLS failure, else None."""
    text = (details or "").lower()
    for pattern, cause in _GRPC_PATTERNS:
        if pattern in text:
            return cause
    return Cause.OTHER_TLS if looks_like_tls(text) else None


# --------------------------------------------------------------------- the probe

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h).
_VERIFY_CODES: dict[int, Cause] = {
    2: Cause.UNKNOWN_CA, 7: Cause.UNKNOWN_CA, 18: Cause.UNKNOWN_CA, 19: Cause.UNKNOWN_CA,
    20: Cause.UNKNOWN_CA, 21: Cause.UNKNOWN_CA,
    9: Cause.SERVER_CERT_NOT_YET_VALID, 10: Cause.SERVER_CERT_EXPIRED,
    23: Cause.SERVER_CERT_REVOKED, 26: Cause.SERVER_CERT_WRONG_PURPOSE,
    62: Cause.NAME_MISMATCH, 64: Cause.NAME_MISMATCH,
}  # fmt: skip
# OpenSSL reasons of an alert the server sent about our certificate.
_ALERTS: dict[str, Cause] = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": Cause.CLIENT_CERT_EXPIRED,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": Cause.CLIENT_CERT_REVOKED,
    "TLSV1_ALERT_UNKNOWN_CA": Cause.CLIENT_CERT_REJECTED,
    "SSLV3_ALERT_BAD_CERTIFICATE": Cause.CLIENT_CERT_REJECTED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": Cause.CLIENT_CERT_REJECTED,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": Cause.CLIENT_CERT_REJECTED,
    "TLSV1_ALERT_DECRYPT_ERROR": Cause.CLIENT_CERT_REJECTED,
    "WRONG_VERSION_NUMBER": Cause.NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": Cause.NOT_TLS,
    "RECORD_LAYER_FAILURE": Cause.NOT_TLS,
}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _context(files: TlsFiles, verify: bool, client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    if client_cert:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    if verify:
        ctx.load_verify_locations(cafile=str(files.ca))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _server_certificate(host: str, port: int, files: TlsFiles, name: str,
                        timeout: float) -> x509.Certificate | None:
    """The certificate the server presents, read without verifying it (for messages)."""
    try:
        with _connect(host, port, timeout) as raw, _context(files, verify=False).wrap_socket(
                raw, server_hostname=None if _is_ip(name) else name) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    assert isinstance(san, x509.SubjectAlternativeName)
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def _key_id(cert: x509.Certificate, issuer: bool) -> str:
    try:
        if issuer:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            return (aki.key_identifier or b"").hex()[:16] or "?"
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return ski.digest.hex()[:16]
    except x509.ExtensionNotFound:
        return "?"


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _now() -> datetime:
    return datetime.now(UTC)


def explain(cause: Cause, files: TlsFiles, address: str, name: str,
            server_cert: x509.Certificate | None, seen: str = "") -> Diagnosis:
    """The operator's message for `cause`: what was seen and which file to fix."""
    now = f"{_now():%Y-%m-%d %H:%M} UTC"
    if cause is Cause.OK:
        return Diagnosis(cause, f"TLS to {address} works with {files.cert}", "")
    if cause is Cause.UNRESOLVED:
        return Diagnosis(cause, f"{name!r} ({seen})" if seen else repr(name),
                         "check the host in --server_url and this machine's DNS (/etc/hosts)")
    if cause is Cause.UNREACHABLE:
        return Diagnosis(cause, f"{address} ({seen})" if seen else address,
                         "check that the server runs, the port, and any firewall between")
    if cause is Cause.NOT_TLS:
        return Diagnosis(cause, f"{address} answers, but not with TLS ({seen})",
                         "check the port in --server_url: it must be the fl-server's port")
    if cause is Cause.UNKNOWN_CA:
        ours = _load_cert(files.ca)
        detail = f"{address} presents a certificate not signed by {files.ca}"
        if server_cert is not None and ours is not None:
            detail += (f" (its issuer's key id {_key_id(server_cert, issuer=True)},"
                       f" {files.ca}'s key id {_key_id(ours, issuer=False)})")
        return Diagnosis(cause, detail,
                         f"get the federation's ca.crt from the operator into {files.ca}, or"
                         " check that --server_url points at this federation's server")
    if cause is Cause.NAME_MISMATCH:
        names = ", ".join(_names(server_cert)) if server_cert is not None else "other names"
        return Diagnosis(cause, f"it is for {names}; this client checks {name!r}",
                         "dial the server by one of those names in --server_url (or set"
                         " --server_name to one), or ask the operator to re-issue server.crt"
                         f" with --san {name}")
    if cause in (Cause.SERVER_CERT_EXPIRED, Cause.SERVER_CERT_NOT_YET_VALID):
        if server_cert is not None:
            window = (f"valid {server_cert.not_valid_before_utc:%Y-%m-%d %H:%M} to"
                      f" {server_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        else:
            window = "outside its validity"
        return Diagnosis(cause, f"{window}; this machine's clock reads {now}",
                         "if this clock is right, the operator must renew keys/server.crt"
                         " on the server; if not, fix this machine's clock (NTP)")
    if cause is Cause.SERVER_CERT_REVOKED:
        return Diagnosis(cause, address, "the operator must issue a new keys/server.crt")
    if cause is Cause.SERVER_CERT_WRONG_PURPOSE:
        return Diagnosis(cause, f"{address} presents a client or CA certificate",
                         "the operator must serve keys/server.crt (from fl-keys"
                         " --generate-keys) or check --server_url")
    mine = _load_cert(files.cert)
    if cause is Cause.CLIENT_CERT_EXPIRED:
        until = f" (valid until {mine.not_valid_after_utc:%Y-%m-%d})" if mine else ""
        return Diagnosis(cause, f"{files.cert}{until}; this machine's clock reads {now}",
                         f"send a new CSR for {files.key} to the operator and put the signed"
                         f" certificate in {files.cert}; or fix the server's clock")
    if cause is Cause.CLIENT_CERT_REVOKED:
        return Diagnosis(cause, f"the operator revoked {files.cert}",
                         "make a new key and CSR (python -m fl_client.identity) and ask the"
                         f" operator to sign it; put the result in {files.cert}")
    if cause is Cause.CLIENT_CERT_REJECTED:
        return Diagnosis(cause, f"{address} does not accept {files.cert}"
                         + (f" ({seen})" if seen else ""),
                         f"{files.cert} must be signed by the CA the server uses: send"
                         f" {files.key}'s CSR to this federation's operator and check that"
                         " --server_url is this federation's server")
    return Diagnosis(cause, f"{address}: {seen}" if seen else address,
                     f"check {files.ca}, {files.cert} and {files.key} with"
                     " python -m fl_client.doctor")


def probe(host: str, port: int, files: TlsFiles, server_name: str | None = None,
          timeout: float = TLS_PROBE_TIMEOUT_S, client_cert: bool = True) -> Diagnosis:
    """Dial `host:port` with Python's ssl and the site's files; say what happens.

    Checks what gRPC checks (chain to `files.ca`, the name, the dates), then sends the
    HTTP/2 preface: under TLS 1.3 the server judges our certificate only after our
    side of the handshake has finished, so its verdict arrives on the first read.
    `client_cert=False` checks the server's side only (for a site whose own key or
    certificate is known to be broken): the server then refuses us, which says nothing.
    """
    name = server_name or host
    address = f"{host}:{port}"
    try:
        raw = _connect(host, port, timeout)
    except socket.gaierror as exc:
        return explain(Cause.UNRESOLVED, files, address, name, None, exc.strerror or str(exc))
    except OSError as exc:
        return explain(Cause.UNREACHABLE, files, address, name, None,
                       exc.strerror or type(exc).__name__)
    try:
        ctx = _context(files, verify=True, client_cert=client_cert)
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        return Diagnosis(Cause.OTHER_TLS, f"cannot load {files.cert}, {files.key} or"
                         f" {files.ca}: {exc}", "check those files with the doctor")
    cause, seen = Cause.OK, ""
    handshaken = False  # our side of the handshake is done; the server's verdict follows
    try:
        with ctx.wrap_socket(raw, server_hostname=name, do_handshake_on_connect=False) as tls:
            tls.settimeout(timeout)
            tls.do_handshake()
            handshaken = True
            if client_cert:
                tls.sendall(_H2_PREFACE)
                try:
                    if not tls.recv(1):
                        # grpc-core closes without an alert when it refuses our certificate
                        cause, seen = Cause.CLIENT_CERT_REJECTED, "closed after the handshake"
                except TimeoutError:
                    pass  # the server waits for more: it accepted us
    except ssl.SSLCertVerificationError as exc:
        cause = _VERIFY_CODES.get(exc.verify_code, Cause.OTHER_TLS)
        seen = exc.verify_message
    except ssl.SSLError as exc:
        cause = _ALERTS.get(exc.reason or "", Cause.OTHER_TLS)
        if handshaken and cause is Cause.OTHER_TLS:  # e.g. EOF instead of an alert
            cause = Cause.CLIENT_CERT_REJECTED
        seen = exc.reason or str(exc)
    except (ConnectionResetError, BrokenPipeError) as exc:
        cause = Cause.CLIENT_CERT_REJECTED if handshaken else Cause.OTHER_TLS
        seen = f"connection reset ({exc.strerror})"
    except OSError as exc:
        cause, seen = Cause.UNREACHABLE, exc.strerror or type(exc).__name__
    finally:
        raw.close()
    server_cert = None
    if cause in (Cause.UNKNOWN_CA, Cause.NAME_MISMATCH, Cause.SERVER_CERT_EXPIRED,
                 Cause.SERVER_CERT_NOT_YET_VALID):
        server_cert = _server_certificate(host, port, files, name, timeout)
        if cause is Cause.UNKNOWN_CA and server_cert is not None:
            cause = _refine_unknown_ca(server_cert, files)
    return explain(cause, files, address, name, server_cert, seen)


def _refine_unknown_ca(server_cert: x509.Certificate, files: TlsFiles) -> Cause:
    """OpenSSL says "unknown issuer" before it looks at dates; if our CA did sign an
    out-of-date certificate, the dates are the real story."""
    ca = _load_cert(files.ca)
    if ca is None:
        return Cause.UNKNOWN_CA
    try:
        server_cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Cause.UNKNOWN_CA
    if server_cert.not_valid_after_utc <= _now():
        return Cause.SERVER_CERT_EXPIRED
    if server_cert.not_valid_before_utc > _now():
        return Cause.SERVER_CERT_NOT_YET_VALID
    return Cause.UNKNOWN_CA


def diagnose(details: str | None, host: str, port: int, files: TlsFiles,
             server_name: str | None = None) -> Diagnosis | None:
    """A trust failure behind a gRPC UNAVAILABLE, or None for a network problem.

    The probe decides, because gRPC's details do not always speak of TLS (a server
    refusing our certificate just closes: "Socket closed"). When the probe connects
    fine but gRPC named a certificate problem, gRPC's cause stands; when the probe
    cannot connect at all, it is an outage (the server may be restarting).
    """
    found = probe(host, port, files, server_name)
    if found.trust:
        return found
    grpc_cause = from_grpc_details(details)
    if found.cause is Cause.OK and grpc_cause is not None and grpc_cause is not Cause.OTHER_TLS:
        return explain(grpc_cause, files, f"{host}:{port}", server_name or host, None,
                       (details or "")[-200:])
    return None


def client_tls_files(keys_dir: Path, client_id: str) -> TlsFiles:
    """The files a client daemon loads (`keys_dir`, else `keys_dir/clients`, the layout
    `fl-keys --issue-client` writes), so messages name the very files in use."""
    folder = Path(keys_dir)
    nested = folder / "clients"
    if not (folder / f"{client_id}.key").exists() and (nested / f"{client_id}.key").exists():
        folder = nested
    return TlsFiles(folder / "ca.crt", folder / f"{client_id}.crt", folder / f"{client_id}.key")


class TrustFailures:
    """Consecutive trust failures of one client's connection.

    `check` runs the probe after a gRPC UNAVAILABLE and returns the diagnosis when it
    is a trust failure; `exhausted` turns true after `attempts` of them in a row, and
    a successful join `reset`s the count. Network outages are never counted.
    """

    def __init__(self, host: str, port: int, files: TlsFiles, server_name: str | None = None,
                 attempts: int = TRUST_FAILURE_ATTEMPTS) -> None:
        self.host, self.port, self.files, self.server_name = host, port, files, server_name
        self.attempts = attempts
        self.count = 0

    def check(self, details: str | None) -> Diagnosis | None:
        found = diagnose(details, self.host, self.port, self.files, self.server_name)
        self.count = self.count + 1 if found is not None else 0
        return found

    @property
    def exhausted(self) -> bool:
        return self.count >= self.attempts

    def reset(self) -> None:
        self.count = 0
