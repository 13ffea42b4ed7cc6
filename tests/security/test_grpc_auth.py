"""The AuthInterceptor over real mutual TLS on 127.0.0.1: real certificates from the
CA, a real (small) Coordinator servicer and the real health service. Every refusal
is followed by a good call, so a refusal never wedges the server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fl_client.identity import load_client_tls
from fl_core import tls
from fl_proto import coordinator_pb2, coordinator_pb2_grpc
from fl_server.auth import AuthInterceptor, identity_of
from fl_server.keyfiles import load_server_tls
from fl_server.pki import generate_keys, issue_identity, revoke
from fl_server.server import ADMIN_METHODS, PUBLIC_METHODS
from fl_server.tokens import RevocationList, TokenService, cert_sha256
from tests.security.jwt_forge import active_key, good_claims, hs256_with_public_key, none_alg_token

TIMEOUT = 5.0


class Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Just enough of a coordinator to show what a service sees from the interceptor."""

    def __init__(self, tokens: TokenService) -> None:
        self.tokens = tokens

    def Join(self, request: coordinator_pb2.JoinRequest, context: grpc.ServicerContext
             ) -> coordinator_pb2.JoinReply:
        who = identity_of(context)
        assert who.session_id is None  # Join needs only the certificate
        session = uuid.uuid4().hex
        token, exp = self.tokens.issue(who.client_id, who.role, who.cert_sha256, session)
        return coordinator_pb2.JoinReply(
            session_id=session, token=token, token_expires_unix=exp, client_id=who.client_id
        )

    def Tasks(self, request: coordinator_pb2.TaskStreamRequest, context: grpc.ServicerContext
              ) -> Iterator[coordinator_pb2.Task]:
        who = identity_of(context)
        yield coordinator_pb2.Task(
            task_id=f"{who.client_id}/{who.session_id}", kind=coordinator_pb2.TRAIN
        )

    def Status(self, request: coordinator_pb2.StatusRequest, context: grpc.ServicerContext
               ) -> coordinator_pb2.StatusReply:
        who = identity_of(context)
        return coordinator_pb2.StatusReply(job_id="job-1", phase=f"asked-by-{who.client_id}")


