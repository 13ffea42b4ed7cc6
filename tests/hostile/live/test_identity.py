"""Transport and identity attacks against the real server: certificates that must not
get in, and tokens that must not be accepted. Every case runs inside a frozen round
(conftest.Arena.frozen_round): the server stays SERVING, the model and its checkpoint
do not move while the attack runs, and the round then completes on the honest update."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fl_core.tls import channel_options
from fl_proto import aggregator_pb2 as apb
from fl_proto import aggregator_pb2_grpc as apb_grpc
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from fl_server.pki import generate_keys, issue_identity, revoke
from fl_server.tokens import cert_sha256
from tests.hostile.kit import (
    TIMEOUT,
    HostileClient,
    Identity,
    forged_certificate,
    load_ca,
    refused,
    tls_probe,
    wait_for,
)
from tests.hostile.live.arena import BYSTANDER, EVIL, REVOKED, Arena
from tests.security.jwt_forge import (
    active_key,
    forge,
    good_claims,
    hs256_with_public_key,
    none_alg_token,
    signed_by,
)

pytestmark = pytest.mark.slow


def join_with(arena: Arena, ident: Identity | grpc.ChannelCredentials) -> Callable[[], Any]:
    creds = ident.credentials() if isinstance(ident, Identity) else ident

    def call() -> Any:
        with grpc.secure_channel(f"127.0.0.1:{arena.port}", creds,
                                 options=channel_options()) as channel:
            return cpb_grpc.CoordinatorStub(channel).Join(
                cpb.JoinRequest(x25519_public_key=b"\x09" * 32, model_type="breast_cancer",
                                num_examples=10), timeout=TIMEOUT)
    return call


def assert_handshake_refused(arena: Arena, cert: bytes, key: bytes) -> None:
    """Refused in the TLS handshake: no byte of HTTP/2 ever comes back, and a gRPC
    call over the same certificate never reaches a service (UNAVAILABLE)."""
    ca = (arena.keys / "ca.crt").read_bytes()
    probe = tls_probe(arena.port, ca, cert, key)
    assert probe.refused, probe
    refusal = refused(join_with(arena, Identity(ca, cert, key)))
    assert refusal.code == grpc.StatusCode.UNAVAILABLE, refusal


# --------------------------------------------------------------------------- TLS layer


def test_valid_certificate_is_the_control(arena: Arena) -> None:
    """What the refusals below are compared with: a certificate the CA signed, with
    nothing else different from the forged ones, gets HTTP/2 from the server."""
    ca_cert, ca_key = load_ca(arena.keys)
    cert, key = forged_certificate("hospital_9", signer_cert=ca_cert, signer_key=ca_key)
    with arena.frozen_round():
        probe = tls_probe(arena.port, (arena.keys / "ca.crt").read_bytes(), cert, key)
        assert probe.h2[3:4] == b"\x04" and not probe.refused, probe  # its SETTINGS frame


def test_no_client_certificate(arena: Arena) -> None:
    ca = (arena.keys / "ca.crt").read_bytes()
    with arena.frozen_round():
        probe = tls_probe(arena.port, ca)
        assert probe.refused, probe
        refusal = refused(join_with(arena, grpc.ssl_channel_credentials(ca)))
        assert refusal.code == grpc.StatusCode.UNAVAILABLE, refusal


def test_certificate_from_another_ca(arena: Arena, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    generate_keys(other)
    issue_identity(other, EVIL)  # the attacker's own CA, same client name
    cert = (other / "clients" / f"{EVIL}.crt").read_bytes()
    key = (other / "clients" / f"{EVIL}.key").read_bytes()
    with arena.frozen_round():
        assert_handshake_refused(arena, cert, key)


def test_expired_certificate_signed_by_the_real_ca(arena: Arena) -> None:
    ca_cert, ca_key = load_ca(arena.keys)
    now = datetime.now(UTC)
    cert, key = forged_certificate(EVIL, signer_cert=ca_cert, signer_key=ca_key,
                                   not_before=now - timedelta(days=30),
                                   not_after=now - timedelta(days=1))
    with arena.frozen_round():
        assert_handshake_refused(arena, cert, key)


def test_not_yet_valid_certificate_signed_by_the_real_ca(arena: Arena) -> None:
    ca_cert, ca_key = load_ca(arena.keys)
    now = datetime.now(UTC)
    cert, key = forged_certificate(EVIL, signer_cert=ca_cert, signer_key=ca_key,
                                   not_before=now + timedelta(days=1),
                                   not_after=now + timedelta(days=30))
    with arena.frozen_round():
        assert_handshake_refused(arena, cert, key)


def test_self_signed_certificate_with_a_registered_name(arena: Arena) -> None:
    cert, key = forged_certificate("hospital_1")  # the honest hospital's name
    with arena.frozen_round():
        assert_handshake_refused(arena, cert, key)


def test_revoked_certificate(arena: Arena) -> None:
    """Revocation is not a TLS matter (the CA still signed it): the interceptor refuses
    it on every call, Join included."""
    with arena.frozen_round():
        refusal = refused(join_with(arena, arena.identity(REVOKED)))
        assert refusal.code == grpc.StatusCode.UNAUTHENTICATED, refusal
        assert "revoked" in refusal.details


def test_admin_method_with_a_client_certificate(arena: Arena) -> None:
    ident = arena.identity(EVIL)
    with arena.frozen_round():
        with grpc.secure_channel(f"127.0.0.1:{arena.port}", ident.credentials(),
                                 options=channel_options()) as channel:
            refusal = refused(lambda: cpb_grpc.CoordinatorStub(channel).Status(
                cpb.StatusRequest(), timeout=TIMEOUT))
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
        assert "admin" in refusal.details


def test_admin_certificate_cannot_join_as_a_hospital(arena: Arena) -> None:
    with arena.frozen_round():
        refusal = refused(join_with(arena, arena.admin))
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal


# --------------------------------------------------------------------------- tokens


def _upload_status(client: HostileClient, token: str | None) -> Callable[[], Any]:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)

    def call() -> Any:
        assert client.channel is not None
        return apb_grpc.AggregatorStub(client.channel).UploadStatus(
            apb.UploadStatusRequest(stream_id="probe"), metadata=metadata, timeout=TIMEOUT)
    return call


def _claims(arena: Arena, **overrides: Any) -> dict[str, Any]:
    cert = arena.identity(EVIL).cert
    return good_claims(EVIL, cert_sha256(cert), **overrides)


def _signed(arena: Arena, claims: dict[str, Any],
            key: ed25519.Ed25519PrivateKey | None = None) -> str:
    kid, real = active_key(arena.keys)
    return forge({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims, signed_by(key or real))


def _now() -> int:
    return int(time.time())


TOKENS: dict[str, tuple[Callable[[Arena], str | None], str]] = {
    "missing": (lambda a: None, "missing 'authorization"),
    "expired": (lambda a: _signed(a, _claims(a, iat=_now() - 3600, nbf=_now() - 3600,
                                              exp=_now() - 1200)), "expired"),
    "not_yet_valid": (lambda a: _signed(a, _claims(a, iat=_now() + 3600, nbf=_now() + 3600,
                                                    exp=_now() + 4000)), "not yet valid"),
    "wrong_audience": (lambda a: _signed(a, _claims(a, aud="another-service")), "audience"),
    "wrong_issuer": (lambda a: _signed(a, _claims(a, iss="https://evil.example")), "issuer"),
    "alg_none": (lambda a: none_alg_token(active_key(a.keys)[0], _claims(a)),
                 "algorithm 'none'"),
    "hs256_with_public_key": (lambda a: hs256_with_public_key(active_key(a.keys)[0],
                                                              _claims(a),
                                                              active_key(a.keys)[1]),
                              "algorithm 'HS256'"),
    "signed_by_another_key": (lambda a: _signed(a, _claims(a),
                                                ed25519.Ed25519PrivateKey.generate()),
                              "signature does not verify"),
    "garbage": (lambda a: "not.a.jwt", "malformed"),
}


@pytest.mark.parametrize("case", sorted(TOKENS))
def test_forged_or_wrong_token(arena: Arena, evil: HostileClient, case: str) -> None:
    make, reason = TOKENS[case]
    token = make(arena)
    with arena.frozen_round():
        refusal = refused(_upload_status(evil, token))
        assert refusal.code == grpc.StatusCode.UNAUTHENTICATED, refusal
        assert reason in refusal.details, refusal
        # the same call with the session's real token passes authentication
        assert evil.session is not None
        control = refused(_upload_status(evil, evil.session.token))
        assert control.code == grpc.StatusCode.NOT_FOUND, control


def test_another_clients_token(arena: Arena, evil: HostileClient) -> None:
    """A real token, stolen from another hospital, presented over the attacker's own
    (valid) certificate: the cnf x5t#S256 binding refuses it."""
    victim = arena.client(BYSTANDER)
    try:
        victim.connect()
        stolen = victim.join().token
        with arena.frozen_round():
            refusal = refused(_upload_status(evil, stolen))
            assert refusal.code == grpc.StatusCode.UNAUTHENTICATED, refusal
            assert "bound to another certificate" in refusal.details
            # and it still works for its owner
            control = refused(_upload_status(victim, stolen))
            assert control.code == grpc.StatusCode.NOT_FOUND, control
    finally:
        victim.close()


