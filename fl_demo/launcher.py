"""Start and stop a whole federation on loopback: keys, data, a server process and
one client process per hospital.

Used by `make demo`, the end-to-end tests and the benchmarks, so all three drive
the real daemons the same way an operator would (the same CLI flags, the CSR path
for hospitals), and every process started here is stopped here, also on error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from fl_core.tls import channel_credentials, channel_options
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc

PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    """A process of the federation failed to start or died; the message says which."""


def make_pki(workdir: Path, hospitals: Sequence[str], admin: str = "operator") -> Path:
    """CA and server keys, then each hospital's own key and CSR, signed by the CA,
    as real sites would do it (the hospital's private key is written in its own
    folder, never in the server's)."""
    from fl_core.identity import generate_key_and_csr
    from fl_server.pki import generate_keys, issue_identity, sign_csr

    keys = workdir / "keys"
    generate_keys(keys)
    for name in hospitals:
        site = workdir / "sites" / name / "keys"
        _, csr_path = generate_key_and_csr(name, site)
        _, cert = sign_csr(keys, csr_path.read_bytes())
        from cryptography.hazmat.primitives.serialization import Encoding

        (site / f"{name}.crt").write_bytes(cert.public_bytes(Encoding.PEM))
        shutil.copyfile(keys / "ca.crt", site / "ca.crt")
        csr_path.unlink()
    issue_identity(keys, admin, role="admin")
    return keys


def site_keys(workdir: Path, name: str) -> Path:
    return workdir / "sites" / name / "keys"


class Federation:
    """Processes of one federation; use as a context manager so they always stop."""

    def __init__(self, workdir: Path, hospitals: Sequence[str], model_type: str,
                 log_dir: Path | None = None) -> None:
        self.workdir = workdir.resolve()  # daemons run with it as their working dir
        self.hospitals = list(hospitals)
        self.model_type = model_type
        self.log_dir = (log_dir or self.workdir / "logs").resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self._logs: list[object] = []

    # processes ----------------------------------------------------------------------
    def _spawn(self, args: list[str], log_name: str,
               extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_file = open(self.log_dir / log_name, "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log_file)
        env = {**os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.Popen([PYTHON, *args], stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=self.workdir, env=env, start_new_session=True)

    def start_server(self, extra: Sequence[str] = (), timeout_s: float = 60.0,
                     port: int = 0, env: Mapping[str, str] | None = None) -> int:
        ready = self.workdir / "server.ready"
        ready.unlink(missing_ok=True)
        args = ["-m", "fl_server.server", "--host", "127.0.0.1", "--port", str(port),
                "--keys_dir", str(self.workdir / "keys"),
                "--state_dir", str(self.workdir / "server_state"),
                "--model_type", self.model_type, "--ready_file", str(ready), *extra]
        self.server = self._spawn(args, "server.log", env)  # env: e.g. FL_FAULT_POINT
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready.exists():
                self.port = int(json.loads(ready.read_text())["port"])
                return self.port
            if self.server.poll() is not None:
                raise LaunchError(f"server exited with {self.server.returncode}:\n"
                                  + self.tail("server.log"))
            time.sleep(0.05)
        raise LaunchError("server did not become ready in time:\n" + self.tail("server.log"))

    def start_client(self, name: str, data_path: Path, extra: Sequence[str] = ()) -> None:
        args = ["-m", "fl_client.client", "--client_id", name,
                "--server_url", f"127.0.0.1:{self.port}", "--data_path", str(data_path),
                "--model_type", self.model_type, "--keys_dir", str(site_keys(self.workdir, name)),
                "--state_dir", str(self.workdir / "sites" / name / "state"), *extra]
        self.clients[name] = self._spawn(args, f"{name}.log")

    def tail(self, log_name: str, lines: int = 40) -> str:
        path = self.log_dir / log_name
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_server(self, timeout_s: float) -> int | None:
        assert self.server is not None
        try:
            return self.server.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill_server(self, sig: int = signal.SIGKILL) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(sig)
            self.server.wait(timeout=30)

    def stop_all(self, grace_s: float = 10.0) -> None:
        procs = [p for p in [self.server, *self.clients.values()] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for fh in self._logs:
            fh.close()  # type: ignore[attr-defined]
        self._logs.clear()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # operator view -----------------------------------------------------------------
    def admin_channel(self, admin: str = "operator") -> grpc.Channel:
        keys = self.workdir / "keys"
        creds = channel_credentials((keys / "ca.crt").read_bytes(),
                                    (keys / "clients" / f"{admin}.crt").read_bytes(),
                                    (keys / "clients" / f"{admin}.key").read_bytes())
        return grpc.secure_channel(f"127.0.0.1:{self.port}", creds, options=channel_options())

    def status(self, admin: str = "operator", timeout_s: float = 10.0) -> cpb.StatusReply:
        """The operator's Status call: an admin certificate is all it needs."""
        with self.admin_channel(admin) as channel:
            stub = cpb_grpc.CoordinatorStub(channel)
            return stub.Status(cpb.StatusRequest(), timeout=timeout_s)
