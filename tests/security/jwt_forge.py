"""Hand-built JWTs for attack tests.

PyJWT refuses to produce some of the tokens an attacker would (alg none with a kid,
HS256 keyed with an asymmetric public key), so these are assembled byte by byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fl_core.constants import JWT_AUDIENCE, JWT_ISSUER, JWT_LIFETIME_S


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    ).encode("ascii")
    return signing_input.decode("ascii") + "." + b64url(sign(signing_input))


def good_claims(sub: str, cert_sha: str, /, **overrides: Any) -> dict[str, Any]:
    """Claims as TokenService would issue them; an override of None drops the claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + JWT_LIFETIME_S,
        "jti": str(uuid.uuid4()),
        "sid": "s-1",
        "role": "client",
        "cnf": {"x5t#S256": cert_sha},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def active_key(keys_dir: Path) -> tuple[str, ed25519.Ed25519PrivateKey]:
    kid = (keys_dir / "jwt" / "active").read_text().strip()
    key = serialization.load_pem_private_key(
        (keys_dir / "jwt" / f"{kid}.key").read_bytes(), password=None
    )
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return kid, key


def signed_by(key: ed25519.Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    return key.sign


def none_alg_token(kid: str, claims: dict[str, Any]) -> str:
    return forge({"alg": "none", "typ": "JWT", "kid": kid}, claims, lambda _: b"")


def hs256_with_public_key(
    kid: str, claims: dict[str, Any], key: ed25519.Ed25519PrivateKey, pem: bool = False
) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the server's public key,
    hoping the verifier feeds its (public) key to whatever alg the header names."""
    public = key.public_key()
    secret = (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if pem
        else public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return forge(
        {"alg": "HS256", "typ": "JWT", "kid": kid},
        claims,
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
