"""A tiny CA for unit tests of signed adverts: built with `cryptography` directly so
the tests can make the certificates the project's CA never would (other CA, wrong
role, expired, revoked)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "test-ca") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - timedelta(days=1))
                     .not_valid_after(now + timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.revoked: list[int] = []

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, role: str = "client", *, expired: bool = False
              ) -> tuple[ec.EllipticCurvePrivateKey, bytes, int]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        start, end = ((now - timedelta(days=10), now - timedelta(days=1)) if expired
                      else (now - timedelta(hours=1), now + timedelta(days=10)))
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                            role)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(serial).not_valid_before(start).not_valid_after(end)
                .sign(self.key, hashes.SHA256()))
        return key, cert.public_bytes(serialization.Encoding.PEM), serial

    def crl_pem(self) -> bytes:
        now = datetime.now(UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now).next_update(now + timedelta(days=1)))
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                .build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
