"""Identity rules both daemons share: what a client id may be, how a hospital's key
and CSR are made, and how private and public files are written.

The server's CA tooling (fl_server/pki.py) and the hospital's side
(fl_client/identity.py) both use these, so the server never imports the client.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from cryptography import x509
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


def client_id_key(client_id: str) -> str:
    """The form two names are compared in for uniqueness: case-folded, trailing dots
    dropped, so HOSPITAL_1 and "hospital_1." are the same identity as hospital_1 (a
    person reading a certificate, a log or a DNS-like name would take them for one)."""
    return client_id.rstrip(".").casefold()


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
