"""fl-keys and fl_client.identity as an operator and a hospital use them: real files,
real permissions, exit statuses and one-line errors."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_client import identity as client_identity
from fl_server import pki
from fl_server.tokens import identity_from_pem

REPO = Path(__file__).resolve().parents[2]


def fl_keys(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fl_server.security", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_clean_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_generate_keys_cli(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    proc = fl_keys("--generate-keys", "--out", keys, "--san", "fl.example.org", "--san", "10.1.2.3")
    assert proc.returncode == 0, proc.stderr
    for secret in ("ca.key", "server.key", "jwt/active", *(
        str(p.relative_to(keys)) for p in (keys / "jwt").glob("*.key")
    )):
        assert mode(keys / secret) == 0o600, secret
    assert len(list((keys / "jwt").glob("*.key"))) == 1
    for folder in (keys, keys / "jwt", keys / "issued"):
        assert mode(folder) == 0o700, folder
    ca = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    server = x509.load_pem_x509_certificate((keys / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert identity_from_pem((keys / "server.crt").read_bytes()) == ("fl-server", "server")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1", "::1", "10.1.2.3"
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    crl = x509.load_pem_x509_crl((keys / "crl.pem").read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert len(crl) == 0 and crl.is_signature_valid(ca_key)

    before = (keys / "ca.crt").read_bytes()
    old_jwt = next((keys / "jwt").glob("*.key"))
    assert_clean_error(fl_keys("--generate-keys", "--out", keys), "--force")
    assert (keys / "ca.crt").read_bytes() == before

    assert fl_keys("--generate-keys", "--out", keys, "--force").returncode == 0
    assert (keys / "ca.crt").read_bytes() != before
    assert not old_jwt.exists()  # a replaced installation's token key stops verifying
    assert mode(keys / "ca.key") == 0o600


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    assert_clean_error(fl_keys("--revoke", "h1", "--keys", tmp_path / "nope"), "does not exist")
    keys = tmp_path / "keys"
    pki.generate_keys(keys)
    (keys / "ca.key").write_bytes(b"not a key")
    assert_clean_error(fl_keys("--issue-client", "h1", "--keys", keys), "ca.key")
    (keys / "ca.key").unlink()
    assert_clean_error(fl_keys("--rotate-jwt-key", "--keys", keys), "missing")
    # argparse's own usage errors also exit 2
    assert fl_keys("--revoke").returncode == 2
    assert fl_keys("--generate-keys", "--rotate-jwt-key").returncode == 2


def test_help_explains_every_flag() -> None:
    proc = fl_keys("--help")
    assert proc.returncode == 0
    for flag in ("--generate-keys", "--sign-csr", "--role", "--out-cert", "--keys", "--out",
                 "--san", "--force", "--issue-client", "--issue-admin", "--revoke",
                 "--rotate-jwt-key"):
        assert flag in proc.stdout


def csr_asking_for(cn: str, ou: str | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if ou:  # ask for a server certificate too: the operator must ignore it
        csr = csr.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca_keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    pki.generate_keys(keys)
    return keys


def run_main(*args: str | Path) -> int:
    return pki.main([str(a) for a in args])


def test_sign_csr_flow(ca_keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hospital = tmp_path / "hospital"
    assert client_identity.main(["--client_id", "hospital_7", "--out", str(hospital)]) == 0
    key_path, csr_path = hospital / "hospital_7.key", hospital / "hospital_7.csr"
    assert mode(key_path) == 0o600
    key_before = key_path.read_bytes()
    assert client_identity.main(["--client_id", "hospital_7", "--out", str(hospital)]) == 2
    assert "--force" in capsys.readouterr().err
    assert key_path.read_bytes() == key_before

    out_cert = hospital / "hospital_7.crt"
    assert run_main("--sign-csr", csr_path, "--keys", ca_keys, "--out-cert", out_cert) == 0
    (hospital / "ca.crt").write_bytes((ca_keys / "ca.crt").read_bytes())
    ca_pem, cert_pem, _ = client_identity.load_client_tls(hospital, "hospital_7")
    assert cert_pem == (ca_keys / "issued" / "hospital_7.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert identity_from_pem(cert_pem) == ("hospital_7", "client")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The private key never went to the operator: nothing in the keys dir has it.
    assert all(key_before not in p.read_bytes() for p in ca_keys.rglob("*") if p.is_file())

    capsys.readouterr()
    assert run_main("--sign-csr", csr_path, "--keys", ca_keys) == 2
    assert "already issued" in capsys.readouterr().err

    assert run_main("--revoke", "hospital_7", "--keys", ca_keys) == 0
    crl = x509.load_pem_x509_crl((ca_keys / "crl.pem").read_bytes())
    ca_key = x509.load_pem_x509_certificate(ca_pem).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    # After revocation the same hospital can be re-issued (e.g. a new key), and the
    # old serial stays on the CRL.
    assert run_main("--sign-csr", csr_path, "--keys", ca_keys) == 0
    reissued = x509.load_pem_x509_certificate((ca_keys / "issued" / "hospital_7.crt").read_bytes())
    assert reissued.serial_number != cert.serial_number
    crl = x509.load_pem_x509_crl((ca_keys / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(reissued.serial_number) is None


def test_role_comes_from_the_operator_not_the_csr(ca_keys: Path, tmp_path: Path) -> None:
    csr = tmp_path / "sneaky.csr"
    csr.write_bytes(csr_asking_for("sneaky", ou="admin"))
    assert run_main("--sign-csr", csr, "--keys", ca_keys) == 0
    pem = (ca_keys / "issued" / "sneaky.crt").read_bytes()
    assert identity_from_pem(pem) == ("sneaky", "client")
    eku = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    csr.write_bytes(csr_asking_for("operator_1"))
    assert run_main("--sign-csr", csr, "--role", "admin", "--keys", ca_keys) == 0
    pem = (ca_keys / "issued" / "operator_1.crt").read_bytes()
    assert identity_from_pem(pem) == ("operator_1", "admin")


@pytest.mark.parametrize(
    ("csr_bytes", "needle"),
    [
        (lambda: b"garbage", "not a certificate signing request"),
        (lambda: csr_asking_for("../../etc"), "invalid client id"),
        (lambda: csr_asking_for("ca"), "reserved"),
        (lambda: csr_asking_for("hospital 1;rm"), "invalid client id"),
        (lambda: tampered_csr(), "signature is invalid"),
    ],
)
def test_bad_csrs_are_refused(
    ca_keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    csr_bytes: object, needle: str,
) -> None:
    csr = tmp_path / "bad.csr"
    assert callable(csr_bytes)
    csr.write_bytes(csr_bytes())
    assert run_main("--sign-csr", csr, "--keys", ca_keys) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert list((ca_keys / "issued").glob("*.crt")) == []


def tampered_csr() -> bytes:
    pem = csr_asking_for("hospital_9")
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    # The subject's CN sits in the signed part: change one character of it.
    index = bytes(der).index(b"hospital_9")
    der[index] ^= 0x01
    return bytes(der)


def test_issue_client_and_admin(ca_keys: Path) -> None:
    assert run_main("--issue-client", "hospital_1", "--keys", ca_keys) == 0
    assert run_main("--issue-admin", "ops", "--keys", ca_keys) == 0
    clients = ca_keys / "clients"
    assert mode(clients / "hospital_1.key") == 0o600 and mode(clients / "ops.key") == 0o600
    assert (clients / "ca.crt").read_bytes() == (ca_keys / "ca.crt").read_bytes()
    assert not list(clients.glob("*.csr"))
    assert identity_from_pem((clients / "ops.crt").read_bytes()) == ("ops", "admin")
    assert client_identity.load_client_tls(ca_keys, "hospital_1")[1] == (
        clients / "hospital_1.crt"
    ).read_bytes()
    key_before = (clients / "hospital_1.key").read_bytes()
    assert run_main("--issue-client", "hospital_1", "--keys", ca_keys) == 2
    # the refused re-issue left the working identity alone
    assert (clients / "hospital_1.key").read_bytes() == key_before
    assert client_identity.load_client_tls(ca_keys, "hospital_1")[2] == key_before
    assert [p.name for p in clients.iterdir() if p.name.startswith(".")] == []
    assert run_main("--revoke", "ghost", "--keys", ca_keys) == 2


def test_renew_server_reissues_only_the_server_certificate(tmp_path: Path) -> None:
    """A server certificate near its end, or a new host name: a new server key and
    certificate from the same CA; the CA, the hospitals' certificates, the CRL and the
    token keys are untouched, and the old names are kept."""
    keys = tmp_path / "keys"
    assert fl_keys("--generate-keys", "--out", keys, "--san", "fl.example.org").returncode == 0
    assert fl_keys("--issue-client", "hospital_1", "--keys", keys).returncode == 0
    untouched = {name: (keys / name).read_bytes()
                 for name in ("ca.crt", "ca.key", "crl.pem", "jwt/active",
                              "clients/hospital_1.crt")}
    old_key = (keys / "server.key").read_bytes()
    old = x509.load_pem_x509_certificate((keys / "server.crt").read_bytes())
    proc = fl_keys("--renew-server", "--keys", keys, "--san", "10.9.8.7")
    assert proc.returncode == 0, proc.stderr
    assert "restart the server" in proc.stdout
    assert {name: (keys / name).read_bytes() for name in untouched} == untouched
    assert (keys / "server.key").read_bytes() != old_key
    assert mode(keys / "server.key") == 0o600
    new = x509.load_pem_x509_certificate((keys / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate(untouched["ca.crt"])
    new.verify_directly_issued_by(ca)
    assert new.serial_number != old.serial_number
    assert identity_from_pem((keys / "server.crt").read_bytes()) == ("fl-server", "server")
    names = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    assert "10.9.8.7" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert "server_certificate_renewed" in (keys / "audit.jsonl").read_text()
    # --san belongs to the two actions that write the server certificate; --force not
    misplaced = fl_keys("--rotate-jwt-key", "--keys", keys, "--san", "x")
    assert misplaced.returncode == 2 and "--san only applies" in misplaced.stderr
    forced = fl_keys("--renew-server", "--keys", keys, "--force")
    assert forced.returncode == 2 and "--force only applies" in forced.stderr
    assert_clean_error(fl_keys("--renew-server", "--keys", tmp_path / "none"),
                       "does not exist")
