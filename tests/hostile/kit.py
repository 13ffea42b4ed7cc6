"""Tools shared by the hostile-input and fault tests.

Everything here drives the real system over real mutual TLS on 127.0.0.1: a
misbehaving client built on the real `ServerConnection` (so it holds a real
session, real keys and real sealed streams, and can then bend any of them),
certificates an attacker could plausibly hold, raw TLS/TCP probes, a reader for
the server's checkpoints, and a scripted client whose updates are deterministic.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open

from fl_client.connection import ServerConnection, TransferError
from fl_client.identity import load_client_tls
from fl_core.constants import MAX_MESSAGE_BYTES
from fl_core.errors import refusal_of as decode_refusal
from fl_core.sealing import StreamContext, StreamSealer, manifest_digest, stream_key
from fl_core.stream_ids import upload_stream_id
from fl_core.tensor_codec import build_manifest, iter_chunks
from fl_core.tls import channel_credentials, channel_options
from fl_proto import aggregator_pb2 as apb
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb
from fl_server.store import state_sha256

TIMEOUT = 10.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# --------------------------------------------------------------------------- errors


@dataclass
class Refusal:
    """What a refused call came back with."""

    code: grpc.StatusCode
    details: str
    detail_code: str = ""  # ErrorInfo.reason from grpc-status-details-bin, if any

    def __str__(self) -> str:
        return f"{self.code.name} [{self.detail_code}] {self.details}"


def refusal_of(exc: grpc.RpcError) -> Refusal:
    """The status and the ErrorInfo reason (google.rpc rich error model) of a refusal."""
    info = decode_refusal(exc)
    return Refusal(info.code, info.message, "" if info.reason == info.code.name else info.reason)


def refused(call: Callable[[], Any]) -> Refusal:
    """Run `call`, which must fail with a gRPC status; return that status."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            for _ in result:  # a server stream fails while it is read
                pass
    except grpc.RpcError as exc:
        return refusal_of(exc)
    raise AssertionError(f"the call was accepted: {call}")


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Identity:
    """PEM bytes a caller presents; `ca` is the root it trusts for the server."""

    ca: bytes
    cert: bytes
    key: bytes

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca, self.cert, self.key)


def site_identity(workdir: Path, name: str) -> Identity:
    """A hospital's own key and certificate, as make_pki left them in its site folder."""
    ca, cert, key = load_client_tls(workdir / "sites" / name / "keys", name)
    return Identity(ca, cert, key)


