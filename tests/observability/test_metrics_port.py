"""The server's metrics port: one the operator typed must bind (a clear error naming
it), the default one only warns when taken; 0 turns metrics off."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from fl_server import audit as server_audit
from fl_server import metrics
from fl_server.metrics import observe


def _app(tmp_path: Path) -> SimpleNamespace:
    cfg = SimpleNamespace(state_dir=tmp_path / "state", keys_dir=tmp_path / "keys")
    return SimpleNamespace(cfg=cfg, engine=None, registry=None)


def test_busy_port_typed_is_an_error_default_only_warns(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            with pytest.raises(OSError, match=f"--metrics_port {port} on 127.0.0.1"):
                observe(_app(tmp_path), "127.0.0.1", port, port_explicit=True)
            assert observe(_app(tmp_path), "127.0.0.1", port, port_explicit=False) == 0
            assert observe(_app(tmp_path), "127.0.0.1", 0, port_explicit=True) == 0
            assert (tmp_path / "state" / "audit.jsonl").exists()
        finally:
            if metrics._LIVE is not None:  # leave no collector over a fake app behind
                metrics.REGISTRY.unregister(metrics._LIVE)
                metrics._LIVE = None
            trail = server_audit._trail
            server_audit._trail = None
            if trail is not None:
                trail.close()
