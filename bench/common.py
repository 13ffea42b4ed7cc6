"""Helpers shared by the benchmarks: processes, memory readings, medians, tables.

Every benchmark measures ratios inside one run (the baseline is measured next to
the thing it is compared with), repeats, and reports medians: the machine is shared
and noisy, so absolute numbers drift while ratios hold.

Memory is read from /proc/<pid>/status: VmRSS now, VmHWM the peak since the process
started or since `reset_peak(pid)` (which writes "5" to /proc/<pid>/clear_refs, so
a peak can be taken over one phase of a long-lived process).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MiB = 1 << 20
MB = 1_000_000


# --------------------------------------------------------------------------- numbers


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def fmt(value: float | int | str | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in cells]
    return "\n".join([line, sep, *body])


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# --------------------------------------------------------------------------- memory


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory fields of /proc/<pid>/status in bytes (VmRSS, VmHWM, RssAnon, RssFile...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def rss(pid: int | str = "self") -> int:
    return proc_status(pid).get("VmRSS", 0)


def peak_rss(pid: int | str = "self") -> int:
    return proc_status(pid).get("VmHWM", 0)


def reset_peak(pid: int | str = "self") -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def threads_of(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# --------------------------------------------------------------------------- processes


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Proc:
    """A child Python process with its own log file, stopped by `stop()` (always)."""

    def __init__(self, args: Sequence[str], log_path: Path, cwd: Path | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen([PYTHON, *args], stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=cwd or REPO_ROOT,
                                      env=bench_env(), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


class Procs:
    """Every process a benchmark starts; `stop_all` in a finally stops them all."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def start(self, args: Sequence[str], log_path: Path, cwd: Path | None = None) -> Proc:
        proc = Proc(args, log_path, cwd)
        self.items.append(proc)
        return proc

    def stop_all(self) -> None:
        # Clients first (they would only reconnect), the server last.
        for proc in reversed(self.items):
            proc.stop()
        self.items.clear()


def write_json(path: Path, data: Any) -> None:
    """Write a JSON file whole: a reader polling for it (`wait_ready`, a driver reading
    a child's stats) never sees half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def write_ready(path: Path, data: dict[str, Any]) -> None:
    """Write a child's ready file whole (`wait_ready` never reads half of one)."""
    write_json(path, data)


def add_child_flags(p: argparse.ArgumentParser) -> None:
    """The hidden flags by which a two-process benchmark starts its own server and
    client processes (`--serve`, `--client`, with their work dir, ready file and
    output file); not for users, so left out of --help."""
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def wait_ready(proc: Proc, ready: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                return json.loads(ready.read_text())
            except json.JSONDecodeError:
                pass  # written atomically by the server; another writer may not be
        if not proc.alive():
            raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"process not ready after {timeout_s:.0f}s:\n{proc.tail()}")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    base = Path(os.environ.get("FL_BENCH_TMP", tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=f"fl-bench-{prefix}-", dir=base))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- PKI


def make_bench_pki(work: Path, clients: Sequence[str]) -> Path:
    """CA, server and admin identities plus one certificate per client, through the
    same CSR path hospitals use (fl_demo.launcher.make_pki)."""
    from fl_demo.launcher import make_pki

    return make_pki(work, clients)


def client_tls(work: Path, name: str) -> tuple[bytes, bytes, bytes]:
    keys = work / "sites" / name / "keys"
    return ((keys / "ca.crt").read_bytes(), (keys / f"{name}.crt").read_bytes(),
            (keys / f"{name}.key").read_bytes())


def client_names(count: int, prefix: str = "hospital") -> list[str]:
    return [f"{prefix}_{i + 1}" for i in range(count)]


# --------------------------------------------------------------------------- server


