"""What the running server checks on every call: certificate identities, the
revocation list (re-read when it changes) and session JWTs (EdDSA, kid-rotated,
bound to the client certificate, RFC 8705).

The offline side of the same trust (the CA, signing, revocation, key rotation: the
fl-keys CLI) is fl_server/pki.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from fl_core.constants import (
    JWT_AUDIENCE,
    JWT_ISSUER,
    JWT_LEEWAY_S,
    JWT_LIFETIME_S,
    VERIFIED_TOKEN_CACHE,
)
from fl_server.keyfiles import (
    KeysError,
    b64url,
    load_cert_file,
    load_crl,
    read_key_file,
    read_private_key_file,
)

_KID_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


_MAX_TOKEN_BYTES = 8192


_REQUIRED_CLAIMS = ["exp", "nbf", "iat", "aud", "iss", "jti", "sub", "cnf", "role"]


class AuthError(Exception):
    """A certificate, token or revocation check refused a caller; the message says why."""


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def cert_sha256(der_or_pem: bytes | str) -> str:
    """RFC 8705 ``x5t#S256``: base64url (no padding) SHA-256 of the certificate's DER.

    This is what binds a token to the certificate it was issued over.
    """
    data = der_or_pem.encode("ascii") if isinstance(der_or_pem, str) else der_or_pem
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            data = x509.load_pem_x509_certificate(data).public_bytes(
                serialization.Encoding.DER
            )
        except ValueError:
            raise AuthError("not a PEM certificate") from None
    return b64url(hashlib.sha256(data).digest())


def identity_from_pem(pem: bytes | str) -> tuple[str, str]:
    """`(client_id, role)` of a certificate: its CN and OU, as the CA wrote them."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise AuthError("not a PEM certificate") from None
    cn = _name_attr(cert.subject, NameOID.COMMON_NAME)
    ou = _name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn:
        raise AuthError("certificate has no single common name (client id)")
    if not ou:
        raise AuthError(f"certificate of {cn!r} has no single organizational unit (role)")
    return cn, ou


class RevocationList:
    """crl.pem as the running server sees it, re-read whenever the file changes.

    Every call costs one stat; the CRL is parsed and its signature checked against
    the CA only when the file's identity (inode, mtime, size) changes, so a revocation
    takes effect on the next call without a restart. A CRL that is missing or not
    signed by the CA fails closed: every check raises AuthError.
    """

    def __init__(self, keys_dir: str | os.PathLike[str]) -> None:
        base = Path(keys_dir)
        self._path = base / "crl.pem"
        self._ca = load_cert_file(base / "ca.crt", "CA certificate")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._error: str | None = None
        self.generation = 0  # bumped whenever a changed file is read
        self._refresh()
        if self._error is not None:
            raise KeysError(self._error)

    def _refresh(self) -> None:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            self._stamp, self._error = None, f"cannot read {self._path}: {exc.strerror}"
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                crl = load_crl(self._path, self._ca)
            except KeysError as exc:
                self._stamp, self._error = stamp, str(exc)
                return
            self._serials = frozenset(entry.serial_number for entry in crl)
            self._stamp, self._error = stamp, None
            self.generation += 1

    def changed_since(self, generation: int) -> bool:
        """Whether the file changed (re-read now if it did) since `generation`, or is
        unusable: either way calls that were let in before must check again."""
        self._refresh()
        return self.generation != generation or self._error is not None

    def is_revoked(self, serial: int) -> bool:
        self._refresh()
        if self._error is not None:
            raise AuthError(f"revocation list unusable: {self._error}")
        return serial in self._serials


