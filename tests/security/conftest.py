"""A keys directory per test module: generating a CA and a few identities takes a few
milliseconds, but sharing one per module keeps the tests independent of each other's
revocations and rotations across modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_server.pki import generate_keys, issue_identity


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    generate_keys(keys)
    for name in ("hospital_a", "hospital_b"):
        issue_identity(keys, name, "client")
    issue_identity(keys, "admin_1", "admin")
    return keys