def test_session_of_another_client_cannot_read_tasks(arena: Arena, evil: HostileClient) -> None:
    """The attacker names the freezer's real session (which holds a pending TRAIN task)
    in its task-stream request: refused, PERMISSION_DENIED, because the session must be
    the one in the caller's token. The same stream with its own session is live and
    carries only the attacker's own task of the same round."""
    with arena.frozen_round(evil) as frozen:
        assert evil.channel is not None and evil.session is not None
        assert frozen.freezer_session and frozen.freezer_session != evil.session.session_id
        stub = cpb_grpc.CoordinatorStub(evil.channel)
        bearer = (("authorization", f"Bearer {evil.session.token}"),)
        refusal = refused(lambda: stub.Tasks(
            cpb.TaskStreamRequest(session_id=frozen.freezer_session), metadata=bearer,
            timeout=TIMEOUT))
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
        assert "is not the session of this call's token" in refusal.details, refusal
        assert refusal.detail_code == "SESSION_MISMATCH", refusal
        # the control: its own session opens a live stream that re-sends its own task
        own = stub.Tasks(cpb.TaskStreamRequest(session_id=evil.session.session_id),
                         metadata=bearer, timeout=TIMEOUT)
        try:
            first = next(t for t in own if t.kind != cpb.HEARTBEAT)
        finally:
            own.cancel()
        assert first.task_id == frozen.evil_task.task_id, first
        assert first.task_id != frozen.freezer_task.task_id
        assert first.round == frozen.round