class BenchServer:
    """The real server daemon (`python -m bench.sized_server`, i.e. fl_server.server
    with a synthetic model of `params` float32 parameters) plus the operator's view."""

    def __init__(self, procs: Procs, work: Path, params: int, extra: Sequence[str] = (),
                 name: str = "server", tensor_elems: int | None = None,
                 log_level: str = "INFO") -> None:
        self.work = work
        self.state_dir = work / f"{name}_state"
        self.log_path = work / f"{name}.log"
        ready = work / f"{name}.ready"
        ready.unlink(missing_ok=True)
        args = ["-m", "bench.sized_server", "--params", str(params)]
        if tensor_elems:
            args += ["--tensor_elems", str(tensor_elems)]
        args += ["--host", "127.0.0.1", "--port", "0", "--keys_dir", str(work / "keys"),
                 "--state_dir", str(self.state_dir), "--model_type", "sized",
                 "--ready_file", str(ready), "--no_fed_eval", "--new_job",
                 "--log_level", log_level, *extra]
        self.proc = procs.start(args, self.log_path, cwd=work)
        info = wait_ready(self.proc, ready)
        self.port = int(info["port"])
        self.pid = self.proc.pid
        self._channel: Any = None
        self._stub: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self, timeout_s: float = 30.0, rounds_after: int = 0) -> Any:
        """The server's Status; `rounds_after` as in StatusRequest (a poll that reads
        only the job's state passes the job's last round: no rounds are sent)."""
        import grpc

        from fl_core.tls import channel_credentials, channel_options
        from fl_proto import coordinator_pb2 as cpb
        from fl_proto import coordinator_pb2_grpc as cpb_grpc

        if self._stub is None:
            keys = self.work / "keys"
            creds = channel_credentials((keys / "ca.crt").read_bytes(),
                                        (keys / "clients" / "operator.crt").read_bytes(),
                                        (keys / "clients" / "operator.key").read_bytes())
            self._channel = grpc.secure_channel(self.target, creds, options=channel_options())
            self._stub = cpb_grpc.CoordinatorStub(self._channel)
        return self._stub.Status(cpb.StatusRequest(rounds_after=rounds_after),
                                 timeout=timeout_s)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None

    def recorded_rounds(self) -> list[tuple[int, str, float, float]]:
        """(round, state, seconds as the server measured it, wall-clock time recorded)
        from the server's own SQLite state (read-only)."""
        import sqlite3

        uri = f"file:{self.state_dir / 'server.db'}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=30) as conn:
            return [(int(r), str(st), float(s), float(t)) for r, st, s, t in conn.execute(
                "SELECT round, state, seconds, recorded FROM rounds ORDER BY round")]

    def phase_times(self) -> list[tuple[float, int, str]]:
        """(unix time, round, phase) of every phase the server logged."""
        import datetime as dt
        import re

        out: list[tuple[float, int, str]] = []
        pattern = re.compile(r"^ts=(\S+) .* msg=phase .*round=(\d+) phase=(\w+)")
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = pattern.match(line)
            if m:
                when = dt.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                out.append((when.timestamp(), int(m.group(2)), m.group(3)))
        return out


class RssSampler:
    """Samples a process's RSS (anonymous and file-backed) on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        import threading

        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int, int]] = []  # (t, rss, anon, file)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = proc_status(self.pid)
            except OSError:
                return
            self.samples.append((time.time(), s.get("VmRSS", 0), s.get("RssAnon", 0),
                                 s.get("RssFile", 0) + s.get("RssShmem", 0)))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def max(self, field: int = 1, since: float = 0.0, until: float = float("inf")) -> int:
        vals = [int(s[field]) for s in self.samples if since <= s[0] <= until]
        return max(vals) if vals else 0

    def at(self, when: float, field: int = 1) -> int:
        """RSS (`field` 2: anonymous, 3: file) of the last sample at or before `when`."""
        at = bisect.bisect_right(self.samples, when, key=lambda s: s[0])
        return int(self.samples[at - 1][field]) if at else 0


def connected_count(status: Any) -> int:
    return sum(1 for c in status.clients if c.connected)


def completed_rounds(status: Any) -> list[Any]:
    return [r for r in status.rounds if r.state == "completed"]


def print_header(title: str) -> None:
    print()
    print(f"## {title}")
    print()
    sys.stdout.flush()


def machine_line() -> str:
    import platform

    cores = os.cpu_count()
    try:
        with open("/proc/meminfo") as fh:
            total = int(fh.readline().split()[1]) * 1024
    except OSError:
        total = 0
    return (f"{platform.machine()}, {cores} cores, {total / (1 << 30):.0f} GiB RAM, "
            f"Python {platform.python_version()}, no GPU used")
