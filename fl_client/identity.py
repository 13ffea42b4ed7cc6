"""A hospital's own identity: its private key, the CSR it sends to the operator, and
loading the signed result for mTLS.

The private key is generated here, at the hospital, and never leaves it: the server
operator only ever sees the CSR (public key + requested name) and sends back a
certificate. That is what lets a new hospital join without anyone else's
certificate being re-issued, and why the operator, not the CSR, decides the role.

CLI: ``python -m fl_client.identity --client_id hospital_1 --out ./identity``.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# File names are derived from client ids, so the alphabet excludes path separators
# and the first character excludes hidden files ("..") and option-like names ("-x").
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# "ca" would collide with the ca.crt copied next to issued client files.
RESERVED_NAMES = frozenset({"ca"})


class IdentityError(Exception):
    """A hospital identity file is missing, unreadable or inconsistent."""


def validate_client_id(client_id: str) -> str:
    """Return `client_id` unchanged, or raise ValueError saying what rule it breaks."""
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ValueError(
            f"invalid client id {client_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if client_id.lower() in RESERVED_NAMES:
        raise ValueError(f"invalid client id {client_id!r}: the name is reserved")
    return client_id


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for an instant.

    The file is created 0600 by os.open (a chmod afterwards would leave a window),
    written under a temporary name and renamed, so a crash never leaves half a key.
    """
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate/CSR/CRL atomically (readers never see half a file)."""
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must survive a power cut, or a "written" key could vanish.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def generate_key_and_csr(
    client_id: str, out_dir: str | os.PathLike[str], *, force: bool = False
) -> tuple[Path, Path]:
    """Create `<out_dir>/<client_id>.key` (EC P-256, 0600) and `<client_id>.csr`.

    Refuses to replace an existing key unless `force`: losing a hospital's key means
    its certificate must be revoked and re-issued.
    """
    validate_client_id(client_id)
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = out / f"{client_id}.key"
    csr_path = out / f"{client_id}.csr"
    if key_path.exists() and not force:
        raise IdentityError(f"{key_path} already exists; pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(key_path, key_pem)
    write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"missing {path} ({what})") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {path} ({what}): {exc.strerror}") from None


def load_client_tls(
    keys_dir: str | os.PathLike[str], client_id: str
) -> tuple[bytes, bytes, bytes]:
    """Return `(ca_pem, cert_pem, key_pem)` for `client_id`, checked for consistency.

    Looks in `keys_dir`, then in `keys_dir/clients` (the layout `fl-keys --issue-client`
    writes in the server's keys dir). Every mismatch a hospital could plausibly make
    (wrong name, key of another CSR, expired certificate, certificate of another CA) is
    reported here by name, rather than as an opaque TLS handshake failure later.
    """
    validate_client_id(client_id)
    base = Path(keys_dir)
    folder = base
    nested = base / "clients"
    if not (base / f"{client_id}.key").exists() and (nested / f"{client_id}.key").exists():
        folder = nested
    key_path = folder / f"{client_id}.key"
    cert_path = folder / f"{client_id}.crt"
    ca_path = folder / "ca.crt"
    key_pem = _read(key_path, "this hospital's private key")
    cert_pem = _read(cert_path, f"the certificate the operator signed for {client_id}")
    ca_pem = _read(ca_path, "the federation's CA certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise IdentityError(f"{cert_path} is not a PEM certificate") from None
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise IdentityError(f"{ca_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{key_path} is not an unencrypted PEM private key") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if cn != client_id:
        raise IdentityError(f"{cert_path} is issued to {cn!r}, not to {client_id!r}")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise IdentityError(f"{cert_path} does not belong to the private key {key_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(f"{cert_path} was not signed by the CA in {ca_path}") from exc
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise IdentityError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return ca_pem, cert_pem, key_pem


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_client.identity",
        description=(
            "Create this hospital's private key and a certificate signing request. "
            "Send only the .csr to the server operator (fl-keys --sign-csr); the .key "
            "stays here."
        ),
    )
    parser.add_argument(
        "--client_id", "--client-id", required=True,
        help="this hospital's client id, which becomes the certificate's CN",
    )
    parser.add_argument(
        "--out", default=".", help="folder for <client_id>.key and <client_id>.csr (default .)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing key")
    args = parser.parse_args(argv)
    try:
        key_path, csr_path = generate_key_and_csr(args.client_id, args.out, force=args.force)
    except (ValueError, IdentityError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"private key (keep it here, 0600): {key_path}")
    print(f"certificate request (send to the operator): {csr_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
