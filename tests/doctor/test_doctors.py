"""The doctors over real processes: against a running server, a good site passes every
check and exits 0; a site with everything wrong gets one FAIL line per broken thing,
each naming the file (or flag) and the fix, and exits 1."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_demo.launcher import Federation, site_keys
from tests.doctor.conftest import HOSPITALS, client_args, finish, spawn

# Real daemons on a shared 2-core machine: starting one (torch imports) can take a minute.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TIMEOUT_S = 360


@pytest.fixture(scope="module")
def fed(root: Path) -> Iterator[Federation]:
    with Federation(root / "fed", HOSPITALS, "breast_cancer") as federation:
        federation.start_server(["--min_clients", "5", "--log_file",
                                 str(root / "logs" / "server.log"), "--log_backups", "2"],
                                timeout_s=120)
        yield federation


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fails(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL ")]


def _broken_site(root: Path) -> Path:
    """hospital_1's key (made world-readable) with hospital_2's certificate and another
    federation's ca.crt."""
    site = root / "broken_site"
    site.mkdir()
    good = site_keys(root / "fed", "hospital_1")
    shutil.copy(good / "hospital_1.key", site / "hospital_1.key")
    (site / "hospital_1.key").chmod(0o644)
    shutil.copy(site_keys(root / "fed", "hospital_2") / "hospital_2.crt",
                site / "hospital_1.crt")
    shutil.copy(site_keys(root / "other", "hospital_1") / "ca.crt", site / "ca.crt")
    return site


def _broken_server_keys(root: Path) -> Path:
    keys = root / "broken_keys"
    shutil.copytree(root / "fed" / "keys", keys)
    shutil.copy(root / "other" / "keys" / "server.key", keys / "server.key")
    (keys / "crl.pem").unlink()
    (keys / "jwt" / "active").write_text("no-such-kid\n")
    return keys


def test_doctors_pass_a_good_site_and_name_each_broken_thing(root: Path, fed: Federation
                                                             ) -> None:
    flags = client_args(root, "fed", "hospital_1", fed.port)
    site_toml = root / "site.toml"  # the good site keeps its settings in a config file
    site_toml.write_text("".join(f'{flags[i][2:]} = "{flags[i + 1]}"\n'
                                 for i in range(0, len(flags), 2)))
    good_args = ["--config", str(site_toml)]
    broken = _broken_site(root)
    bad_args = [*client_args(root, "fed", "hospital_1", fed.port),
                "--keys_dir", str(broken), "--data_path", str(root / "no_data"),
                "--state_dir", str(root / "broken_state")]
    broken_keys = _broken_server_keys(root)
    server_good = ["--keys_dir", str(root / "fed" / "keys"), "--state_dir",
                   str(root / "fresh_state"), "--port", str(_free_port()),
                   "--public_name", "localhost"]
    server_bad = ["--keys_dir", str(broken_keys), "--state_dir",
                  str(root / "fed" / "server_state"), "--port", str(fed.port),
                  "--public_name", "fl-server.example.org"]
    procs = {"client_good": spawn("fl_client.doctor", good_args, root),
             "client_bad": spawn("fl_client.doctor", bad_args, root),
             "server_good": spawn("fl_server.doctor", server_good, root),
             "server_bad": spawn("fl_server.doctor", server_bad, root)}
    deadline = time.monotonic() + TIMEOUT_S
    results = {name: finish(proc, deadline) for name, proc in procs.items()}

    rc, out, err = results["client_good"]
    assert rc == 0, out + err[-2000:]
    assert _fails(out) == []
    for expected in ("OK   TLS handshake", "OK   server accepts this hospital: joined job",
                     "OK   clock: within", "OK   certificate chain",
                     "OK   data (train): ", "benign: ", "malignant: "):
        assert expected in out, out

    rc, out, err = results["client_bad"]
    assert rc == 1, out + err[-2000:]
    fails = "\n".join(_fails(out))
    key, crt, ca = broken / "hospital_1.key", broken / "hospital_1.crt", broken / "ca.crt"
    for expected in (
            f"key permissions: {key} is readable by others (mode 0644) -> fix: chmod 600 {key}",
            f"key matches certificate: {crt} does not belong to {key}",
            f"certificate chain: {crt} is not signed by the CA in {ca}",
            f"certificate name: {crt} is issued to 'hospital_2', not --client_id 'hospital_1'",
            f"data (train): DataFormatError: {root / 'no_data'}: does not exist",
            "TLS handshake: the server's certificate is not signed by our CA",
            f"get the federation's ca.crt from the operator into {ca}"):
        assert expected in fails, fails
    assert len(_fails(out)) == 6, fails

    rc, out, err = results["server_good"]
    assert rc == 0, out + err[-2000:]
    assert "OK   public name: localhost is in" in out and "OK   port free" in out

    rc, out, err = results["server_bad"]
    assert rc == 1, out + err[-2000:]
    fails = "\n".join(_fails(out))
    for expected in (
            f"key matches certificate: {broken_keys / 'server.crt'} does not belong to"
            f" {broken_keys / 'server.key'}",
            "public name: fl-server.example.org is not in",
            f"revocation list: {broken_keys / 'crl.pem'} is missing",
            f"token key: {broken_keys / 'jwt' / 'no-such-kid.key'} is missing",
            f"state folder {root / 'fed' / 'server_state'} is in use by another fl-server",
            f"port free: 127.0.0.1:{fed.port} is in use by another process"):
        assert expected in fails, fails
    assert fed.server is not None and fed.server.poll() is None  # nothing disturbed it
    # the server ran with --log_file: its lines are in the file, not on stderr
    assert f"msg=serving address=127.0.0.1:0 port={fed.port}" in \
        (root / "logs" / "server.log").read_text()
    assert "msg=serving" not in fed.tail("server.log", 200)
