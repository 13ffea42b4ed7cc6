"""Ray missing, or a cluster that is not there: one clear line, a non-zero exit, no
traceback, and nothing left running."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from fl_sim.cli import main
from tests.sim.conftest import run_sim


def _one_clear_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("fl-sim: error: ")
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_cluster_at_the_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    code = main(["--ray_address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o"),
                 "--hospitals", "3", "--rounds", "1"])
    assert code == 3
    line = _one_clear_line(capsys.readouterr().err)
    assert f"127.0.0.1:{port}" in line and "ray start --head" in line


def test_a_port_that_is_not_ray_hits_the_watchdog(tmp_path: Path) -> None:
    """Something listens but never speaks Ray: ray.init would wait forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        port = server.getsockname()[1]
        result = run_sim(["--ray_address", f"127.0.0.1:{port}", "--ray_connect_timeout_s",
                          "8", "--out", str(tmp_path / "o"), "--hospitals", "3"],
                         timeout_s=180)
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert result.returncode == 3
    line = _one_clear_line(result.stderr)
    assert "did not answer within 8 s" in line


def test_ray_not_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as if absent
    code = main(["--out", str(tmp_path / "o"), "--hospitals", "2", "--rounds", "1"])
    assert code == 3
    line = _one_clear_line(capsys.readouterr().err)
    assert "Ray is not installed" in line
