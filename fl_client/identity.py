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
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fl_core.identity import (
    IdentityError,
    generate_key_and_csr,
    validate_client_id,
)


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
