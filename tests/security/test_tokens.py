"""TokenService, RevocationList and certificate helpers against real keys: every way
a token can be wrong must end in AuthError, and a right one must pass."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fl_client.identity import load_client_tls
from fl_core.identity import IdentityError
from fl_server.keyfiles import KeysError
from fl_server.pki import generate_keys, issue_identity, revoke, rotate_jwt_key
from fl_server.tokens import AuthError, RevocationList, TokenService, cert_sha256, identity_from_pem
from tests.security.jwt_forge import (
    active_key,
    b64url,
    forge,
    good_claims,
    hs256_with_public_key,
    none_alg_token,
)


@pytest.fixture(scope="module")
def shas(keys_dir: Path) -> dict[str, str]:
    return {
        name: cert_sha256((keys_dir / "clients" / f"{name}.crt").read_bytes())
        for name in ("hospital_a", "hospital_b", "admin_1")
    }


@pytest.fixture(scope="module")
def tokens(keys_dir: Path) -> TokenService:
    return TokenService(keys_dir)


def test_issued_token_verifies_with_all_claims(
    tokens: TokenService, shas: dict[str, str]
) -> None:
    before = int(time.time())
    token, exp = tokens.issue("hospital_a", "client", shas["hospital_a"], "sess-1")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == tokens.active_kid
    claims = tokens.verify(token, shas["hospital_a"])
    assert claims["sub"] == "hospital_a" and claims["role"] == "client"
    assert claims["sid"] == "sess-1" and claims["exp"] == exp
    assert claims["iss"] == "fl-server" and claims["aud"] == "fl-server"
    assert claims["cnf"] == {"x5t#S256": shas["hospital_a"]}
    assert before <= claims["iat"] <= claims["nbf"] + 1 and exp == claims["iat"] + 600
    other, _ = tokens.issue("hospital_a", "client", shas["hospital_a"], "sess-1")
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != claims["jti"]


def refused(tokens: TokenService, token: str, sha: str, reason: str) -> None:
    with pytest.raises(AuthError, match=reason):
        tokens.verify(token, sha)


def test_expired_token(keys_dir: Path, tokens: TokenService, shas: dict[str, str]) -> None:
    old = TokenService(keys_dir, clock=lambda: time.time() - 3600)
    token, _ = old.issue("hospital_a", "client", shas["hospital_a"], "s")
    refused(tokens, token, shas["hospital_a"], "expired")


def test_not_yet_valid_token(keys_dir: Path, tokens: TokenService, shas: dict[str, str]) -> None:
    future = TokenService(keys_dir, clock=lambda: time.time() + 3600)
    token, _ = future.issue("hospital_a", "client", shas["hospital_a"], "s")
    refused(tokens, token, shas["hospital_a"], "not yet valid")


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "evil-issuer"}, "issuer"),
        ({"jti": None}, "missing claim 'jti'"),
        ({"cnf": None}, "missing claim 'cnf'"),
        ({"exp": None}, "missing claim 'exp'"),
        ({"sub": None}, "missing claim 'sub'"),
        ({"cnf": {"x5t": "abc"}}, "another certificate"),
    ],
)
def test_wrong_claims_signed_by_the_real_key(
    keys_dir: Path, tokens: TokenService, shas: dict[str, str],
    override: dict[str, object], reason: str,
) -> None:
    kid, key = active_key(keys_dir)
    claims = good_claims("hospital_a", shas["hospital_a"], **override)
    token = forge({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims, key.sign)
    refused(tokens, token, shas["hospital_a"], reason)


def test_forged_good_claims_with_real_key_pass(
    keys_dir: Path, tokens: TokenService, shas: dict[str, str]
) -> None:
    # The control for the forgeries below: the same construction with the real key
    # and alg is accepted, so each refusal is due to the one thing changed.
    kid, key = active_key(keys_dir)
    token = forge(
        {"alg": "EdDSA", "typ": "JWT", "kid": kid},
        good_claims("hospital_a", shas["hospital_a"]),
        key.sign,
    )
    assert tokens.verify(token, shas["hospital_a"])["sub"] == "hospital_a"


def test_alg_none(keys_dir: Path, tokens: TokenService, shas: dict[str, str]) -> None:
    kid, _ = active_key(keys_dir)
    token = none_alg_token(kid, good_claims("hospital_a", shas["hospital_a"]))
    refused(tokens, token, shas["hospital_a"], "algorithm 'none'")
    refused(tokens, token.rsplit(".", 1)[0] + ".", shas["hospital_a"], "algorithm 'none'")


@pytest.mark.parametrize("pem", [False, True])
def test_hs256_keyed_with_the_public_key(
    keys_dir: Path, tokens: TokenService, shas: dict[str, str], pem: bool
) -> None:
    kid, key = active_key(keys_dir)
    token = hs256_with_public_key(kid, good_claims("hospital_a", shas["hospital_a"]), key, pem)
    refused(tokens, token, shas["hospital_a"], "algorithm 'HS256'")


def test_signed_by_another_key_under_our_kid(
    keys_dir: Path, tokens: TokenService, shas: dict[str, str]
) -> None:
    kid, _ = active_key(keys_dir)
    stranger = ed25519.Ed25519PrivateKey.generate()
    token = forge(
        {"alg": "EdDSA", "typ": "JWT", "kid": kid},
        good_claims("hospital_a", shas["hospital_a"]),
        stranger.sign,
    )
    refused(tokens, token, shas["hospital_a"], "signature does not verify")


@pytest.mark.parametrize(
    ("kid", "reason"),
    [
        ("x" * 43, "unknown signing key"),
        ("../server", "malformed key id"),
        ("../../etc/passwd", "malformed key id"),
        (None, "no key id"),
    ],
)
def test_unknown_or_hostile_kid(
    tokens: TokenService, shas: dict[str, str], kid: str | None, reason: str
) -> None:
    stranger = ed25519.Ed25519PrivateKey.generate()
    header = {"alg": "EdDSA", "typ": "JWT", "kid": kid}
    token = forge(
        {k: v for k, v in header.items() if v is not None},
        good_claims("hospital_a", shas["hospital_a"]),
        stranger.sign,
    )
    refused(tokens, token, shas["hospital_a"], reason)


def test_token_presented_over_another_certificate(
    tokens: TokenService, shas: dict[str, str]
) -> None:
    token, _ = tokens.issue("hospital_a", "client", shas["hospital_a"], "s")
    refused(tokens, token, shas["hospital_b"], "bound to another certificate")


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "." * 3, "x" * 10_000])
def test_malformed_tokens(tokens: TokenService, shas: dict[str, str], junk: str) -> None:
    with pytest.raises(AuthError):
        tokens.verify(junk, shas["hospital_a"])


def test_tampered_payload(tokens: TokenService, shas: dict[str, str]) -> None:
    token, _ = tokens.issue("hospital_a", "client", shas["hospital_a"], "s")
    head, _, sig = token.split(".")
    import json

    claims = good_claims("admin_1", shas["hospital_a"], role="admin")
    body = b64url(json.dumps(claims).encode())
    refused(tokens, f"{head}.{body}.{sig}", shas["hospital_a"], "signature does not verify")


def test_rotation_keeps_old_tokens_until_their_key_is_removed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first_kid = generate_keys(keys)
    service = TokenService(keys)
    old, _ = service.issue("h", "client", "sha", "s")
    new_kid = rotate_jwt_key(keys)
    assert new_kid != first_kid
    new, _ = service.issue("h", "client", "sha", "s")  # picks up jwt/active without restart
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert service.verify(old, "sha")["sub"] == "h"
    assert service.verify(new, "sha")["sub"] == "h"
    (keys / "jwt" / f"{first_kid}.key").unlink()
    with pytest.raises(AuthError, match="unknown signing key"):
        service.verify(old, "sha")
    assert service.verify(new, "sha")["sub"] == "h"


def test_token_service_without_keys_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="active token key id"):
        TokenService(tmp_path)


def test_revocation_list_reloads_and_checks_signature(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    _, cert_path = issue_identity(keys, "h1", "client")
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    crl = RevocationList(keys)
    assert crl.is_revoked(serial) is False
    assert revoke(keys, "h1") == (serial, True)
    assert crl.is_revoked(serial) is True  # no restart: the file changed
    assert revoke(keys, "h1") == (serial, False)
    # A CRL signed by another CA (e.g. planted by someone with write access but
    # not the CA key) fails closed rather than un-revoking anyone.
    other = tmp_path / "other"
    generate_keys(other)
    os.replace(other / "crl.pem", keys / "crl.pem")
    with pytest.raises(AuthError, match="not issued by the CA|invalid signature"):
        crl.is_revoked(serial)
    (keys / "crl.pem").unlink()
    with pytest.raises(AuthError, match="revocation list unusable"):
        crl.is_revoked(serial)
    with pytest.raises(KeysError, match="crl.pem"):
        RevocationList(keys)


def test_certificate_helpers(keys_dir: Path) -> None:
    pem = (keys_dir / "clients" / "admin_1.crt").read_bytes()
    assert identity_from_pem(pem) == ("admin_1", "admin")
    assert identity_from_pem((keys_dir / "server.crt").read_text()) == ("fl-server", "server")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    sha = cert_sha256(pem)
    assert sha == cert_sha256(der) == cert_sha256(pem.decode())
    assert len(sha) == 43 and "=" not in sha
    with pytest.raises(AuthError):
        identity_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_load_client_tls_layouts_and_errors(keys_dir: Path, tmp_path: Path) -> None:
    ca, cert, key = load_client_tls(keys_dir, "hospital_a")  # finds clients/
    assert ca == (keys_dir / "ca.crt").read_bytes()
    assert load_client_tls(keys_dir / "clients", "hospital_a") == (ca, cert, key)
    with pytest.raises(IdentityError, match=r"missing .*nobody\.key"):
        load_client_tls(keys_dir, "nobody")
    # A hospital that mixes up its files gets told which one is wrong.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "hospital_a.key").write_bytes(key)
    with pytest.raises(IdentityError, match=r"hospital_a\.crt"):
        load_client_tls(mixed, "hospital_a")
    (mixed / "hospital_a.crt").write_bytes((keys_dir / "clients" / "hospital_b.crt").read_bytes())
    (mixed / "ca.crt").write_bytes(ca)
    with pytest.raises(IdentityError, match="issued to 'hospital_b'"):
        load_client_tls(mixed, "hospital_a")
    (mixed / "hospital_a.crt").write_bytes(cert)
    (mixed / "hospital_a.key").write_bytes((keys_dir / "clients" / "hospital_b.key").read_bytes())
    with pytest.raises(IdentityError, match="does not belong to the private key"):
        load_client_tls(mixed, "hospital_a")
    (mixed / "hospital_a.key").write_bytes(key)
    other = tmp_path / "other"
    generate_keys(other)
    (mixed / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    with pytest.raises(IdentityError, match="not signed by the CA"):
        load_client_tls(mixed, "hospital_a")
    with pytest.raises(ValueError, match="invalid client id"):
        load_client_tls(mixed, "../etc")
