"""What a connected hospital's call keeps on the server once it is authenticated
(issue 16 item 4: memory per idle connection), over real mTLS on the serving bridge.

An open task stream lives for days, so the bridge forgets the peer's certificate and
the call's metadata (its bearer token) once the authentication interceptor has read
them; what later code needs must still be there: the identity for the services, the
caller's common name for the refusal audit. The token and certificate caches keep
digests and values instead of the texts, and must answer exactly as before.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from fl_client.identity import load_client_tls
from fl_core import tls
from fl_core.errors import abort
from fl_server import audit
from fl_server import auth as auth_module
from fl_server import tokens as tokens_module
from fl_server.auth import AuthInterceptor, identity_of
from fl_server.grpc_types import Handler
from fl_server.keyfiles import load_server_tls
from fl_server.pki import generate_keys, issue_identity
from fl_server.serving import KEPT_AUTH_PROPERTIES, AioServer
from fl_server.tokens import RevocationList, TokenService, cert_sha256

SERVICE = "test.Memory"
TIMEOUT = 10.0


def _ident(b: bytes) -> bytes:
    return b


class Service:
    """Records what a handler sees of its call after the interceptors ran."""

    def __init__(self, tokens: TokenService) -> None:
        self.tokens = tokens
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def _record(self, context: Any) -> None:
        with self.lock:
            self.seen.append({"auth": dict(context.auth_context()),
                              "metadata": context.invocation_metadata(),
                              "identity": identity_of(context)})

    def join(self, request: bytes, context: Any) -> bytes:
        who = identity_of(context)
        token, _ = self.tokens.issue(who.client_id, who.role, who.cert_sha256, "session-1")
        return token.encode()

    def look(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._record(context)
        yield b"seen"
        yield b"again"

    def refuse(self, request: bytes, context: Any) -> bytes:
        self._record(context)
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, request.decode(), "NOT_NOW")

    def handlers(self) -> dict[str, Handler]:
        kw: dict[str, Any] = {"request_deserializer": _ident, "response_serializer": _ident}
        return {"Join": grpc.unary_unary_rpc_method_handler(self.join, **kw),
                "Look": grpc.unary_stream_rpc_method_handler(self.look, **kw),
                "Refuse": grpc.unary_unary_rpc_method_handler(self.refuse, **kw)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Any]]:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    generate_keys(keys)
    issue_identity(keys, "hospital_a", "client")
    tokens = TokenService(keys)
    service = Service(tokens)
    interceptor = AuthInterceptor(tokens, RevocationList(keys),
                                  public_methods={f"/{SERVICE}/Join"})
    server = AioServer(max_workers=2, interceptors=[audit.RefusalObserver(), interceptor],
                       options=tls.SERVER_OPTIONS)
    server.add_registered_method_handlers(SERVICE, service.handlers())
    port = server.add_secure_port("127.0.0.1:0",
                                  tls.server_credentials(*load_server_tls(keys)))
    server.start()
    ca, cert, key = load_client_tls(keys, "hospital_a")
    channel = grpc.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(ca, cert, key),
                                  options=tls.channel_options())
    try:
        yield service, channel
    finally:
        channel.close()
        assert server.stop(1.0).wait(10)


def _method(channel: grpc.Channel, kind: str, name: str) -> Any:
    make = channel.unary_stream if kind == "us" else channel.unary_unary
    return make(f"/{SERVICE}/{name}", request_serializer=_ident,
                response_deserializer=_ident, _registered_method=True)


def _bearer(channel: grpc.Channel) -> list[tuple[str, str]]:
    token = _method(channel, "uu", "Join")(b"", timeout=TIMEOUT).decode()
    return [("authorization", f"Bearer {token}")]


def test_an_authenticated_call_keeps_only_the_callers_name(served: Any) -> None:
    """The handler sees the identity the interceptor established, the certificate's
    common name and nothing else of the auth context, and no metadata."""
    service, channel = served
    metadata = _bearer(channel)
    service.seen.clear()
    stream = _method(channel, "us", "Look")(b"", metadata=metadata, timeout=TIMEOUT)
    assert list(stream) == [b"seen", b"again"]
    [seen] = service.seen
    assert seen["auth"] == {"x509_common_name": [b"hospital_a"]}
    assert set(seen["auth"]) == set(KEPT_AUTH_PROPERTIES)
    assert seen["metadata"] is None
    identity = seen["identity"]
    assert (identity.client_id, identity.role, identity.session_id) == \
        ("hospital_a", "client", "session-1")


def test_a_refusal_after_authentication_is_audited_with_the_caller(served: Any) -> None:
    service, channel = served
    metadata = _bearer(channel)
    message = f"refused-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as info:
        _method(channel, "uu", "Refuse")(message.encode(), metadata=metadata, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    def events() -> list[tuple[str, str]]:
        return [(e["kind"], e["client_id"]) for e in audit.recent_events()
                if message in e["message"]]

    deadline = time.monotonic() + TIMEOUT  # recorded once the handler's thread unwinds
    while not events() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert events() == [("refusal", "hospital_a")]


def test_a_token_not_shaped_as_issued_is_verified_every_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache keeps only tokens whose claims it can give back exactly: one with a
    claim `issue` does not write is verified in full each time, and its claims come
    back whole."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    service = TokenService(keys)
    token, _ = service.issue("h", "client", "cert-a", "s1")
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    private = service._load_private(kid)
    extra = jwt.encode({**claims, "scope": "more"}, private, algorithm="EdDSA",
                       headers={"kid": kid, "typ": "JWT"})
    decodes: list[str] = []
    real = jwt.decode

    def counting(text: str, *args: Any, **kwargs: Any) -> Any:
        decodes.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokens_module.jwt, "decode", counting)
    for _ in range(3):
        assert service.verify(extra, "cert-a")["scope"] == "more"
        assert service.verify(token, "cert-a") == claims
    assert decodes.count(extra) == 3 and decodes.count(token) == 1


def test_a_peer_certificate_is_parsed_once_and_the_cache_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    pems = []
    for name in ("h1", "h2", "h3"):
        issue_identity(keys, name, "client")
        pems.append(load_client_tls(keys, name)[1])
    parsed: list[bytes] = []
    real = auth_module._read_peer

    def counting(pem: bytes) -> Any:
        parsed.append(pem)
        return real(pem)

    monkeypatch.setattr(auth_module, "_read_peer", counting)
    cache = auth_module._PeerCache(2)
    first = cache(pems[0])
    assert cache(bytes(pems[0])) is first and len(parsed) == 1
    assert (first.client_id, first.role, first.cert_sha256) == \
        ("h1", "client", cert_sha256(pems[0]))
    cache(pems[1])
    cache(pems[2])  # h1, the least recently used, goes
    assert cache(pems[2]).client_id == "h3" and len(parsed) == 3
    assert cache(pems[0]).client_id == "h1" and len(parsed) == 4
    with pytest.raises(tokens_module.AuthError):
        cache(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
