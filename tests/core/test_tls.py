"""TLS helpers: URL parsing, options, PEM loading, and a real mTLS call on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl_core import tls
from fl_core.constants import KEEPALIVE_TIME_MS, MAX_MESSAGE_BYTES, MIN_PING_INTERVAL_MS


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("fl-server.example.org:5000", ("fl-server.example.org", 5000)),
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("  localhost:1 ", ("localhost", 1)),
        ("https://fl-server.example.org", ("fl-server.example.org", 443)),
        ("HTTPS://fl-server.example.org/", ("fl-server.example.org", 443)),
        ("https://fl-server.example.org:8443/", ("fl-server.example.org", 8443)),
        ("grpcs://10.0.0.5:5000", ("10.0.0.5", 5000)),
        ("grpcs://host", ("host", 443)),
        ("[::1]:5000", ("::1", 5000)),
        ("https://[2001:db8::1]", ("2001:db8::1", 443)),
        ("grpcs://[fe80::1]:7000/", ("fe80::1", 7000)),
    ],
)
def test_parse_server_url_accepts(url: str, expected: tuple[str, int]) -> None:
    assert tls.parse_server_url(url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://fl-server.example.org", "plaintext"),
        ("grpc://host:5000", "plaintext"),
        ("ftp://host:21", "unknown scheme"),
        ("fl-server.example.org", "no port"),
        ("host:0", "port"),
        ("host:65536", "port"),
        ("host:abc", "port"),
        ("::1:5000", "brackets"),
        ("[::1", "unclosed"),
        ("[nothost]:5", "IPv6"),
        ("[::1]x", "unexpected"),
        ("https://host/path", "path"),
        ("https://user@host", "user"),
        ("https://host?x=1", "query"),
        ("", "not host:port"),
        ("bad host:5", "not host:port"),
        ("-bad-.example:5", "host name"),
        ("https://:443", "no host"),
    ],
)
def test_parse_server_url_rejects(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        tls.parse_server_url(url)
    assert "accepted forms" in str(err.value)


def test_target_brackets_ipv6() -> None:
    assert tls.target("::1", 5000) == "[::1]:5000"
    assert tls.target("example.org", 443) == "example.org:443"
    assert tls.target(*tls.parse_server_url("https://[2001:db8::1]")) == "[2001:db8::1]:443"


def test_options() -> None:
    server = dict(tls.SERVER_OPTIONS)
    assert server["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert server["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
    assert server["grpc.http2.min_ping_interval_without_data_ms"] == MIN_PING_INTERVAL_MS
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.max_ping_strikes"] == 0
    client = dict(tls.channel_options())
    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS >= MIN_PING_INTERVAL_MS
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert "grpc.ssl_target_name_override" not in client
    assert dict(tls.channel_options("fl-server"))["grpc.ssl_target_name_override"] == "fl-server"


def test_load_pem(tmp_path: Path) -> None:
    good = tmp_path / "ok.pem"
    good.write_bytes(b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    assert tls.load_pem(good).startswith(b"-----BEGIN")
    with pytest.raises(tls.PemError, match="missing.pem.*does not exist"):
        tls.load_pem(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    with pytest.raises(tls.PemError, match="junk.pem.*no PEM block"):
        tls.load_pem(tmp_path / "junk.pem")
    with pytest.raises(tls.PemError, match="directory"):
        tls.load_pem(tmp_path)


# --------------------------------------------------------------------------- real mTLS


class Pki:
    """A throwaway CA with a server and a client certificate (P-256, fast to make)."""

    def __init__(self, name: str) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.ca_cert = (
            self._builder(subject, subject, self.ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )

    @staticmethod
    def _builder(
        subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def issue(self, common_name: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        cert = (
            self._builder(subject, self.ca_cert.subject, key.public_key())
            .add_extension(san, critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki("test-ca")


@pytest.fixture
def echo_server(pki: Pki) -> Iterator[int]:
    cert, key = pki.issue("fl-server")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=2),
        options=tls.SERVER_OPTIONS,
    )
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(cert, key, pki.ca_pem))
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()


def ping(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(
        tls.target("127.0.0.1", port), credentials, options=tls.channel_options()
    ) as channel:
        call = channel.unary_unary("/test.Echo/Ping", None, None)
        result: bytes = call(b"hello", timeout=10)
        return result


def test_mutual_tls_call(pki: Pki, echo_server: int) -> None:
    cert, key = pki.issue("hospital_1")
    assert ping(echo_server, tls.channel_credentials(pki.ca_pem, cert, key)) == b"hello"


def first_bytes_after_handshake(port: int, ca: bytes, tmp: Path, cert: bytes | None = None,
                                key: bytes | None = None) -> bytes:
    """What the server sends a client that completes its side of the TLS handshake
    and opens HTTP/2: the server's SETTINGS frame if it accepted the client's
    certificate, nothing (the connection closed) if it refused it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        (tmp / "c.pem").write_bytes(cert)
        (tmp / "k.pem").write_bytes(key)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        try:
            return conn.recv(64)
        except (ssl.SSLError, ConnectionError):
            return b""


def assert_refused_in_handshake(pki: Pki, port: int, tmp: Path, cert: bytes | None,
                                key: bytes | None) -> None:
    good_cert, good_key = pki.issue("hospital_1")
    settings = first_bytes_after_handshake(port, pki.ca_pem, tmp, good_cert, good_key)
    assert settings[3:4] == b"\x04", settings  # control: an HTTP/2 SETTINGS frame
    assert first_bytes_after_handshake(port, pki.ca_pem, tmp, cert, key) == b""
    credentials = (tls.channel_credentials(pki.ca_pem, cert, key) if cert and key
                   else grpc.ssl_channel_credentials(root_certificates=pki.ca_pem))
    with pytest.raises(grpc.RpcError) as err:
        ping(port, credentials)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    details = str(err.value.details())  # type: ignore[attr-defined]
    assert "failed to connect to all addresses" in details, details


def test_client_without_certificate_refused(pki: Pki, echo_server: int, tmp_path: Path) -> None:
    assert_refused_in_handshake(pki, echo_server, tmp_path, None, None)


def test_client_from_another_ca_refused(pki: Pki, echo_server: int, tmp_path: Path) -> None:
    cert, key = Pki("rogue-ca").issue("hospital_1")
    assert_refused_in_handshake(pki, echo_server, tmp_path, cert, key)