def probe_handler() -> grpc.GenericRpcHandler:
    """One raw-bytes method of each of the four kinds, answering who called and how
    many request messages arrived, so every handler shape the interceptor rebuilds is
    exercised and stream requests are shown to reach the service intact."""

    def who(context: grpc.ServicerContext, count: int) -> bytes:
        return f"{identity_of(context).client_id}:{count}".encode()

    def uu(request: bytes, context: grpc.ServicerContext) -> bytes:
        return who(context, 1)

    def us(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield who(context, 1)
        yield who(context, 1)

    def su(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return who(context, sum(1 for _ in requests))

    def ss(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield who(context, 1)

    return grpc.method_handlers_generic_handler("test.Probe", {
        "UU": grpc.unary_unary_rpc_method_handler(uu),
        "US": grpc.unary_stream_rpc_method_handler(us),
        "SU": grpc.stream_unary_rpc_method_handler(su),
        "SS": grpc.stream_stream_rpc_method_handler(ss),
    })


@dataclass
class Federation:
    keys: Path
    port: int
    tokens: TokenService

    def creds(self, name: str, keys: Path | None = None) -> grpc.ChannelCredentials:
        ca, cert, key = load_client_tls(keys or self.keys, name)
        return tls.channel_credentials(ca, cert, key)

    def channel(self, creds: grpc.ChannelCredentials) -> grpc.Channel:
        return grpc.secure_channel(f"127.0.0.1:{self.port}", creds, options=tls.channel_options())

    def stub(self, name: str) -> tuple[grpc.Channel, coordinator_pb2_grpc.CoordinatorStub]:
        channel = self.channel(self.creds(name))
        return channel, coordinator_pb2_grpc.CoordinatorStub(channel)

    def join(self, name: str) -> coordinator_pb2.JoinReply:
        channel, stub = self.stub(name)
        with channel:
            reply: coordinator_pb2.JoinReply = stub.Join(
                coordinator_pb2.JoinRequest(model_type="pneumonia"), timeout=TIMEOUT
            )
            return reply


def hs256_public(keys: Path, claims: dict[str, object]) -> str:
    kid, key = active_key(keys)
    return hs256_with_public_key(kid, claims, key, pem=True)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def fed(keys_dir: Path) -> Iterator[Federation]:
    for name in ("revoked_1", "later_revoked"):
        issue_identity(keys_dir, name, "client")
    revoke(keys_dir, "revoked_1")
    tokens = TokenService(keys_dir)
    interceptor = AuthInterceptor(
        tokens,
        RevocationList(keys_dir),
        public_methods=set(PUBLIC_METHODS),  # exactly as fl_server.server wires it
        admin_methods=set(ADMIN_METHODS),
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[interceptor],
        options=tls.SERVER_OPTIONS,
    )
    try:
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Coordinator(tokens), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_generic_rpc_handlers((probe_handler(),))
        port = server.add_secure_port(
            "127.0.0.1:0", tls.server_credentials(*load_server_tls(keys_dir))
        )
        server.start()
        yield Federation(keys_dir, port, tokens)
    finally:
        server.stop(0)


def still_serving(fed: Federation) -> None:
    """A good client's whole path: Join, then a token-authenticated stream."""
    reply = fed.join("hospital_a")
    assert reply.client_id == "hospital_a"
    channel, stub = fed.stub("hospital_a")
    with channel:
        tasks = list(stub.Tasks(
            coordinator_pb2.TaskStreamRequest(session_id=reply.session_id),
            metadata=bearer(reply.token), timeout=TIMEOUT,
        ))
    assert [t.task_id for t in tasks] == [f"hospital_a/{reply.session_id}"]


def refused_with(code: grpc.StatusCode, call: object, needle: str = "") -> None:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    error = info.value
    assert isinstance(error, grpc.Call)
    assert error.code() == code, (error.code(), error.details())
    assert needle in (error.details() or ""), error.details()


def test_good_client_path_and_health(fed: Federation) -> None:
    still_serving(fed)
    channel = fed.channel(fed.creds("hospital_b"))
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_client_certificate_fails_the_handshake(fed: Federation) -> None:
    ca = (fed.keys / "ca.crt").read_bytes()
    with fed.channel(grpc.ssl_channel_credentials(root_certificates=ca)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        refused_with(
            grpc.StatusCode.UNAVAILABLE,
            lambda: stub.Join(coordinator_pb2.JoinRequest(), timeout=TIMEOUT),
        )
    still_serving(fed)


def test_certificate_of_another_ca_fails_the_handshake(
    fed: Federation, tmp_path: Path
) -> None:
    rogue = tmp_path / "rogue"
    generate_keys(rogue)
    issue_identity(rogue, "hospital_a", "admin")  # same name, other CA
    _, cert, key = load_client_tls(rogue, "hospital_a")
    ca = (fed.keys / "ca.crt").read_bytes()  # trusts the real server, offers a rogue cert
    with fed.channel(tls.channel_credentials(ca, cert, key)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        refused_with(
            grpc.StatusCode.UNAVAILABLE,
            lambda: stub.Join(coordinator_pb2.JoinRequest(), timeout=TIMEOUT),
        )
    still_serving(fed)


def test_revoked_certificate(fed: Federation) -> None:
    channel, stub = fed.stub("revoked_1")
    with channel:
        refused_with(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.Join(coordinator_pb2.JoinRequest(), timeout=TIMEOUT),
            "certificate revoked",
        )
        health_stub = health_pb2_grpc.HealthStub(channel)
        refused_with(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: health_stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT),
            "certificate revoked",
        )
    still_serving(fed)


def test_revocation_takes_effect_on_a_running_server(fed: Federation) -> None:
    reply = fed.join("later_revoked")
    channel, stub = fed.stub("later_revoked")
    with channel:
        tasks = stub.Tasks(coordinator_pb2.TaskStreamRequest(), metadata=bearer(reply.token),
                           timeout=TIMEOUT)
        assert len(list(tasks)) == 1
        revoke(fed.keys, "later_revoked")
        refused_with(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.Tasks(coordinator_pb2.TaskStreamRequest(),
                               metadata=bearer(reply.token), timeout=TIMEOUT),
            "certificate revoked",
        )
    still_serving(fed)


@pytest.mark.parametrize(
    ("make_token", "needle"),
    [
        (lambda fed, sha: TokenService(fed.keys, clock=lambda: 0.0).issue(
            "hospital_b", "client", sha, "s")[0], "expired"),
        (lambda fed, sha: none_alg_token(active_key(fed.keys)[0], good_claims("hospital_b", sha)),
         "algorithm 'none'"),
        (lambda fed, sha: hs256_public(fed.keys, good_claims("hospital_b", sha)),
         "algorithm 'HS256'"),
        (lambda fed, sha: fed.join("hospital_a").token, "bound to another certificate"),
        # Signed by the server and bound to this very certificate, but naming another
        # client: the certificate's name wins.
        (lambda fed, sha: fed.tokens.issue("hospital_a", "client", sha, "s")[0],
         "issued to 'hospital_a'"),
        (lambda fed, sha: fed.tokens.issue("hospital_b", "admin", sha, "s")[0],
         "token role"),
        (lambda fed, sha: "", "missing 'authorization"),
    ],
    ids=["expired", "alg-none", "hs256-public-key", "other-clients-token", "other-sub",
         "other-role", "no-token"],
)
def test_bad_tokens_are_unauthenticated(fed: Federation, make_token: object, needle: str) -> None:
    assert callable(make_token)
    sha = cert_sha256((fed.keys / "clients" / "hospital_b.crt").read_bytes())
    token = make_token(fed, sha)
    metadata = bearer(token) if token else []
    channel, stub = fed.stub("hospital_b")
    with channel:
        refused_with(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.Tasks(coordinator_pb2.TaskStreamRequest(), metadata=metadata,
                               timeout=TIMEOUT),
            needle,
        )
        refused_with(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.Report(coordinator_pb2.ReportRequest(), metadata=metadata,
                                timeout=TIMEOUT),
            needle,
        )
    still_serving(fed)


def test_malformed_authorization_metadata(fed: Federation) -> None:
    token = fed.join("hospital_b").token
    channel, stub = fed.stub("hospital_b")
    with channel:
        for metadata, needle in (
            ([("authorization", token)], "Bearer"),
            ([("authorization", f"Basic {token}")], "Bearer"),
            (bearer(token) + bearer(token), "more than one"),
        ):
            refused_with(
                grpc.StatusCode.UNAUTHENTICATED,
                lambda md=metadata: stub.Tasks(coordinator_pb2.TaskStreamRequest(),
                                               metadata=md, timeout=TIMEOUT),
                needle,
            )
    still_serving(fed)


def test_status_needs_an_admin_certificate(fed: Federation) -> None:
    """Status as the server wires it: public (no token) and admin-only. A hospital's
    certificate is refused with or without its token; an admin certificate needs no
    token (the operator CLI never joins)."""
    token = fed.join("hospital_b").token
    channel, stub = fed.stub("hospital_b")
    with channel:
        for metadata in (bearer(token), None):
            refused_with(
                grpc.StatusCode.PERMISSION_DENIED,
                lambda md=metadata: stub.Status(coordinator_pb2.StatusRequest(), metadata=md,
                                                timeout=TIMEOUT),
                "needs an admin certificate; 'hospital_b' has role 'client'",
            )
    still_serving(fed)
    channel, stub = fed.stub("admin_1")
    with channel:
        reply = stub.Status(coordinator_pb2.StatusRequest(), timeout=TIMEOUT)
        assert (reply.job_id, reply.phase) == ("job-1", "asked-by-admin_1")
    still_serving(fed)


def test_server_method_sets_name_real_methods() -> None:
    """A typo in the server's sets would silently leave a method token-protected (or
    unprotected): every name is a method a service really has, and only the operator's
    calls (Status and the job verbs) are admin-only."""
    from grpc_reflection.v1alpha import reflection_pb2

    from fl_proto import aggregator_pb2

    real = {f"/{service.full_name}/{method.name}"
            for module in (coordinator_pb2, aggregator_pb2, health_pb2, reflection_pb2)
            for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods}
    real.add("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")  # same service, v1
    assert set(PUBLIC_METHODS) <= real, set(PUBLIC_METHODS) - real
    admin = {f"/fl.v1.Coordinator/{m}" for m in
             ("Status", "SubmitJob", "ListJobs", "AbortJob", "DownloadModel")}
    assert set(ADMIN_METHODS) == admin
    token_free = {m for m in PUBLIC_METHODS if m.startswith("/fl.v1.")}
    assert token_free == {"/fl.v1.Coordinator/Join", *admin}


def test_unknown_method_is_unimplemented(fed: Federation) -> None:
    with fed.channel(fed.creds("hospital_a")) as channel:
        call = channel.unary_unary("/fl.v1.Coordinator/Nope", None, None)
        refused_with(grpc.StatusCode.UNIMPLEMENTED, lambda: call(b"", timeout=TIMEOUT))
    still_serving(fed)


def test_every_handler_kind_is_authenticated(fed: Federation) -> None:
    token = fed.join("hospital_b").token
    with fed.channel(fed.creds("hospital_b")) as channel:
        uu = channel.unary_unary("/test.Probe/UU", None, None)
        us = channel.unary_stream("/test.Probe/US", None, None)
        su = channel.stream_unary("/test.Probe/SU", None, None)
        ss = channel.stream_stream("/test.Probe/SS", None, None)
        md = tuple(bearer(token))
        assert uu(b"x", metadata=md, timeout=TIMEOUT) == b"hospital_b:1"
        assert list(us(b"x", metadata=md, timeout=TIMEOUT)) == [b"hospital_b:1"] * 2
        assert su(iter([b"a", b"b", b"c"]), metadata=md, timeout=TIMEOUT) == b"hospital_b:3"
        assert list(ss(iter([b"a", b"b"]), metadata=md, timeout=TIMEOUT)) == [b"hospital_b:1"] * 2
        for call, arg in ((uu, b"x"), (us, b"x"), (su, iter([b"a"])), (ss, iter([b"a"]))):
            refused_with(
                grpc.StatusCode.UNAUTHENTICATED,
                lambda c=call, a=arg: c(a, timeout=TIMEOUT),
                "missing 'authorization",
            )
    still_serving(fed)
