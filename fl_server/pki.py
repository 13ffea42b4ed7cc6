"""The federation's private CA, offline: keys, certificates, revocation, token keys.

Everything an operator does to identities goes through here (CLI ``fl-keys`` /
``python -m fl_server.security``), and the running server reads the result through
fl_server/keyfiles.py and fl_server/tokens.py. The keys directory is the only state::

    ca.crt ca.key server.crt server.key crl.pem
    jwt/<kid>.key jwt/active            (Ed25519 token keys; `active` names the signer)
    issued/<name>.crt                   (every certificate the CA signed, by client id)
    clients/<name>.{key,crt} ca.crt     (only from the --issue-* demo conveniences)

A hospital's role (client/admin) is decided by the operator when signing, never read
from its CSR, and its client id is the CSR's CN, which the server later reads from
the verified certificate rather than from anything the client sends.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_core.audit import record_in
from fl_core.constants import (
    CA_VALIDITY_DAYS,
    CERT_VALIDITY_DAYS,
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_SERVER,
)
from fl_core.identity import (
    IdentityError,
    client_id_key,
    generate_key_and_csr,
    validate_client_id,
    write_private,
    write_public,
)
from fl_server.keyfiles import KeysError, b64url, load_cert_file, load_crl, read_key_file, utc_now
from fl_server.tokens import _name_attr

SERVER_CN = "fl-server"


CA_CN = "fl-hospitals federation CA"


DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


# Certificates start a few minutes in the past so a peer whose clock is slightly
# behind does not reject a certificate that was just issued.
_BACKDATE = timedelta(minutes=5)


def _load_ec_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(read_key_file(path, what), password=None)
    except (ValueError, TypeError):
        raise KeysError(f"{path} ({what}) is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeysError(f"{path} ({what}) is not an EC key")
    return key


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _load_ca(keys_dir: Path) -> _Ca:
    if not keys_dir.is_dir():
        raise KeysError(f"keys directory {keys_dir} does not exist; run fl-keys --generate-keys")
    cert = load_cert_file(keys_dir / "ca.crt", "CA certificate")
    key = _load_ec_key(keys_dir / "ca.key", "CA private key")
    if cert.public_key() != key.public_key():
        raise KeysError(f"{keys_dir / 'ca.key'} does not belong to {keys_dir / 'ca.crt'}")
    return _Ca(cert, key)


def _ski(ca: _Ca) -> x509.AuthorityKeyIdentifier:
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _leaf_cert(
    ca: _Ca,
    subject: x509.Name,
    public_key: Any,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = utc_now()
    not_after = min(now + timedelta(days=CERT_VALIDITY_DAYS), ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_ski(ca), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return x509.DNSName(name)
    except ValueError as exc:
        raise KeysError(f"invalid --san {name!r}: {exc}") from None


def _build_crl(
    ca: _Ca, revoked: Sequence[x509.RevokedCertificate], number: int
) -> x509.CertificateRevocationList:
    # nextUpdate is the CA's own expiry: the server reloads the CRL whenever the file
    # changes, so a shorter nextUpdate would only force operators into busywork
    # re-signing an unchanged list (or fail closed on a quiet weekend).
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(utc_now())
        .next_update(ca.cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_ski(ca), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, hashes.SHA256())


def _new_jwt_key(keys_dir: Path) -> str:
    """Write a fresh Ed25519 token key as jwt/<kid>.key; the kid is its RFC 7638
    thumbprint, so it names the key itself and can never point at the wrong one."""
    jwt_dir = keys_dir / "jwt"
    _mkdir_private(jwt_dir)
    key = ed25519.Ed25519PrivateKey.generate()
    kid = _jwk_thumbprint(key.public_key())
    write_private(jwt_dir / f"{kid}.key", _pem_key(key))
    return kid


def _jwk_thumbprint(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(jwk.encode("ascii")).digest())


_KEY_FILES = ("ca.key", "ca.crt", "server.key", "server.crt", "crl.pem", "jwt/active")


def generate_keys(
    keys_dir: str | os.PathLike[str], sans: Sequence[str] = (), *, force: bool = False
) -> str:
    """Create the CA, the server certificate, a token key and an empty CRL.

    Returns the active token kid. Refuses (KeysError) to replace existing keys unless
    `force`: a new CA silently invalidates every hospital's certificate.
    """
    out = Path(keys_dir)
    existing = [name for name in _KEY_FILES if (out / name).exists()]
    if existing and not force:
        raise KeysError(
            f"{out} already holds keys ({', '.join(existing)}); refusing to overwrite them "
            "(a new CA invalidates every issued certificate). Pass --force to replace them."
        )
    _mkdir_private(out)
    now = utc_now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_CN),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ca"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = _Ca(ca_cert, ca_key)
    server_key, server_cert = _server_identity(ca, sans)
    if force:
        # Token keys of a replaced installation must not stay valid for verification.
        for old in (out / "jwt").glob("*.key"):
            old.unlink()
    write_private(out / "ca.key", _pem_key(ca_key))
    write_public(out / "ca.crt", _pem_cert(ca_cert))
    write_private(out / "server.key", _pem_key(server_key))
    write_public(out / "server.crt", _pem_cert(server_cert))
    write_public(
        out / "crl.pem", _build_crl(ca, [], 1).public_bytes(serialization.Encoding.PEM)
    )
    kid = _new_jwt_key(out)
    write_private(out / "jwt" / "active", kid.encode("ascii") + b"\n")
    _mkdir_private(out / "issued")
    return kid


def _server_identity(ca: _Ca, sans: Sequence[str]
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh server key and its certificate (CN=fl-server), valid for DEFAULT_SANS
    and `sans`."""
    names: list[str] = []
    for name in (*DEFAULT_SANS, *sans):
        if name not in names:
            names.append(name)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf_cert(
        ca,
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, SERVER_CN),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_SERVER),
            ]
        ),
        server_key.public_key(),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [_general_name(n) for n in names],
    )
    return server_key, server_cert