def test_certificate_revoked_while_its_task_stream_is_open(arena: Arena) -> None:
    """Revocation reaches a hospital that is already connected: its next call is
    refused, and the server ends the task stream it opened before the revocation, so
    it is not selected again (a round that selected it would otherwise wait its whole
    deadline for an update the hospital can no longer send)."""
    name = "hospital_5"
    key_path, cert_path = issue_identity(arena.keys, name)
    ident = Identity((arena.keys / "ca.crt").read_bytes(), cert_path.read_bytes(),
                     key_path.read_bytes())
    victim = HostileClient(arena.port, ident, name)
    try:
        victim.open_tasks()
        wait_for(lambda: name in arena.connected(), 10, "the hospital to be connected")
        revoke(arena.keys, name)
        assert victim.session is not None
        refusal = refused(_upload_status(victim, victim.session.token))
        assert refusal.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in refusal.details
        # the server ends the stream itself (within a second of the revocation)
        assert victim.tasks_ended(timeout=5), "the revoked hospital's task stream is open"
        assert name not in arena.connected()
        seen = len(arena.status().rounds)
        rows = wait_for(lambda: (s := arena.status()).rounds[seen + 1:] and s.rounds, 60,
                        "two more rounds")
        assert all(r.selected == 1 for r in rows[seen + 1:]), "it was still selected"
        arena.assert_alive()
    finally:
        victim.close()
