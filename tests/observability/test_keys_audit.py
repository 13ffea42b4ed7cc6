"""fl-keys keeps an audit trail in the keys folder: each certificate signed (with the
CSR's fingerprint), each revocation and each token-key rotation, hash-chained."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fl_core.audit import main as audit_main
from fl_core.audit import verify_trail
from fl_core.identity import generate_key_and_csr
from fl_server.pki import generate_keys, revoke, rotate_jwt_key, sign_csr


def test_signing_revocation_and_rotation_are_recorded(tmp_path: Path,
                                                       capsys) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    generate_keys(keys)
    _, csr_path = generate_key_and_csr("hospital_9", tmp_path / "site")
    csr_der = x509.load_pem_x509_csr(csr_path.read_bytes()).public_bytes(Encoding.DER)
    _, cert = sign_csr(keys, csr_path.read_bytes())
    revoke(keys, "hospital_9")
    revoke(keys, "hospital_9")  # already revoked: nothing new to record
    kid = rotate_jwt_key(keys)
    trail = keys / "audit.jsonl"
    recs = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [r["event"] for r in recs] == ["certificate_signed", "certificate_revoked",
                                         "token_key_rotated"]
    signed = recs[0]["data"]
    assert signed["client"] == "hospital_9" and signed["role"] == "client"
    assert signed["csr_sha256"] == hashlib.sha256(csr_der).hexdigest()
    assert signed["cert_sha256"] == hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    assert recs[1]["data"] == {"client": "hospital_9", "serial": f"{cert.serial_number:x}"}
    assert recs[2]["data"] == {"kid": kid}
    assert verify_trail(trail).ok
    assert audit_main(["verify", str(trail)]) == 0
    assert "OK, 3 records" in capsys.readouterr().out
