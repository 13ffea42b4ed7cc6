"""The server's memory of verified session tokens (issue 16): a hospital presents the
same token on every call of its session, so its signature is checked once; what can
change since (the time window, the signing key file, the presenting certificate) is
still checked on every call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from fl_core.constants import JWT_LEEWAY_S, JWT_LIFETIME_S
from fl_server import tokens as tokens_module
from fl_server.pki import generate_keys
from fl_server.tokens import AuthError, TokenService


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    generate_keys(keys)
    return keys


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts full verifications (PyJWT's decode still does the work)."""
    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(tokens_module.jwt, "decode", counting)
    return calls


def test_a_session_token_is_verified_once(keys: Path, decodes: list[str]) -> None:
    service = TokenService(keys)
    token, _ = service.issue("h", "client", "cert-a", "s1")
    first = service.verify(token, "cert-a")
    for _ in range(5):
        assert service.verify(token, "cert-a") == first
    assert len(decodes) == 1
    # the claims handed out are copies: a caller changing them changes no later call
    first["sub"] = "someone else"
    assert service.verify(token, "cert-a")["sub"] == "h"


def test_the_binding_is_checked_on_every_call(keys: Path, decodes: list[str]) -> None:
    service = TokenService(keys)
    token, _ = service.issue("h", "client", "cert-a", "s1")
    service.verify(token, "cert-a")
    for _ in range(2):  # never remembered as good for another certificate
        with pytest.raises(AuthError, match="bound to another certificate"):
            service.verify(token, "cert-b")
    assert service.verify(token, "cert-a")["sub"] == "h"


def test_a_remembered_token_still_expires(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = TokenService(keys)
    token, exp = service.issue("h", "client", "cert-a", "s1")
    assert service.verify(token, "cert-a")["exp"] == exp
    real = time.time
    monkeypatch.setattr(tokens_module.time, "time",
                        lambda: real() + JWT_LIFETIME_S + JWT_LEEWAY_S + 1)
    with pytest.raises(AuthError, match="expired"):
        service.verify(token, "cert-a")


def test_a_replaced_signing_key_makes_the_token_verify_afresh(keys: Path,
                                                              decodes: list[str]) -> None:
    service = TokenService(keys)
    token, _ = service.issue("h", "client", "cert-a", "s1")
    service.verify(token, "cert-a")
    kid = jwt.get_unverified_header(token)["kid"]
    other = keys.parent / "other"
    generate_keys(other)
    other_kid = (other / "jwt" / "active").read_text().strip()
    # the same key id now names a different key: the remembered verdict is stale
    (keys / "jwt" / f"{kid}.key").write_bytes((other / "jwt" / f"{other_kid}.key").read_bytes())
    with pytest.raises(AuthError, match="signature does not verify"):
        service.verify(token, "cert-a")
    assert len(decodes) == 2
