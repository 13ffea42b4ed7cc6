"""Certificates with chosen dates, signed by a test federation's real CA key: the
operator mistakes (an expired server or hospital certificate) made on purpose."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _ca(keys: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((keys / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def sign(keys: Path, public_key: ec.EllipticCurvePublicKey, cn: str, ou: str,
         not_before: datetime, not_after: datetime, server: bool) -> bytes:
    ca_cert, ca_key = _ca(keys)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def replace_server_cert(keys: Path, valid_for: timedelta) -> datetime:
    """A new server key and certificate in `keys`, expiring `valid_for` from now."""
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    (keys / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (keys / "server.key").chmod(0o600)
    (keys / "server.crt").write_bytes(sign(keys, key.public_key(), "fl-server", "server",
                                           now - timedelta(days=2), now + valid_for, True))
    return now + valid_for


def expire_client_cert(keys: Path, site: Path, client_id: str) -> None:
    """Re-sign the hospital's own public key with dates entirely in the past."""
    cert_path = site / f"{client_id}.crt"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    now = datetime.now(UTC)
    cert_path.write_bytes(sign(keys, public, client_id, "client", now - timedelta(days=400),
                               now - timedelta(days=30), False))