class TokenService:
    """Session JWTs: EdDSA, short-lived, kid-rotated, bound to a client certificate.

    The signing key is whichever jwt/active names (re-read when it changes, so
    ``--rotate-jwt-key`` needs no restart); verification accepts any key still in
    jwt/. `clock` exists so tests can mint genuinely expired or future tokens.
    """

    def __init__(
        self, keys_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._dir = Path(keys_dir) / "jwt"
        self._clock = clock
        self._lock = threading.Lock()
        self._active_stamp: tuple[int, int, int] | None = None
        self._active: tuple[str, ed25519.Ed25519PrivateKey] | None = None
        self._public: dict[str, tuple[tuple[int, int, int], ed25519.Ed25519PublicKey]] = {}
        # SHA-256 of (token, certificate) -> what was verified (_Verified): a session
        # presents one token on every call, so its signature and claims are checked
        # once; a hit re-checks only what can change (the clock, the signing key file).
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()
        self._signer()  # fail at start-up, not at the first Join

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load_private(self, kid: str) -> ed25519.Ed25519PrivateKey:
        path = self._dir / f"{kid}.key"
        try:
            pem = read_private_key_file(path, "token key")
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise KeysError(f"{path} is not an unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeysError(f"{path} is not an Ed25519 key")
        return key

    def _signer(self) -> tuple[str, ed25519.Ed25519PrivateKey]:
        active_path = self._dir / "active"
        stamp = self._stamp(active_path)
        with self._lock:
            if self._active is not None and stamp == self._active_stamp:
                return self._active
            raw = read_key_file(active_path, "active token key id")
            kid = raw.decode("ascii", "replace").strip()
            if not _valid_kid(kid):
                raise KeysError(f"{active_path} does not hold a valid key id")
            self._active = (kid, self._load_private(kid))
            self._active_stamp = stamp
            return self._active

    def _verifier(self, kid: str) -> ed25519.Ed25519PublicKey:
        """The public key for `kid`, re-checked with a stat so a deleted key file
        stops verifying at once."""
        if not _valid_kid(kid):
            raise AuthError("token refused: malformed key id (kid)")
        path = self._dir / f"{kid}.key"
        stamp = self._stamp(path)
        if stamp is None:
            raise AuthError(f"token refused: unknown signing key id {kid!r}")
        with self._lock:
            cached = self._public.get(kid)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        try:
            public = self._load_private(kid).public_key()
        except KeysError as exc:
            raise AuthError(f"token refused: signing key {kid!r} unusable ({exc})") from None
        with self._lock:
            self._public[kid] = (stamp, public)
        return public

    @property
    def active_kid(self) -> str:
        return self._signer()[0]

    def issue(
        self, client_id: str, role: str, cert_sha256: str, session_id: str
    ) -> tuple[str, int]:
        """A token for `client_id` usable only over the certificate `cert_sha256`;
        returns `(jwt, exp)` with exp in Unix seconds."""
        kid, key = self._signer()
        iat = int(self._clock())
        exp = iat + JWT_LIFETIME_S
        claims = {
            "iss": JWT_ISSUER,
            "aud": JWT_AUDIENCE,
            "sub": client_id,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": str(uuid.uuid4()),
            "sid": session_id,
            "role": role,
            "cnf": {"x5t#S256": cert_sha256},
        }
        token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"})
        return token, exp

    def verify(self, token: str, cert_sha256: str) -> dict[str, Any]:
        """The token's claims if it is ours, current and bound to `cert_sha256`.

        The algorithm is pinned to EdDSA before any key is chosen, so `none` and
        HS256-keyed-with-our-public-key tokens fail on the header alone.

        A token already verified for this certificate is not parsed or verified
        again (a hospital makes several calls a round with one token; the EdDSA check
        and JWT parsing were most of the interceptor's cost): the cached claims are
        returned after the checks whose outcome can change since, the time window
        (exp, nbf, iat with the same leeway) and the signing key file (deleted or
        replaced: verified afresh, so a removed key stops verifying at once).
        """
        if not token or len(token) > _MAX_TOKEN_BYTES:
            raise AuthError("token refused: empty or oversized")
        key = hashlib.sha256(f"{cert_sha256}\n{token}".encode()).digest()
        with self._lock:
            cached = self._verified.get(key)
            if cached is not None:
                self._verified.move_to_end(key)
        if cached is not None and self._stamp(self._dir / f"{cached.kid}.key") == cached.stamp:
            now = time.time()
            if now >= cached.exp + JWT_LEEWAY_S:
                raise AuthError("token refused: expired")
            if max(cached.nbf, cached.iat) > now + JWT_LEEWAY_S:
                raise AuthError("token refused: not yet valid (nbf/iat in the future)")
            return cached.claims(cert_sha256)
        claims, kid = self._verify_fully(token, cert_sha256)
        stamp_now = self._stamp(self._dir / f"{kid}.key")
        if stamp_now is not None:
            verified = _Verified.of(claims, kid, stamp_now)
            if verified is not None:
                with self._lock:
                    self._verified[key] = verified
                    while len(self._verified) > VERIFIED_TOKEN_CACHE:
                        self._verified.popitem(last=False)
        return claims

    def _verify_fully(self, token: str, cert_sha256: str) -> tuple[dict[str, Any], str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"token refused: malformed ({exc})") from None
        alg = header.get("alg")
        if alg != "EdDSA":
            raise AuthError(f"token refused: algorithm {alg!r} is not allowed (EdDSA only)")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("token refused: no key id (kid) in its header")
        key = self._verifier(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                audience=JWT_AUDIENCE,
                issuer=JWT_ISSUER,
                leeway=JWT_LEEWAY_S,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token refused: expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token refused: not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"token refused: audience is not {JWT_AUDIENCE!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"token refused: issuer is not {JWT_ISSUER!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token refused: signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token refused: missing claim {exc.claim!r}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"token refused: {exc}") from None
        cnf = claims.get("cnf")
        bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        if not isinstance(bound, str) or not hmac.compare_digest(bound, cert_sha256):
            raise AuthError("token refused: bound to another certificate (cnf x5t#S256)")
        if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("role"), str):
            raise AuthError("token refused: sub and role must be strings")
        return claims, kid


class _Verified:
    """A verified token as the cache keeps it: the claims' values, not their dict.

    One per session (a connected hospital has one): the decoded claims dict with its
    nested `cnf` and the token string as the key were ~1.6 KB of it (issue 16: memory
    per connection). Only tokens of the shape `issue` makes are kept (exactly its
    claims; issuer and audience are ours, `cnf` the verified certificate's), so the
    claims rebuilt on a hit equal the ones decoded."""

    __slots__ = ("exp", "iat", "jti", "kid", "nbf", "role", "sid", "stamp", "sub")

    def __init__(self, claims: dict[str, Any], kid: str, stamp: tuple[int, int, int]) -> None:
        self.exp, self.nbf, self.iat = claims["exp"], claims["nbf"], claims["iat"]
        self.sub, self.role, self.jti = claims["sub"], claims["role"], claims["jti"]
        self.sid = claims["sid"]
        self.kid, self.stamp = kid, stamp

    @classmethod
    def of(cls, claims: dict[str, Any], kid: str,
           stamp: tuple[int, int, int]) -> _Verified | None:
        """The entry for `claims`, or None for a token not shaped as ours."""
        if claims.keys() != _ISSUED_CLAIMS or claims["iss"] != JWT_ISSUER \
                or claims["aud"] != JWT_AUDIENCE or len(claims["cnf"]) != 1:
            return None
        if not all(isinstance(claims[k], int | float) for k in ("exp", "nbf", "iat")):
            return None
        return cls(claims, kid, stamp)

    def claims(self, cert_sha256: str) -> dict[str, Any]:
        """A fresh dict each call: a caller changing it changes no later call."""
        return {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": self.sub, "iat": self.iat,
                "nbf": self.nbf, "exp": self.exp, "jti": self.jti, "sid": self.sid,
                "role": self.role, "cnf": {"x5t#S256": cert_sha256}}


# The claims `TokenService.issue` writes (a verified token's `cnf` is already checked).
_ISSUED_CLAIMS = frozenset({"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "sid", "role",
                            "cnf"})


def _valid_kid(kid: str) -> bool:
    # The kid becomes a file name: anything but base64url characters could walk the
    # filesystem ("../../server").
    return 0 < len(kid) <= 64 and all(ch in _KID_ALPHABET for ch in kid)