def _san_strings(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*sans.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def renew_server(keys_dir: str | os.PathLike[str], sans: Sequence[str] = ()
                 ) -> tuple[x509.Certificate, list[str]]:
    """Re-issue only the server's key and certificate from the existing CA: for a
    server certificate near its end, a new host name, or a server key that may have
    leaked. The CA, the hospitals' certificates, the CRL and the token keys stay, so
    no hospital needs anything new. The names of the current certificate are kept
    and `sans` added; returns the new certificate and its names."""
    keys = Path(keys_dir)
    ca = _load_ca(keys)
    kept: list[str] = []
    current = keys / "server.crt"
    if current.exists():
        kept = _san_strings(load_cert_file(current, "server certificate"))
    server_key, server_cert = _server_identity(ca, [*kept, *sans])
    write_private(keys / "server.key", _pem_key(server_key))
    write_public(keys / "server.crt", _pem_cert(server_cert))
    names = _san_strings(server_cert)
    record_in(keys, "server_certificate_renewed", serial=f"{server_cert.serial_number:x}",
              names=",".join(names),
              cert_sha256=hashlib.sha256(
                  server_cert.public_bytes(serialization.Encoding.DER)).hexdigest())
    return server_cert, names


def _revoked_serials(keys_dir: Path, ca: _Ca) -> set[int]:
    crl = load_crl(keys_dir / "crl.pem", ca.cert)
    return {entry.serial_number for entry in crl}


def _is_current(cert: x509.Certificate, ca: _Ca, revoked: set[int]) -> bool:
    """Whether an issued certificate still works: signed by today's CA, not revoked,
    not expired. Certificates of a CA replaced by --force do not block a name."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.serial_number not in revoked and cert.not_valid_after_utc > utc_now()


def sign_csr(
    keys_dir: str | os.PathLike[str], csr_data: bytes, role: str = ROLE_CLIENT
) -> tuple[str, x509.Certificate]:
    """Sign a hospital's CSR as the CA; returns `(client_id, certificate)`.

    The client id is the CSR's CN; the role is `role`, whatever the CSR asks for (its
    OU and extensions are ignored). The certificate is recorded as issued/<id>.crt,
    and a name that already has a working certificate is refused, so one hospital
    cannot obtain a second identity under another's name by accident.
    """
    if role not in (ROLE_CLIENT, ROLE_ADMIN):
        raise KeysError(f"invalid role {role!r}: use {ROLE_CLIENT} or {ROLE_ADMIN}")
    base = Path(keys_dir)
    ca = _load_ca(base)
    try:
        if csr_data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(csr_data)
        else:
            csr = x509.load_der_x509_csr(csr_data)
    except ValueError:
        raise KeysError("not a certificate signing request (PEM or DER)") from None
    if not csr.is_signature_valid:
        raise KeysError("the CSR's signature is invalid (it was altered or is corrupt)")
    cn = _name_attr(csr.subject, NameOID.COMMON_NAME)
    if cn is None:
        raise KeysError("the CSR has no single common name (the client id)")
    try:
        validate_client_id(cn)
    except ValueError as exc:
        raise KeysError(f"the CSR's common name: {exc}") from None
    public_key = csr.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise KeysError(f"the CSR's EC curve {public_key.curve.name} is not P-256/P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise KeysError(f"the CSR's RSA key has {public_key.key_size} bits; need 2048+")
    else:
        raise KeysError("the CSR's key type is not supported for TLS here (use EC P-256)")
    issued_dir = base / "issued"
    _mkdir_private(issued_dir)
    _refuse_lookalike(base, ca, issued_dir, cn)
    record = issued_dir / f"{cn}.crt"
    if record.exists():
        old = load_cert_file(record, f"issued certificate of {cn}")
        if _is_current(old, ca, _revoked_serials(base, ca)):
            raise KeysError(
                f"a certificate for {cn!r} is already issued (serial {old.serial_number:x}) "
                f"and not revoked; revoke it first with --revoke {cn}"
            )
        archive = issued_dir / "replaced"
        _mkdir_private(archive)
        os.replace(record, archive / f"{cn}.{old.serial_number:x}.crt")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    cert = _leaf_cert(ca, subject, public_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    write_public(record, _pem_cert(cert))
    record_in(base, "certificate_signed", client=cn, role=role, serial=f"{cert.serial_number:x}",
              csr_sha256=hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest(),
              cert_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())
    return cn, cert


def _refuse_lookalike(base: Path, ca: _Ca, issued_dir: Path, cn: str) -> None:
    """Refuse a name that differs from a current identity only in case or a trailing
    dot (client_id_key): two certificates a person would read as one hospital."""
    key = client_id_key(cn)
    revoked = _revoked_serials(base, ca)
    for other in sorted(issued_dir.glob("*.crt")):
        name = other.name[: -len(".crt")]
        if name == cn or client_id_key(name) != key:
            continue
        if _is_current(load_cert_file(other, f"issued certificate of {name}"), ca, revoked):
            raise KeysError(
                f"{cn!r} is the same name as the issued identity {name!r} (names are"
                f" compared case-folded, without trailing dots); sign it as {name!r}, or"
                f" revoke {name!r} first with --revoke {name}")


def issue_identity(
    keys_dir: str | os.PathLike[str], name: str, role: str = ROLE_CLIENT
) -> tuple[Path, Path]:
    """Demo/test convenience: make a key+CSR as a hospital would, then sign it.

    Writes clients/<name>.key, clients/<name>.crt and clients/ca.crt; returns the
    key and certificate paths. Real hospitals run fl_client.identity themselves so
    their key never exists on the server.
    """
    base = Path(keys_dir)
    clients = base / "clients"
    _load_ca(base)  # fail on a missing keys dir before writing anything
    _mkdir_private(clients)
    # The key is made in a scratch folder and moved into place only once signed, so a
    # refused re-issue never replaces the key of a certificate that is still in use.
    with tempfile.TemporaryDirectory(dir=clients, prefix=".issue-") as scratch:
        try:
            new_key, csr_path = generate_key_and_csr(name, scratch)
        except (ValueError, IdentityError) as exc:
            raise KeysError(str(exc)) from None
        _, cert = sign_csr(base, csr_path.read_bytes(), role)
        key_path = clients / f"{name}.key"
        os.replace(new_key, key_path)
    cert_path = clients / f"{name}.crt"
    write_public(cert_path, _pem_cert(cert))
    write_public(clients / "ca.crt", read_key_file(base / "ca.crt", "CA certificate"))
    return key_path, cert_path


def revoke(keys_dir: str | os.PathLike[str], name: str) -> tuple[int, bool]:
    """Add the serial of issued/<name>.crt to crl.pem and re-sign it.

    Returns `(serial, newly_revoked)`; revoking twice is harmless. The running
    server notices the new file on its next call (RevocationList).
    """
    base = Path(keys_dir)
    ca = _load_ca(base)
    try:
        validate_client_id(name)
    except ValueError as exc:
        raise KeysError(str(exc)) from None
    record = base / "issued" / f"{name}.crt"
    if not record.exists():
        raise KeysError(f"no certificate was issued to {name!r} (no {record})")
    cert = load_cert_file(record, f"issued certificate of {name}")
    crl = load_crl(base / "crl.pem", ca.cert)
    entries = list(crl)
    if any(entry.serial_number == cert.serial_number for entry in entries):
        return cert.serial_number, False
    entries.append(
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(utc_now())
        .build()
    )
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        number = len(entries) + 1
    new_crl = _build_crl(ca, entries, number)
    write_public(base / "crl.pem", new_crl.public_bytes(serialization.Encoding.PEM))
    record_in(base, "certificate_revoked", client=name, serial=f"{cert.serial_number:x}")
    return cert.serial_number, True


def rotate_jwt_key(keys_dir: str | os.PathLike[str]) -> str:
    """Make a new token key the signer. Old keys stay in jwt/ so tokens they signed
    verify until they expire; delete an old jwt/<kid>.key to retire it at once."""
    base = Path(keys_dir)
    _load_ca(base)
    kid = _new_jwt_key(base)
    write_private(base / "jwt" / "active", kid.encode("ascii") + b"\n")
    record_in(base, "token_key_rotated", kid=kid)
    return kid


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-keys",
        description=(
            "Operate the federation's private CA: create keys, sign hospitals' "
            "certificate requests, revoke certificates, renew the server's certificate, "
            "rotate the token key. "
            "Exactly one action per run."
        ),
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--generate-keys", action="store_true",
        help="create the CA, the server certificate (CN=fl-server), the JWT signing key "
        "and an empty CRL in the keys directory; refuses to overwrite without --force",
    )
    action.add_argument(
        "--sign-csr", metavar="FILE",
        help="sign a hospital's CSR (from python -m fl_client.identity); its CN becomes "
        "the client id, --role sets the role; recorded in issued/<name>.crt",
    )
    action.add_argument(
        "--issue-client", metavar="NAME",
        help="demo convenience: create a client key and certificate in clients/ "
        "(real hospitals generate their own key and send a CSR)",
    )
    action.add_argument(
        "--issue-admin", metavar="NAME",
        help="like --issue-client, for an operator certificate with role admin",
    )
    action.add_argument(
        "--revoke", metavar="NAME",
        help="revoke issued/<NAME>.crt: its serial is added to crl.pem (re-signed); the "
        "running server refuses it from its next call",
    )
    action.add_argument(
        "--renew-server", action="store_true",
        help="re-issue only the server's key and certificate from the existing CA (keeps "
        "the current certificate's names, adds --san ones); hospitals need nothing new; "
        "restart the server to serve it",
    )
    action.add_argument(
        "--rotate-jwt-key", action="store_true",
        help="make a new token signing key active; old keys stay in jwt/ so tokens they "
        "signed still verify (delete jwt/<kid>.key to retire one)",
    )
    parser.add_argument(
        "--keys", "--out", dest="keys_dir", default="keys", metavar="DIR",
        help="the keys directory: where --generate-keys writes and what every other "
        "action reads (default ./keys)",
    )
    parser.add_argument(
        "--san", action="append", default=[], metavar="NAME",
        help="with --generate-keys or --renew-server: an extra DNS name or IP address for "
        "the server certificate (repeatable; localhost, 127.0.0.1 and ::1 are always "
        "included)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="with --generate-keys: replace existing keys (invalidates every issued "
        "certificate and token)",
    )
    parser.add_argument(
        "--role", choices=(ROLE_CLIENT, ROLE_ADMIN), default=ROLE_CLIENT,
        help="with --sign-csr: the role written into the certificate (default client); "
        "whatever the CSR asks for is ignored",
    )
    parser.add_argument(
        "--out-cert", metavar="FILE",
        help="with --sign-csr: also write the certificate here, to send to the hospital",
    )
    return parser


def _run(args: argparse.Namespace) -> None:
    keys = Path(args.keys_dir)
    if args.generate_keys:
        kid = generate_keys(keys, args.san, force=args.force)
        print(f"wrote CA, server certificate, CRL and token key (kid {kid}) to {keys}")
    elif args.sign_csr:
        csr_path = Path(args.sign_csr)
        try:
            csr_data = csr_path.read_bytes()
        except OSError as exc:
            raise KeysError(f"cannot read CSR {csr_path}: {exc.strerror}") from None
        name, cert = sign_csr(keys, csr_data, args.role)
        print(f"signed {name} (role {args.role}, serial {cert.serial_number:x})")
        print(f"recorded {keys / 'issued' / f'{name}.crt'}")
        if args.out_cert:
            write_public(Path(args.out_cert), _pem_cert(cert))
            print(f"wrote {args.out_cert}; send it with {keys / 'ca.crt'} to the hospital")
    elif args.issue_client or args.issue_admin:
        role = ROLE_CLIENT if args.issue_client else ROLE_ADMIN
        key_path, cert_path = issue_identity(keys, args.issue_client or args.issue_admin, role)
        print(f"wrote {key_path}, {cert_path} and {cert_path.parent / 'ca.crt'} ({role})")
    elif args.revoke:
        serial, new = revoke(keys, args.revoke)
        if new:
            print(f"{args.revoke} revoked (serial {serial:x}); crl.pem updated")
        else:
            print(f"{args.revoke} was already revoked (serial {serial:x}); nothing changed")
    elif args.renew_server:
        cert, names = renew_server(keys, args.san)
        print(f"wrote a new server key and certificate to {keys} (serial"
              f" {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d},"
              f" names {', '.join(names)}); restart the server to serve it")
    elif args.rotate_jwt_key:
        print(f"active token key is now {rotate_jwt_key(keys)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point (fl-keys); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.san and not (args.generate_keys or args.renew_server):
        parser.error("--san only applies to --generate-keys and --renew-server")
    if args.force and not args.generate_keys:
        parser.error("--force only applies to --generate-keys")
    if args.out_cert and not args.sign_csr:
        parser.error("--out-cert only applies to --sign-csr")
    try:
        _run(args)
    except (KeysError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

