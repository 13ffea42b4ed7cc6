"""Trust failures over real processes: a hospital holding another federation's ca.crt,
dialling a name the server's certificate lacks, facing an expired server certificate,
holding an expired or a revoked certificate. Each exits non-zero after a bounded number
of tries (it would retry for ever before), naming the cause and the file to fix."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fl_demo.launcher import Federation, site_keys
from tests.doctor.certs import expire_client_cert, replace_server_cert
from tests.doctor.conftest import HOSPITALS, client_args, finish, spawn

# Real daemons on a shared 2-core machine: starting one (torch imports) can take a minute.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLIENT_TIMEOUT_S = 360  # each client exits seconds after starting; starting is the slow part
EXPIRES_IN = timedelta(seconds=45)  # long enough for the server to start with it


@pytest.fixture(scope="module")
def servers(root: Path) -> Iterator[tuple[Federation, Federation, datetime]]:
    """`fed`'s server, and a second one whose certificate expires soon after its start
    (a server checks its certificate's dates only when it starts)."""
    expiring = root / "expiring"
    shutil.copytree(root / "fed", expiring)
    expiry = replace_server_cert(expiring / "keys", EXPIRES_IN)
    with Federation(expiring, HOSPITALS, "breast_cancer") as old, \
            Federation(root / "fed", HOSPITALS, "breast_cancer") as fed:
        old.start_server(["--min_clients", "5"], timeout_s=EXPIRES_IN.total_seconds())
        fed.start_server(["--min_clients", "5"], timeout_s=120)
        yield fed, old, expiry


def test_trust_failures_exit_bounded_naming_cause_and_file(
        root: Path, servers: tuple[Federation, Federation, datetime]) -> None:
    fed, old, expiry = servers
    from fl_server.pki import revoke

    revoke(root / "fed" / "keys", "hospital_2")
    expired_site = root / "expired_site"
    shutil.copytree(site_keys(root / "fed", "hospital_1"), expired_site)
    expire_client_cert(root / "fed" / "keys", expired_site, "hospital_1")

    cases = {
        # another federation's identity files: the server's certificate is foreign
        "unknown_ca": client_args(root, "other", "hospital_1", fed.port),
        "name": client_args(root, "fed", "hospital_1", fed.port,
                            "--server_name", "fl.wrong.example"),
        "revoked": client_args(root, "fed", "hospital_2", fed.port),
        "own_expired": [*client_args(root, "fed", "hospital_1", fed.port),
                        "--keys_dir", str(expired_site)],
    }
    cases["server_expired"] = client_args(root, "fed", "hospital_1", old.port)
    for name, args in cases.items():  # one state folder each: a folder takes one daemon
        args += ["--state_dir", str(root / "states" / name)]
    started = time.monotonic()
    procs = {name: spawn("fl_client.client", args, root) for name, args in cases.items()
             if name != "server_expired"}
    time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds() + 1))
    procs["server_expired"] = spawn("fl_client.client", cases["server_expired"], root)
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    results = {name: finish(proc, deadline) for name, proc in procs.items()}
    elapsed = time.monotonic() - started

    fed_site = site_keys(root / "fed", "hospital_1")
    other_site = site_keys(root / "other", "hospital_1")
    rc, _, err = results["unknown_ca"]
    assert rc == 5, err[-2000:]
    assert "the server's certificate is not signed by our CA" in err
    assert f"get the federation's ca.crt from the operator into {other_site / 'ca.crt'}" in err
    assert "failed 3 times" in err  # bounded: TRUST_FAILURE_ATTEMPTS, then out

    rc, _, err = results["name"]
    assert rc == 5, err[-2000:]
    assert "the server's certificate is for another name" in err
    assert "it is for localhost, 127.0.0.1, ::1; this client checks 'fl.wrong.example'" in err
    assert "--san fl.wrong.example" in err

    rc, _, err = results["server_expired"]
    assert rc == 5, err[-2000:]
    assert "the server's certificate has expired" in err
    assert "the operator must renew keys/server.crt" in err and "clock" in err

    rc, _, err = results["revoked"]
    assert rc == 3, err[-2000:]
    assert "certificate revoked" in err
    revoked_crt = site_keys(root / "fed", "hospital_2") / "hospital_2.crt"
    assert f"put the result in {revoked_crt}" in err

    rc, _, err = results["own_expired"]
    assert rc == 2, err[-2000:]
    assert f"{expired_site / 'hospital_1.crt'} expired on" in err

    # every one of them stopped by itself, well before the harness's limit
    assert elapsed < CLIENT_TIMEOUT_S + EXPIRES_IN.total_seconds()
    assert fed_site.exists()  # nothing touched the good site's files
    assert fed.server is not None and fed.server.poll() is None  # the server stays up
