"""fl_core.tls_diagnosis against real TLS endpoints on loopback (Python ssl servers
presenting chosen certificates) and against gRPC's own words as grpc 1.85 writes them.
Fast: no daemon, no torch."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fl_core.tls_diagnosis import (
    Cause,
    TrustFailures,
    client_tls_files,
    from_grpc_details,
    looks_like_tls,
    probe,
)
from fl_demo.launcher import make_pki, site_keys
from tests.doctor.certs import sign

# Details strings exactly as grpcio 1.85 reported them in this project's runs.
GRPC_UNKNOWN_CA = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5611: Tls "
    "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK")
GRPC_NAME = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5611: "
             "Custom verification check failed with error: UNAUTHENTICATED: Hostname "
             "Verification Check failed.")
GRPC_REFUSED = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:"
                "5612: Failed to connect to remote host: Connection refused")
GRPC_CLOSED = ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:"
               "127.0.0.1:5611: Socket closed")


def test_grpc_details_are_classified() -> None:
    assert from_grpc_details(GRPC_UNKNOWN_CA) is Cause.UNKNOWN_CA
    assert from_grpc_details(GRPC_NAME) is Cause.NAME_MISMATCH
    assert from_grpc_details(GRPC_REFUSED) is None and not looks_like_tls(GRPC_REFUSED)
    # a server refusing our certificate: gRPC cannot tell it from an outage, the probe can
    assert from_grpc_details(GRPC_CLOSED) is None


@pytest.fixture(scope="module")
def feds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tlsdiag")
    make_pki(root / "fed", ["hospital_1"])
    make_pki(root / "other", ["hospital_1"])
    return root


def _serve(cert: bytes, key: bytes, tmp: Path, ca: Path | None = None
           ) -> Iterator[int]:
    """A TLS server on loopback presenting `cert`; with `ca` it demands a client
    certificate signed by it (as the fl-server does)."""
    (tmp / "srv.crt").write_bytes(cert)
    (tmp / "srv.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "srv.crt", tmp / "srv.key")
    ctx.set_alpn_protocols(["h2"])
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(64)
                        tls.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS
                except (OSError, ssl.SSLError):
                    pass  # the client walked away after its verdict, or we refused it

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _server_cert(keys: Path, not_before: datetime, not_after: datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return sign(keys, key.public_key(), "fl-server", "server", not_before, not_after, True), \
        pem_key


def test_probe_names_each_cause(feds: Path, tmp_path: Path) -> None:
    files = client_tls_files(site_keys(feds / "fed", "hospital_1"), "hospital_1")
    keys = feds / "fed" / "keys"
    now = datetime.now(UTC)
    good = ((keys / "server.crt").read_bytes(), (keys / "server.key").read_bytes())
    foreign = ((feds / "other" / "keys" / "server.crt").read_bytes(),
               (feds / "other" / "keys" / "server.key").read_bytes())
    expired = _server_cert(keys, now - timedelta(days=10), now - timedelta(days=1))
    future = _server_cert(keys, now + timedelta(days=1), now + timedelta(days=10))

    cases = [(good, None, None, Cause.OK), (foreign, None, None, Cause.UNKNOWN_CA),
             (good, None, "fl.wrong.example", Cause.NAME_MISMATCH),
             (expired, None, None, Cause.SERVER_CERT_EXPIRED),
             (future, None, None, Cause.SERVER_CERT_NOT_YET_VALID),
             # the server trusts another CA: it refuses the hospital's certificate
             (good, feds / "other" / "keys" / "ca.crt", None, Cause.CLIENT_CERT_REJECTED)]
    for i, ((cert, key), client_ca, name, expected) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        serving = _serve(cert, key, folder, client_ca)
        port = next(serving)
        try:
            found = probe("127.0.0.1", port, files, name, timeout=5)
        finally:
            serving.close()
        assert found.cause is expected, (expected, found.line())
    # the messages name the file to fix and what was seen
    assert str(files.ca) in probe_message(feds, foreign, tmp_path / "m1", files)


def probe_message(feds: Path, cert_key: tuple[bytes, bytes], folder: Path,
                  files: object) -> str:
    folder.mkdir()
    serving = _serve(*cert_key, folder)
    port = next(serving)
    try:
        return probe("127.0.0.1", port, files, timeout=5).line()  # type: ignore[arg-type]
    finally:
        serving.close()


def test_outages_are_not_trust_failures(feds: Path) -> None:
    files = client_tls_files(site_keys(feds / "fed", "hospital_1"), "hospital_1")
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    found = probe("127.0.0.1", port, files, timeout=2)
    assert found.cause is Cause.UNREACHABLE and not found.trust
    assert probe("no-such-host.invalid", port, files, timeout=2).cause is Cause.UNRESOLVED
    trust = TrustFailures("127.0.0.1", port, files, attempts=2)
    for _ in range(4):  # an outage never counts toward giving up
        assert trust.check(GRPC_REFUSED) is None
    assert not trust.exhausted


def test_plaintext_listener_is_not_tls(feds: Path) -> None:
    files = client_tls_files(site_keys(feds / "fed", "hospital_1"), "hospital_1")
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        found = probe("127.0.0.1", int(listener.getsockname()[1]), files, timeout=5)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert found.cause is Cause.NOT_TLS, found.line()
