"""Authentication and authorization for every gRPC call, in one interceptor.

Who a caller is comes only from the verified mTLS client certificate (CN = client
id, OU = role); the bearer JWT from Join proves the call belongs to a session
opened over that same certificate (RFC 8705 binding). Service code never parses
either: it reads ``context.identity`` (or ``identity_of(context)``).

Python's ServerInterceptor sees no ServicerContext, so instead of deciding in
``intercept_service`` the interceptor wraps the method handler, and the check runs
inside the call, where ``context.auth_context()`` and ``context.abort`` exist.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from fl_core.constants import PEER_CACHE, ROLE_ADMIN, ROLE_CLIENT
from fl_core.errors import Refusal, abort
from fl_core.ratelimit import RefusalLog, peer_host
from fl_server.grpc_types import Handler, WrappingInterceptor, rewrap
from fl_server.tokens import AuthError, RevocationList, TokenService, cert_sha256

log = logging.getLogger(__name__)

# Roles that may call services at all; a server certificate is not a caller.
CALLER_ROLES = frozenset({ROLE_CLIENT, ROLE_ADMIN})

HEALTH_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)
REFLECTION_METHODS = frozenset(
    {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller of one RPC.

    `session_id` comes from the bearer token; None for the certificate-only (public)
    methods such as Join. Nothing more of the token is kept: a task stream holds its
    Identity for days, on every connection (issue 16: memory per connection).
    """

    client_id: str
    role: str
    cert_sha256: str
    serial: int
    session_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


@dataclass(frozen=True, slots=True)
class _Peer:
    client_id: str
    role: str
    cert_sha256: str
    serial: int


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class _PeerCache:
    """Peer certificates parsed once per distinct PEM (clients reconnect with the same
    certificate for months), so the per-call cost is a hash and a dictionary lookup.

    Keyed by the PEM's SHA-256, not the PEM itself: one entry per connected hospital,
    and the PEM (~1.2 KB) was most of an entry. Bounded (least recently used out)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, pem: bytes) -> _Peer:
        key = hashlib.sha256(pem).digest()
        with self._lock:
            peer = self._peers.get(key)
            if peer is not None:
                self._peers.move_to_end(key)
                return peer
        peer = _read_peer(pem)  # raises AuthError: nothing remembered
        with self._lock:
            self._peers[key] = peer
            while len(self._peers) > self._size:
                self._peers.popitem(last=False)
        return peer

    def clear(self) -> None:
        with self._lock:
            self._peers.clear()


def _read_peer(pem: bytes) -> _Peer:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise AuthError("peer certificate is not parseable") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise AuthError("certificate must carry exactly one CN (client id) and one OU (role)")
    return _Peer(str(cns[0].value), str(ous[0].value), cert_sha256(pem), cert.serial_number)


_parse_peer = _PeerCache(PEER_CACHE)


class AuthenticatedContext:
    """The real ServicerContext plus `.identity`; every other attribute is the real
    context's, so abort, metadata, callbacks and deadlines behave as usual."""

    __slots__ = ("_context", "identity")

    def __init__(self, context: grpc.ServicerContext, identity: Identity) -> None:
        self._context = context
        self.identity = identity

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def identity_of(context: Any) -> Identity:
    """The caller of this RPC, as established by AuthInterceptor."""
    identity = getattr(context, "identity", None)
    if not isinstance(identity, Identity):
        raise RuntimeError(
            "no authenticated identity on this context: is AuthInterceptor installed "
            "on the server?"
        )
    return identity


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        raise AuthError("missing 'authorization: Bearer <token>' metadata (token from Join)")
    if len(values) > 1:
        raise AuthError("more than one authorization metadata entry")
    value = values[0]
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("authorization metadata must be 'Bearer <token>'")
    return token.strip()


class AuthInterceptor(WrappingInterceptor):
    """Runs before every service method: certificate identity, revocation, bearer
    token bound to the certificate, and admin-only methods.

    `public_methods` need only a (valid, unrevoked) certificate: Join, which issues
    the token, and infrastructure such as health checks. `admin_methods` need a
    certificate with role admin; a method in both sets needs an admin certificate
    but no token.
    """

    def __init__(
        self,
        tokens: TokenService,
        revocations: RevocationList,
        public_methods: Iterable[str] = (),
        admin_methods: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self._tokens = tokens
        self._revocations = revocations
        self._public = frozenset(public_methods)
        self._admin = frozenset(admin_methods)
        self._refusal_log = RefusalLog(log)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        def guard(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            # Not a generator even for streaming responses: the check must run (and
            # abort) when the call starts, before the service's generator is created.
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                identity = self._check(context, method)
                # the serving bridge's context forgets the certificate and token now
                drop = getattr(context, "drop_credentials", None)
                if drop is not None:
                    drop()
                return behavior(request, AuthenticatedContext(context, identity))

            return checked

        return rewrap(handler, lambda behavior, _in, _out: guard(behavior))

    def _check(self, context: grpc.ServicerContext, method: str) -> Identity:
        try:
            return self._authenticate(context, method)
        except _Refused as refusal:
            # Rate-limited per address: a client refusing itself in a loop must not
            # write a line per call (counts of the dropped lines are kept).
            self._refusal_log.event(peer_host(context.peer()), "auth_refused",
                                    method=method, code=refusal.code.name,
                                    reason=refusal.message[:200])
            abort(context, refusal.code, refusal.message, refusal.reason)

    def _authenticate(self, context: grpc.ServicerContext, method: str) -> Identity:
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        auth = cast(Mapping[str, list[bytes]], context.auth_context())
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise _Refused(unauthenticated, "no client certificate", Refusal.NO_CERTIFICATE)
        try:
            peer = _parse_peer(bytes(pems[0]))
        except AuthError as exc:
            raise _Refused(unauthenticated, str(exc)) from None
        cns = auth.get("x509_common_name") or []
        if cns and bytes(cns[0]).decode("utf-8", "replace") != peer.client_id:
            raise _Refused(unauthenticated, "certificate common name is inconsistent")
        if peer.role not in CALLER_ROLES:
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate role {peer.role!r} may not call services",
            )
        try:
            revoked = self._revocations.is_revoked(peer.serial)
        except AuthError as exc:
            raise _Refused(unauthenticated, str(exc)) from None
        if revoked:
            raise _Refused(unauthenticated, "certificate revoked", Refusal.CERT_REVOKED)
        session_id: str | None = None
        if method not in self._public:
            try:
                verified = self._tokens.verify(
                    _bearer(context.invocation_metadata()), peer.cert_sha256
                )
            except AuthError as exc:
                raise _Refused(unauthenticated, str(exc), Refusal.BAD_TOKEN) from None
            if verified["sub"] != peer.client_id:
                raise _Refused(
                    unauthenticated,
                    f"token was issued to {verified['sub']!r}, not to this certificate's "
                    f"{peer.client_id!r}",
                )
            if verified["role"] != peer.role:
                raise _Refused(unauthenticated, "token role does not match the certificate")
            sid = verified.get("sid")
            session_id = sid if isinstance(sid, str) else None
        if method in self._admin and peer.role != ROLE_ADMIN:
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs an admin certificate; {peer.client_id!r} has role "
                f"{peer.role!r}",
                Refusal.NOT_ADMIN,
            )
        return Identity(peer.client_id, peer.role, peer.cert_sha256, peer.serial, session_id)
