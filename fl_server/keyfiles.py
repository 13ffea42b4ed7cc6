"""Reading the federation's keys folder: every file problem is a KeysError naming the
file and what it is for, so an operator fixes the right thing.

Shared by the offline CA tooling (fl_server/pki.py) and what the running server
loads at start and checks on every call (fl_server/tokens.py).
"""

from __future__ import annotations

import base64
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


class KeysError(Exception):
    """The keys directory is missing, incomplete, unreadable or inconsistent."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeysError(f"missing {path} ({what})") from None
    except OSError as exc:
        raise KeysError(f"cannot read {path} ({what}): {exc.strerror}") from None


def read_private_key_file(path: Path, what: str) -> bytes:
    """A private key file's bytes, refused when the group or others may read or write
    it: a key others can read is a key others may have copied, and starting anyway
    would hide that. The error names the chmod that fixes it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeysError(f"missing {path} ({what})") from None
    except OSError as exc:
        raise KeysError(f"cannot read {path} ({what}): {exc.strerror}") from None
    if stat.S_ISREG(mode) and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeysError(f"{path} ({what}) is accessible to group or others (mode"
                        f" {stat.S_IMODE(mode):04o}): run `chmod 600 {path}` (and check who"
                        " may have copied it)")
    return read_key_file(path, what)


def load_cert_file(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_key_file(path, what))
    except ValueError:
        raise KeysError(f"{path} ({what}) is not a PEM certificate") from None


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(read_key_file(path, "certificate revocation list"))
    except ValueError:
        raise KeysError(f"{path} is not a PEM certificate revocation list") from None
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise KeysError(f"{path} was not issued by the CA in ca.crt")
    if not crl.is_signature_valid(public_key):
        raise KeysError(f"{path} has an invalid signature: it was not signed by the CA")
    return crl


def load_server_tls(keys_dir: str | os.PathLike[str]) -> tuple[bytes, bytes, bytes]:
    """`(cert_pem, key_pem, ca_pem)` for the server's mTLS credentials."""
    base = Path(keys_dir)
    if not base.is_dir():
        raise KeysError(f"keys directory {base} does not exist; run fl-keys --generate-keys")
    cert_pem = read_key_file(base / "server.crt", "server certificate")
    key_pem = read_private_key_file(base / "server.key", "server private key")
    if (base / "ca.key").exists():  # the CA key may live offline; if it is here, private
        read_private_key_file(base / "ca.key", "CA private key")
    ca_pem = read_key_file(base / "ca.crt", "CA certificate")
    # Checked here so a wrong or damaged file is named, instead of gRPC failing later
    # with "Failed to bind to address" (which sends an operator looking at the port).
    cert = load_cert_file(base / "server.crt", "server certificate")
    ca = load_cert_file(base / "ca.crt", "CA certificate")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise KeysError(
            f"{base / 'server.key'} (server private key) is not an unencrypted PEM private key"
        ) from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise KeysError(f"{base / 'server.key'} does not belong to {base / 'server.crt'}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KeysError(
            f"{base / 'server.crt'} was not signed by the CA in {base / 'ca.crt'}"
        ) from None
    if cert.not_valid_after_utc <= utc_now():
        raise KeysError(f"{base / 'server.crt'} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert_pem, key_pem, ca_pem

