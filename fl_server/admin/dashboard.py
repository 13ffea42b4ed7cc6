"""The operator's live dashboard: a small local web app over the Status call.

    python -m fl_server.admin dashboard --server_url HOST:PORT --keys_dir keys [--port 8080]

One thread calls Status over mTLS with the admin certificate every
DASHBOARD_REFRESH_S and keeps the newest reply; each open page receives it as a
server-sent event (`/events`), so N pages cost one Status call per tick, not N.
The page (static/) draws the job, rounds, hospitals and recent events with Chart.js,
vendored with its license under static/vendor: it works offline, with no CDN.

Served on 127.0.0.1 only: the page shows every hospital's state to whoever can load
it. A Host header other than this address (DNS rebinding) is refused, responses
carry a Content-Security-Policy that allows only this origin's scripts, and no
cross-origin headers are sent, so other sites' pages cannot read the stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from fl_core.constants import DASHBOARD_PORT, DASHBOARD_REFRESH_S
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from fl_server.admin import add_connection_flags, admin_channel

log = logging.getLogger("fl_server.admin.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
HOST = "127.0.0.1"
SSE_KEEPALIVE_S = 15.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
       " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def status_json(reply: cpb.StatusReply) -> dict[str, Any]:
    """The reply as the page reads it: proto field names, every field present."""
    return MessageToDict(reply, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


class HeldRounds:
    """The recorded rounds the feed has already received, so each Status call asks only
    for newer ones (`rounds_after`): a recorded round never changes, and a job that
    has run for months would otherwise send all its rounds every tick."""

    def __init__(self) -> None:
        self._job_id: str | None = None
        self._held = cpb.StatusReply()  # only its `rounds`

    def request(self) -> cpb.StatusRequest:
        held = self._held.rounds
        return cpb.StatusRequest(rounds_after=held[-1].round if held else 0)

    def complete(self, request: cpb.StatusRequest,
                 reply: cpb.StatusReply) -> cpb.StatusReply | None:
        """`reply` with every round held before it; None when it cannot be completed:
        the server now serves another job, or sent rounds the feed holds (a server from
        before `rounds_after` sends them all; one whose state was restored from an older
        copy records them again). The caller asks again from round 0."""
        if request.rounds_after:
            if reply.job_id != self._job_id \
                    or (reply.rounds and reply.rounds[0].round <= request.rounds_after):
                self._job_id = None
                del self._held.rounds[:]
                return None
        else:
            self._job_id = reply.job_id
            del self._held.rounds[:]
        self._held.rounds.extend(reply.rounds)
        if not request.rounds_after:
            return reply
        full = cpb.StatusReply()
        full.CopyFrom(reply)
        del full.rounds[:]
        full.rounds.extend(self._held.rounds)
        return full


class StatusFeed:
    """Calls Status every `refresh_s` on one channel; pages wait for the next snapshot."""

    def __init__(self, args: argparse.Namespace, refresh_s: float) -> None:
        self.args = args
        self.refresh_s = refresh_s
        self._cv = threading.Condition()
        self.snapshot: dict[str, Any] = {"ok": False, "error": "connecting to the server",
                                         "status": None}
        self.version = 0
        self.stop = threading.Event()
        self._rounds = HeldRounds()
        self._thread = threading.Thread(target=self._run, name="status-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _publish(self, snapshot: dict[str, Any]) -> None:
        with self._cv:
            self.snapshot = snapshot
            self.version += 1
            self._cv.notify_all()

    def _run(self) -> None:
        channel: grpc.Channel | None = None
        last_good: dict[str, Any] | None = None
        while not self.stop.is_set():
            try:
                if channel is None:
                    channel = admin_channel(self.args)
                last_good = status_json(self._status(cpb_grpc.CoordinatorStub(channel)))
                self._publish({"ok": True, "error": "", "status": last_good,
                               "fetched_unix_ms": int(time.time() * 1000)})
            except grpc.RpcError as exc:
                message = f"{exc.code().name}: {exc.details()}"
                self._publish({"ok": False, "error": message, "status": last_good})
            except Exception as exc:  # unreadable certificate files, anything unexpected:
                # the page says so and the feed tries again; it never dies silently
                log.warning("Status failed: %s: %s", type(exc).__name__, exc)
                self._publish({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                               "status": last_good})
                if channel is not None:
                    channel.close()
                channel = None
            self.stop.wait(self.refresh_s)
        if channel is not None:
            channel.close()

    def _status(self, stub: cpb_grpc.CoordinatorStub) -> cpb.StatusReply:
        """The server's status with every recorded round, fetching only new ones; once
        more from round 0 when the rounds held cannot be completed."""
        for _ in range(2):  # the second request asks for every round: always complete
            request = self._rounds.request()
            reply = self._rounds.complete(
                request, stub.Status(request, timeout=self.args.timeout_s))
            if reply is not None:
                return reply
        raise RuntimeError("Status could not be completed from round 0")

    def wait_newer(self, version: int, timeout_s: float) -> tuple[int, dict[str, Any]] | None:
        with self._cv:
            if self.version <= version:
                self._cv.wait(timeout_s)
            if self.version <= version:
                return None
            return self.version, self.snapshot

    def close(self) -> None:
        self.stop.set()
        with self._cv:
            self._cv.notify_all()


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, feed: StatusFeed) -> None:
        super().__init__((HOST, port), DashboardHandler)
        self.feed = feed
        bound = self.server_address[1]
        self.allowed_hosts = {f"{HOST}:{bound}", f"localhost:{bound}"}


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("%s " + format, self.address_string(), *args)

    def _headers(self, status: HTTPStatus, content_type: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self._headers(status, content_type, len(body))
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.headers.get("Host", "") not in self.server.allowed_hosts:
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unknown Host\n", "text/plain")
            return
        path = self.path.split("?", 1)[0]
        if path == "/events":
            self._events()
        elif path == "/api/status":
            body = json.dumps(self.server.feed.snapshot).encode()
            self._send(HTTPStatus.OK, body, "application/json")
        else:
            self._static("index.html" if path == "/" else path.lstrip("/"))

    def _static(self, name: str) -> None:
        target = (STATIC / name).resolve()
        if STATIC not in target.parents or not target.is_file():
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, target.read_bytes(), kind)

    def _events(self) -> None:
        """Server-sent events: each new snapshot as one `data:` line, comments between."""
        self._headers(HTTPStatus.OK, "text/event-stream", None)
        feed = self.server.feed
        version = 0
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not feed.stop.is_set():
                newer = feed.wait_newer(version, SSE_KEEPALIVE_S)
                if newer is None:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    version, snapshot = newer
                    self.wfile.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        self.close_connection = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-admin dashboard",
        description="Serve a live dashboard of a running server on 127.0.0.1 (Status over"
                    " mTLS with an admin certificate, pushed to the page as server-sent"
                    " events).")
    add_connection_flags(p)
    p.add_argument("--port", type=int, default=DASHBOARD_PORT,
                   help="local port for the page (0 picks a free one)")
    p.add_argument("--refresh_s", type=float, default=DASHBOARD_REFRESH_S,
                   help="seconds between Status calls")
    p.add_argument("--ready_file", type=Path,
                   help="write {\"port\": N, \"url\": U} here once serving")
    return p


def serve(args: argparse.Namespace) -> tuple[DashboardServer, StatusFeed]:
    for name in ("ca.crt", f"clients/{args.admin}.crt", f"clients/{args.admin}.key"):
        if not (args.keys_dir / name).is_file():
            raise OSError(f"{args.keys_dir / name} is missing (make the admin certificate"
                          f" with fl-keys --issue-admin {args.admin})")
    if not args.refresh_s > 0:
        raise ValueError(f"--refresh_s must be > 0, got {args.refresh_s}")
    feed = StatusFeed(args, args.refresh_s)
    server = DashboardServer(args.port, feed)
    feed.start()
    return server, feed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        server, feed = serve(args)
    except (OSError, ValueError) as exc:
        print(f"fl-admin dashboard: error: {exc}", file=sys.stderr)
        return 2
    port = server.server_address[1]
    url = f"http://{HOST}:{port}/"
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "url": url}))
        tmp.replace(args.ready_file)
    print(f"dashboard on {url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()
        server.server_close()
    return 0
