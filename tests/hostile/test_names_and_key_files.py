"""Identity names and key files (issue 11 item 9), through the real command lines.

- The CA tooling compares names case-folded and without trailing dots before its
  uniqueness check: HOSPITAL_1 or "hospital_1." beside hospital_1 is refused (one
  line, non-zero exit, nothing issued), and accepted once hospital_1 is revoked.
- A server whose private keys can be read by group or others does not start: one
  line naming the file and the chmod to run, exit 2, the state folder untouched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_demo.launcher import make_pki
from tests.hostile.kit import env_with_repo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env_with_repo(),
                          capture_output=True, text=True, timeout=120)


def _csr(tmp: Path, name: str, tag: str = "") -> Path:
    out = tmp / "site" / (name.replace(".", "_dot") + tag)
    done = _run("-m", "fl_client.identity", "--client_id", name, "--out", str(out), cwd=tmp)
    assert done.returncode == 0, done.stderr
    return out / f"{name}.csr"


def test_lookalike_names_are_one_identity(tmp_path: Path) -> None:
    keys = make_pki(tmp_path, ["hospital_1"])
    issued_before = sorted(p.name for p in (keys / "issued").iterdir())
    for lookalike in ("HOSPITAL_1", "hospital_1.", "Hospital_1.."):
        done = _run("-m", "fl_server.pki", "--keys", str(keys), "--sign-csr",
                    str(_csr(tmp_path, lookalike)), cwd=tmp_path)
        assert done.returncode != 0, (lookalike, done.stdout)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "hospital_1" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (keys / "issued").iterdir()) == issued_before
    # a different name is fine; so is the lookalike once the original is revoked
    assert _run("-m", "fl_server.pki", "--keys", str(keys), "--sign-csr",
                str(_csr(tmp_path, "hospital_2")), cwd=tmp_path).returncode == 0
    assert _run("-m", "fl_server.pki", "--keys", str(keys), "--revoke", "hospital_1",
                cwd=tmp_path).returncode == 0
    done = _run("-m", "fl_server.pki", "--keys", str(keys), "--sign-csr",
                str(_csr(tmp_path, "HOSPITAL_1", "-again")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("key_file,mode", [("server.key", 0o644), ("ca.key", 0o640)])
def test_server_with_readable_private_keys_refuses_to_start(tmp_path: Path, key_file: str,
                                                            mode: int) -> None:
    keys = make_pki(tmp_path, [])
    (keys / key_file).chmod(mode)
    state = tmp_path / "state"
    done = _run("-m", "fl_server.server", "--host", "127.0.0.1", "--port", "0",
                "--keys_dir", str(keys), "--state_dir", str(state),
                "--model_type", "breast_cancer", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert f"chmod 600 {keys / key_file}" in errors[0], errors[0]
    assert "Traceback" not in done.stderr
    assert not (state / "server.db").exists()
    (keys / key_file).chmod(0o600)