def admin_identity(keys: Path, name: str = "operator") -> Identity:
    return Identity((keys / "ca.crt").read_bytes(),
                    (keys / "clients" / f"{name}.crt").read_bytes(),
                    (keys / "clients" / f"{name}.key").read_bytes())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def forged_certificate(
    name: str,
    *,
    signer_cert: x509.Certificate | None = None,
    signer_key: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    role: str = "client",
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for `name`: signed by `signer` (e.g. the real CA, to make an
    expired certificate) or self-signed when no signer is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    issuer = signer_cert.subject if signer_cert is not None else subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if signer_cert is not None:
        ski = signer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    cert = builder.sign(signer_key if signer_key is not None else key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def load_ca(keys: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((keys / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


# --------------------------------------------------------------------------- raw probes


@dataclass
class Probe:
    """How the server answered a raw TLS connection."""

    h2: bytes = b""      # HTTP/2 bytes the server sent (its SETTINGS, a GOAWAY...)
    closed: bool = False  # the server closed the connection (EOF, reset or TLS error)
    detail: str = ""

    @property
    def refused(self) -> bool:
        """Torn down without one byte of HTTP/2: what a refused certificate gets."""
        return self.closed and not self.h2

    @property
    def goaway(self) -> int | None:
        return goaway_frame(self.h2)


def tls_probe(port: int, ca: bytes, cert: bytes | None = None, key: bytes | None = None,
              payload: bytes = HTTP2_PREFACE, timeout: float = 5.0) -> Probe:
    """Open TLS to the server with Python's own TLS stack, read what the server says
    first, send `payload`, and read until the server closes (or `timeout`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.set_alpn_protocols(["h2"])
    probe = Probe()
    with tempfile.TemporaryDirectory() as tmp:
        if cert is not None and key is not None:
            cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)
            ctx.load_cert_chain(cert_path, key_path)
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            tls = ctx.wrap_socket(sock, server_hostname="localhost")
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            return Probe(closed=True, detail=f"handshake: {exc}")
        with tls:
            try:
                tls.settimeout(1.0)
                # a TLS 1.3 server refuses a client certificate after the handshake
                with contextlib.suppress(TimeoutError):
                    first = tls.recv(65536)
                    probe.h2 += first
                    if not first:
                        probe.closed = True
                        return probe
                tls.settimeout(timeout)
                tls.sendall(payload)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if payload == HTTP2_PREFACE and probe.h2:
                        break  # the server's SETTINGS: it speaks HTTP/2 to us
                    piece = tls.recv(65536)
                    if not piece:
                        probe.closed = True
                        break
                    probe.h2 += piece
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
                probe.closed, probe.detail = True, f"{type(exc).__name__}: {exc}"
            except TimeoutError:
                probe.detail = "timeout"
    return probe


def frames(data: bytes) -> list[tuple[int, int]]:
    """(type, flags) of each complete HTTP/2 frame in `data`."""
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        if pos + 9 + length > len(data):
            break
        out.append((data[pos + 3], data[pos + 4]))
        pos += 9 + length
    return out


def goaway_frame(data: bytes) -> int | None:
    """The error code of the first HTTP/2 GOAWAY frame in `data`, else None."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        kind = data[pos + 3]
        if pos + 9 + length > len(data):
            return None
        if kind == 0x7 and length >= 8:
            return int.from_bytes(data[pos + 13:pos + 17], "big")
        pos += 9 + length
    return None


def closed_after(port: int, payload: bytes, timeout: float = 5.0) -> tuple[str, bytes]:
    """Send `payload` on a plain TCP connection and read until the server ends it:
    ("eof" or "reset", what came back), or ("open", ...) if it still held the
    connection after `timeout` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                return "reset", data
            except TimeoutError:
                break
            if not piece:
                return "eof", data
            data += piece
        return "open", data


# --------------------------------------------------------------------------- server views


def health_status(port: int, ident: Identity, timeout: float = TIMEOUT) -> int:
    with grpc.secure_channel(f"127.0.0.1:{port}", ident.credentials(),
                             options=channel_options()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status)


SERVING = health_pb2.HealthCheckResponse.SERVING


def checkpoint_sha(state_dir: Path, job_id: str, round_no: int) -> str:
    """The model hash of a checkpoint file, computed from the file itself."""
    path = state_dir / "checkpoints" / job_id / f"round_{round_no:06d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {})["model_order"])
        return state_sha256({n: f.get_tensor("model/" + n) for n in order})


def checkpoint_state(state_dir: Path, job_id: str, round_no: int) -> dict[str, torch.Tensor]:
    path = state_dir / "checkpoints" / job_id / f"round_{round_no:06d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {})["model_order"])
        return {n: f.get_tensor("model/" + n) for n in order}


@dataclass
class RoundRow:
    round: int
    state: str
    selected: int
    reported: int
    failed: int
    model_sha256: str | None
    metrics: dict[str, Any]

    @property
    def accepted(self) -> set[str]:
        return set(self.metrics.get("clients", {}))

    @property
    def failures(self) -> dict[str, str]:
        return dict(self.metrics.get("failures", {}))


def read_rounds(state_dir: Path, job_id: str | None = None) -> list[RoundRow]:
    """Round rows straight from the server's SQLite file, read-only (WAL lets a reader
    see committed rows while the server writes)."""
    db = sqlite3.connect(f"file:{state_dir / 'server.db'}?mode=ro", uri=True, timeout=10)
    try:
        sql = ("SELECT round, state, selected, reported, failed, model_sha256, metrics_json"
               " FROM rounds")
        args: tuple[Any, ...] = ()
        if job_id is not None:
            sql += " WHERE job_id=?"
            args = (job_id,)
        rows = db.execute(sql + " ORDER BY round", args).fetchall()
    finally:
        db.close()
    return [RoundRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]


def read_jobs(state_dir: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{state_dir / 'server.db'}?mode=ro", uri=True, timeout=10)
    try:
        return [(r[0], r[1]) for r in
                db.execute("SELECT job_id, state FROM jobs ORDER BY created").fetchall()]
    finally:
        db.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- clients


@dataclass
class SealedUpload:
    """An update stream as messages: bend any of them before sending."""

    header: apb.UpdateStreamHeader
    chunks: list[apb.UpdateStreamMessage]
    manifest: tpb.TensorManifest
    context: StreamContext
    key: bytes

    def messages(self) -> list[apb.UpdateStreamMessage]:
        return [apb.UpdateStreamMessage(header=self.header), *self.chunks]

    def seal(self, sequence: int, plaintext: bytes, final: bool) -> apb.UpdateStreamMessage:
        """A chunk sealed correctly for this stream (any sequence, any bytes)."""
        sealer = StreamSealer(self.key, self.context, start_sequence=sequence)
        return apb.UpdateStreamMessage(chunk=sealer.seal(sequence, plaintext, final))


class HostileClient(ServerConnection):
    """A real client connection (real certificate, session and keys) that the test
    then makes misbehave. Its task stream runs in a thread so the test can wait for
    a TRAIN task and act on it while the round is open."""

    def __init__(self, port: int, ident: Identity, client_id: str,
                 model_type: str = "breast_cancer", num_examples: int = 100,
                 max_send_bytes: int = MAX_MESSAGE_BYTES) -> None:
        super().__init__(f"127.0.0.1:{port}", ident.ca, ident.cert, ident.key, client_id,
                         model_type, num_examples)
        self._options = [o for o in self._options if o[0] != "grpc.max_send_message_length"]
        self._options.append(("grpc.max_send_message_length", max_send_bytes))
        self._tasks: queue.Queue[cpb.Task | BaseException] = queue.Queue()
        self._call: Any = None
        self._thread: threading.Thread | None = None

    # task feed ----------------------------------------------------------------------
    def open_tasks(self) -> None:
        if self.channel is None:
            self.connect()
        if self.session is None:
            self.join()
        while not self._tasks.empty():  # tasks of an earlier stream are stale
            self._tasks.get_nowait()
        call = self.tasks()
        self._call = call

        def pump() -> None:
            try:
                for task in call:
                    if task.kind != cpb.HEARTBEAT:
                        self._tasks.put(task)
            except grpc.RpcError as exc:
                self._tasks.put(exc)

        self._thread = threading.Thread(target=pump, name=f"tasks-{self.client_id}",
                                        daemon=True)
        self._thread.start()

    def next_task(self, kind: int = cpb.TRAIN, timeout: float = 30.0) -> cpb.Task:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.client_id}: no {cpb.TaskKind.Name(kind)} task"
                                     f" within {timeout:.0f}s")
            try:
                item = self._tasks.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise AssertionError(f"{self.client_id}: task stream ended: {item}")
            if item.kind == kind:
                return item

    def poll_task(self, kind: int = cpb.TRAIN, timeout: float = 0.0) -> cpb.Task | None:
        try:
            return self.next_task(kind, timeout)
        except AssertionError:
            return None

    def tasks_ended(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for the server to end the open task stream."""
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        return self._thread is None or not self._thread.is_alive()

    def close_tasks(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.close_tasks()
        super().close()

    # calls ----------------------------------------------------------------------------
    def report_task(self, task: cpb.Task, status: int = cpb.FAILED,
                    reason: str = "hostile test", **fields: Any) -> cpb.ReportReply:
        request = cpb.ReportRequest(task_id=task.task_id, job_id=task.job_id, round=task.round,
                                    kind=task.kind, status=status, reason=reason, **fields)
        return self.coordinator.Report(request, metadata=self.metadata(), timeout=TIMEOUT)

    def submit(self, messages: Iterable[apb.UpdateStreamMessage],
               timeout: float = TIMEOUT) -> apb.UpdateReceipt:
        return self.aggregator.SubmitUpdate(iter(messages), metadata=self.metadata(),
                                            timeout=timeout)

    def global_state(self, task: cpb.Task) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.fetch_model(task, task.model_manifest).items()}

    def zero_delta(self, task: cpb.Task) -> dict[str, torch.Tensor]:
        """A harmless update: the same layout as the global model, all zeros."""
        return {s.name: torch.zeros(tuple(s.shape), dtype=torch.float32)
                for s in task.model_manifest.tensors}

    def sealed(self, task: cpb.Task, state: Mapping[str, torch.Tensor], *,
               chunk_size: int = 48, num_examples: int = 100,
               metrics: Mapping[str, float] | None = None,
               manifest: tpb.TensorManifest | None = None) -> SealedUpload:
        """The update stream a correct client would send for `state` (cut into small
        chunks so the stream has several even for the 62-parameter breast-cancer model:
        248 bytes in 48-byte chunks is 6), sealed under this session's keys."""
        self.metadata()
        assert self.session is not None
        manifest = manifest or build_manifest(state, chunk_size=chunk_size)
        stream_id = upload_stream_id(task.job_id, task.round, task.task_id,
                                     self.session.session_id)
        ctx = StreamContext(task.job_id, task.round, self.client_id, "up", stream_id,
                            manifest_digest(manifest))
        key = stream_key(self.session.secret, ctx)
        sealer = StreamSealer(key, ctx)
        count = manifest.chunk_count
        chunks = [apb.UpdateStreamMessage(chunk=sealer.seal(seq, plain, seq == count - 1))
                  for seq, plain in enumerate(iter_chunks(state, manifest))]
        header = apb.UpdateStreamHeader(
            job_id=task.job_id, round=task.round, task_id=task.task_id, stream_id=stream_id,
            manifest=manifest, num_examples=num_examples, metrics=dict(metrics or {}))
        return SealedUpload(header, chunks, manifest, ctx, key)


# --------------------------------------------------------------------------- scripted


def chunked_uploads(monkeypatch: Any, chunk_size: int) -> None:
    """Make this process's clients cut their uploads into `chunk_size`-byte chunks:
    the 62-parameter model in several, so the server spools it (a one-chunk upload is
    received in memory) and a stream can be cut and resumed mid-way."""
    import fl_client.connection as connection_module

    monkeypatch.setattr(connection_module, "build_manifest",
                        lambda state, **kw: build_manifest(state, chunk_size=chunk_size, **kw))


def deterministic_delta(manifest: tpb.TensorManifest, round_no: int, index: int
                        ) -> dict[str, torch.Tensor]:
    """An update that depends only on the round and the client: small dyadic values,
    so sums and means of them are exact in float32 whatever the order."""
    value = ((round_no % 7) + 1 + 2 * index) / 64.0
    return {s.name: torch.full(tuple(s.shape), value, dtype=torch.float32)
            for s in manifest.tensors}


@dataclass
class ScriptedClient:
    """A no-op-style hospital: joins, fetches each round's model over the real sealed
    stream, and answers with `deterministic_delta`. Runs in a thread, reconnects by
    itself (so it survives a server restart), stops on STOP or `stop()`."""

    port_of: Callable[[], int]
    ident: Identity
    client_id: str
    index: int
    num_examples: int = 64
    delta: Callable[[tpb.TensorManifest, int, int], dict[str, torch.Tensor]] = \
        deterministic_delta
    server_name: str | None = None
    receipts: list[tuple[int, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    on_receipt: Callable[[int], None] | None = None
    before_submit: Callable[[int], None] | None = None  # e.g. hold round N's update
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _conn: ServerConnection | None = None
    _call: Any = None
    finished: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ScriptedClient:
        self._thread = threading.Thread(target=self._run, name=f"scripted-{self.client_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def connection(self) -> ServerConnection:
        return ServerConnection(f"127.0.0.1:{self.port_of()}", self.ident.ca, self.ident.cert,
                                self.ident.key, self.client_id, "breast_cancer",
                                self.num_examples, server_name=self.server_name)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = self.connection()
            self._conn = conn
            try:
                conn.connect()
                conn.join()
                call = conn.tasks()
                self._call = call
                for task in call:
                    if self._stop.is_set():
                        break
                    if task.kind == cpb.STOP:
                        self.finished.set()
                        return
                    if task.kind != cpb.TRAIN:
                        continue
                    conn.fetch_model(task, task.model_manifest)
                    state = self.delta(task.model_manifest, task.round, self.index)
                    if self.before_submit is not None:
                        self.before_submit(task.round)
                    receipt = conn.submit_update(task, state, self.num_examples, {"loss": 0.5})
                    self.receipts.append((task.round, receipt.sha256.hex()))
                    if self.on_receipt is not None:
                        self.on_receipt(task.round)
            except (grpc.RpcError, TransferError) as exc:
                self.errors.append(str(exc)[:200])
            finally:
                conn.close()
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=15)


@contextlib.contextmanager
def scripted_clients(clients: list[ScriptedClient]) -> Iterator[list[ScriptedClient]]:
    for c in clients:
        c.start()
    try:
        yield clients
    finally:
        for c in clients:
            c.stop()


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
