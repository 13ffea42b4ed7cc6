"""Both audit trails as a real federation writes them: the hospital records each update
that left it (with the server certificate's fingerprint), the server records joins,
admin calls, refusals and round outcomes, and both trails verify."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fl_core.tls import channel_credentials, channel_options
from fl_demo.launcher import REPO_ROOT, site_keys
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from tests.observability.conftest import HOSPITALS, LiveFederation, wait_for
from tests.observability.test_metrics import value

# generous: the shared federation starts in the first of these tests to run, and a loaded
# machine (other suites, torch imports) can take minutes before round 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def records(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_trails_record_what_happened_and_verify(live: LiveFederation) -> None:
    fed = live.fed
    server_trail = fed.workdir / "server_state" / "audit.jsonl"
    # a hospital certificate asking for the admin-only Status: refused and audited
    keys = site_keys(fed.workdir, "hospital_1")
    creds = channel_credentials((keys / "ca.crt").read_bytes(),
                                (keys / "hospital_1.crt").read_bytes(),
                                (keys / "hospital_1.key").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{fed.port}", creds,
                             options=channel_options()) as channel, \
            pytest.raises(grpc.RpcError) as refused:
        cpb_grpc.CoordinatorStub(channel).Status(cpb.StatusRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    fed.status()  # an admin call

    def server_events() -> set[str]:
        return {r["event"] for r in records(server_trail)} if server_trail.exists() else set()

    wait_for(lambda: {"join", "admin_call", "refusal", "round_completed"} <= server_events(),
             480, "joins, an admin call, a refusal and a round in the server's trail", fed)
    refusal = [r for r in records(server_trail) if r["event"] == "refusal"][-1]
    assert refusal["data"]["client"] == "hospital_1"
    assert refusal["data"]["method"].endswith("/Status")
    assert value(live.scrapes[-1], "fl_server_refusals_total", code=refusal["data"]["code"]) \
        or wait_for(lambda: value(live.scrapes[-1], "fl_server_refusals_total",
                                  code=refusal["data"]["code"]), 10, "the refusal metric", fed)

    server_cert = x509.load_pem_x509_certificate((fed.workdir / "keys" / "server.crt")
                                                 .read_bytes())
    fingerprint = hashlib.sha256(server_cert.public_bytes(Encoding.DER)).hexdigest()
    for name in HOSPITALS:
        trail = fed.workdir / "sites" / name / "state" / "audit.jsonl"
        wait_for(lambda t=trail: sum(r["event"] == "update_sent" for r in records(t)) >= 2,
                 480, f"two updates in {name}'s trail", fed)
        sent = [r["data"] for r in records(trail) if r["event"] == "update_sent"]
        for item in sent:
            assert item["server_cert_sha256"] == fingerprint
            assert item["secure_aggregation"] is False and item["dp_enabled"] is True
            assert item["bytes"] > 0 and item["epsilon_charged"] > 0
            assert len(item["manifest_sha256"]) == 64 and item["stream"]
        assert [item["round"] for item in sent][:2] == [1, 2]
        started = records(trail)[0]
        assert started["event"] == "client_started"
        assert started["data"]["epsilon_budget"] == 50
    for trail in [server_trail, *(fed.workdir / "sites" / n / "state" / "audit.jsonl"
                                  for n in HOSPITALS)]:
        done = subprocess.run([sys.executable, "-m", "fl_server.audit", "verify", str(trail)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
