"""Signed key advertisements: a genuine advert verifies; a swapped key, a replay into
another round, a foreign CA, a wrong name or role, an expired or revoked certificate
are each refused with their own code."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fl_core.secagg import SecAggError
from fl_core.secagg.adverts import Advert, RoundId, Verifier, sign_advert
from tests.secagg.ca_helpers import TestCA

RID = RoundId("job-1", 3, "sess-a")


def _pk() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


def _advert(ca: TestCA, cid: str = "hospital_1", **kw: object) -> tuple[Advert, int]:
    key, pem, serial = ca.issue(cid, **kw)  # type: ignore[arg-type]
    return sign_advert(RID, cid, _pk(), _pk(), key, pem), serial


def _code(verifier: Verifier, advert: Advert, rid: RoundId = RID,
          cid: str = "hospital_1") -> str:
    with pytest.raises(SecAggError) as err:
        verifier.verify(rid, advert, cid)
    return err.value.code


def test_genuine_advert_verifies() -> None:
    ca = TestCA()
    advert, _ = _advert(ca)
    Verifier(ca.pem, ca.crl_pem()).verify(RID, advert, "hospital_1")


def test_swapped_public_key_is_detected() -> None:
    ca = TestCA()
    advert, _ = _advert(ca)
    verifier = Verifier(ca.pem)
    swapped = Advert(advert.client_id, _pk(), advert.share_public_key,
                     advert.certificate_pem, advert.signature)
    assert _code(verifier, swapped) == "BAD_SIGNATURE"
    swapped = Advert(advert.client_id, advert.mask_public_key, _pk(),
                     advert.certificate_pem, advert.signature)
    assert _code(verifier, swapped) == "BAD_SIGNATURE"


def test_replay_into_another_round_or_session_is_detected() -> None:
    ca = TestCA()
    advert, _ = _advert(ca)
    verifier = Verifier(ca.pem)
    assert _code(verifier, advert, RoundId("job-1", 4, "sess-a")) == "BAD_SIGNATURE"
    assert _code(verifier, advert, RoundId("job-1", 3, "sess-b")) == "BAD_SIGNATURE"


def test_advert_of_one_hospital_cannot_be_passed_off_as_another() -> None:
    ca = TestCA()
    advert, _ = _advert(ca)
    assert _code(Verifier(ca.pem), advert, cid="hospital_2") == "BAD_ADVERT"
    # a certificate of hospital_2 signing keys claimed for hospital_1
    key, pem, _ = ca.issue("hospital_2")
    forged = sign_advert(RID, "hospital_1", _pk(), _pk(), key, pem)
    assert _code(Verifier(ca.pem), forged) == "BAD_CERTIFICATE"


def test_a_server_made_certificate_from_another_ca_is_refused() -> None:
    ca, other = TestCA(), TestCA("evil-ca")
    advert, _ = _advert(other)
    assert _code(Verifier(ca.pem), advert) == "BAD_CERTIFICATE"


def test_wrong_role_expired_and_revoked_are_refused() -> None:
    ca = TestCA()
    admin, _ = _advert(ca, role="admin")
    assert _code(Verifier(ca.pem), admin) == "BAD_CERTIFICATE"
    expired, _ = _advert(ca, expired=True)
    assert _code(Verifier(ca.pem), expired) == "BAD_CERTIFICATE"
    advert, serial = _advert(ca)
    ca.revoked.append(serial)
    assert _code(Verifier(ca.pem, ca.crl_pem()), advert) == "REVOKED"


def test_a_crl_not_signed_by_the_ca_is_refused() -> None:
    ca, other = TestCA(), TestCA()
    with pytest.raises(SecAggError):
        Verifier(ca.pem, other.crl_pem())


def test_malformed_keys_are_refused() -> None:
    ca = TestCA()
    key, pem, _ = ca.issue("hospital_1")
    same = os.urandom(32)
    assert _code(Verifier(ca.pem), sign_advert(RID, "hospital_1", same, same, key, pem)) \
        == "BAD_ADVERT"
    assert _code(Verifier(ca.pem), sign_advert(RID, "hospital_1", b"x", _pk(), key, pem)) \
        == "BAD_ADVERT"
