"""Key advertisements signed with the hospital's certificate key.

Each round, every selected hospital makes two fresh X25519 key pairs (one to agree
pairwise mask seeds, one to encrypt shares to its neighbours) and signs both public
keys, with the job, round, session and its own id, using the EC P-256 private key
of the certificate the federation's CA issued to it. Peers check the signature, the
certificate chain (issued by the CA, in its validity window, role "client", name
equal to the claimed id) and the CA-signed CRL before using either key.

That is what stops a server from playing man-in-the-middle: Flower's SecAgg+ takes
whatever public keys the server relays, so a server that substitutes its own keys
can unmask a hospital. Here a substituted key fails the signature check, and the
hospital aborts the round before training (no privacy budget spent).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl_core.constants import PROTOCOL_VERSION, ROLE_CLIENT
from fl_core.secagg import SecAggError

BAD_ADVERT = "BAD_ADVERT"
BAD_SIGNATURE = "BAD_SIGNATURE"
BAD_CERTIFICATE = "BAD_CERTIFICATE"
REVOKED = "REVOKED"
PUBLIC_KEY_BYTES = 32


def lp(*fields: bytes) -> bytes:
    """Length-prefixed concatenation: no two field lists encode to the same bytes."""
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


@dataclass(frozen=True)
class RoundId:
    """What every secure-aggregation message of one attempt is bound to. The session
    id is fresh per attempt, so nothing of an earlier attempt can be replayed."""

    job_id: str
    round: int
    session_id: str

    def encode(self) -> bytes:
        return lp(self.job_id.encode(), self.round.to_bytes(8, "big"), self.session_id.encode())


@dataclass(frozen=True)
class Advert:
    client_id: str
    mask_public_key: bytes
    share_public_key: bytes
    certificate_pem: bytes
    signature: bytes


def signed_bytes(rid: RoundId, client_id: str, mask_pk: bytes, share_pk: bytes) -> bytes:
    return lp(PROTOCOL_VERSION.encode(), b"secagg-advert", rid.encode(), client_id.encode(),
              mask_pk, share_pk)


def sign_advert(rid: RoundId, client_id: str, mask_pk: bytes, share_pk: bytes,
                private_key: ec.EllipticCurvePrivateKey, certificate_pem: bytes) -> Advert:
    signature = private_key.sign(signed_bytes(rid, client_id, mask_pk, share_pk),
                                 ec.ECDSA(hashes.SHA256()))
    return Advert(client_id, mask_pk, share_pk, certificate_pem, signature)


def _one(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if len(attrs) == 1 else ""


# Certificates already found to be issued by a CA, by (CA, certificate PEM): each
# hospital checks the same peers' certificates every round, and the issuer's
# signature over a certificate never changes. Everything that can change (validity
# window, revocation, name, role) and the advert's own signature is checked on every
# use; only the chain signature is remembered. Bounded; cleared when full.
_ISSUED: dict[tuple[bytes, bytes], x509.Certificate] = {}
_ISSUED_MAX = 4096
# CRLs already found to be signed by a CA, by (CA, CRL PEM): their revoked serials.
_CRLS: dict[tuple[bytes, bytes], frozenset[int]] = {}
_CRLS_MAX = 64


def _remember(cache: dict[Any, Any], limit: int, key: Any, value: Any) -> None:
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


class Verifier:
    """Checks peers' adverts against the federation's CA and its CRL."""

    def __init__(self, ca_pem: bytes, crl_pem: bytes | None = None) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self._ca_der = self.ca.public_bytes(serialization.Encoding.DER)
        self.revoked: frozenset[int] = frozenset()
        if crl_pem:
            self.set_crl(crl_pem)

    def set_crl(self, crl_pem: bytes) -> None:
        """Takes a CRL only if the CA signed it (the server relays it, cannot forge it)."""
        known = _CRLS.get((self._ca_der, crl_pem))
        if known is not None:
            self.revoked = known
            return
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError:
            raise SecAggError(BAD_CERTIFICATE, "the relayed CRL is not PEM") from None
        public_key = self.ca.public_key()
        if crl.issuer != self.ca.subject or not isinstance(public_key, ec.EllipticCurvePublicKey)\
                or not crl.is_signature_valid(public_key):
            raise SecAggError(BAD_CERTIFICATE, "the relayed CRL was not signed by the CA")
        self.revoked = frozenset(entry.serial_number for entry in crl)
        _remember(_CRLS, _CRLS_MAX, (self._ca_der, bytes(crl_pem)), self.revoked)

    def _issued(self, who: str, certificate_pem: bytes) -> x509.Certificate:
        """The certificate, once its issuer's signature is found to be the CA's."""
        key = (self._ca_der, certificate_pem)
        cert = _ISSUED.get(key)
        if cert is not None:
            return cert
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError:
            raise SecAggError(BAD_CERTIFICATE, f"{who}: certificate is not PEM") from None
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise SecAggError(BAD_CERTIFICATE,
                              f"{who}: certificate was not issued by the federation's CA") from None
        _remember(_ISSUED, _ISSUED_MAX, key, cert)
        return cert

    def verify(self, rid: RoundId, advert: Advert, expected_id: str) -> None:
        """Raises SecAggError naming the peer unless the advert is genuinely theirs."""
        who = expected_id
        if advert.client_id != expected_id:
            raise SecAggError(BAD_ADVERT, f"advert for {expected_id!r} names"
                              f" {advert.client_id!r}")
        if len(advert.mask_public_key) != PUBLIC_KEY_BYTES or \
                len(advert.share_public_key) != PUBLIC_KEY_BYTES:
            raise SecAggError(BAD_ADVERT, f"{who}: public keys must be {PUBLIC_KEY_BYTES} bytes")
        if advert.mask_public_key == advert.share_public_key:
            raise SecAggError(BAD_ADVERT, f"{who}: the two public keys must differ")
        cert = self._issued(who, bytes(advert.certificate_pem))
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise SecAggError(BAD_CERTIFICATE, f"{who}: certificate is not valid now")
        if _one(cert.subject, NameOID.COMMON_NAME) != expected_id:
            raise SecAggError(BAD_CERTIFICATE, f"{who}: certificate is issued to"
                              f" {_one(cert.subject, NameOID.COMMON_NAME)!r}")
        if _one(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) != ROLE_CLIENT:
            raise SecAggError(BAD_CERTIFICATE, f"{who}: certificate is not a hospital's")
        if cert.serial_number in self.revoked:
            raise SecAggError(REVOKED, f"{who}: certificate is revoked")
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SecAggError(BAD_CERTIFICATE, f"{who}: certificate key is not EC")
        try:
            public_key.verify(advert.signature, signed_bytes(
                rid, advert.client_id, advert.mask_public_key, advert.share_public_key),
                ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SecAggError(BAD_SIGNATURE, f"{who}: the advertised keys are not signed by"
                              " its certificate (substituted or replayed)") from None
