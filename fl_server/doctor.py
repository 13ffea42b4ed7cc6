"""Check the server's site before it goes live: `python -m fl_server.doctor --keys_dir keys
--state_dir server_state --host 0.0.0.0 --port 5000 --public_name fl.example.org` (or
`--config server.toml`, reading the same keys as the server).

One line per check, OK / WARN / FAIL, each failure with its fix; exit 1 when any
check fails. Checks: the key files (server certificate and key present, matching,
signed by ca.crt, in date, private), the names hospitals will dial (in the
certificate, resolvable), the revocation list (signed by the CA, in date), the token
key, the state folder (writable, not held by another server) and the listening
address (resolves, is this machine's, the port is free).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtensionOID

from fl_core.constants import DEFAULT_PORT
from fl_core.site_checks import (
    FAIL,
    OK,
    WARN,
    CertFiles,
    Check,
    bind_problem,
    check_cert_files,
    check_resolves,
    check_writable,
    report,
)
from fl_core.statelock import StateLock, StateLockError

RENEW = ("re-issue the server certificate: fl-keys --generate-keys --force --out KEYS"
         " --san NAME (a new CA: every hospital needs the new ca.crt and certificate)")
_FROM_TOML = ("keys_dir", "state_dir", "host", "port")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fl_server.doctor",
        description="Check the server's site before it goes live; one line per check with"
                    " its fix; exit 1 if any check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, help="the server's TOML config (keys_dir,"
                   " state_dir, host and port are read from it; flags win)")
    p.add_argument("--keys_dir", type=Path, default=None, help="server keys (default keys)")
    p.add_argument("--state_dir", type=Path, default=None,
                   help="server state folder (default server_state)")
    p.add_argument("--host", default=None, help="address the server will listen on"
                   " (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--public_name", action="append", default=[],
                   help="a name hospitals dial (their --server_url host); repeatable")
    return p


def settings(args: argparse.Namespace) -> tuple[Path, Path, str, int]:
    """keys_dir, state_dir, host, port: flag, else the server's TOML, else the default."""
    values: dict[str, object] = {}
    if args.config is not None:
        try:
            with args.config.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"config file {args.config}: {exc}") from None
        values = {k: data[k] for k in _FROM_TOML if k in data}
    for key in _FROM_TOML:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return (Path(str(values.get("keys_dir", "keys"))),
            Path(str(values.get("state_dir", "server_state"))),
            str(values.get("host", "127.0.0.1")), int(str(values.get("port", DEFAULT_PORT))))


def _names_in(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return set(), set()
    assert isinstance(san, x509.SubjectAlternativeName)
    return ({n.lower() for n in san.get_values_for_type(x509.DNSName)},
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def check_public_names(server_crt: Path, names: list[str]) -> list[Check]:
    try:
        cert = x509.load_pem_x509_certificate(server_crt.read_bytes())
    except (OSError, ValueError):
        return []  # reported by the file checks
    dns, ips = _names_in(cert)
    shown = ", ".join(sorted(dns) + sorted(ips))
    if not names:
        return [Check(WARN, "public names", f"none given; {server_crt} covers {shown}",
                      "pass --public_name for each name hospitals put in --server_url")]
    checks: list[Check] = []
    for name in names:
        try:
            covered = str(ipaddress.ip_address(name)) in ips
        except ValueError:
            covered = name.lower().rstrip(".") in dns
        if covered:
            checks.append(Check(OK, "public name", f"{name} is in {server_crt}"))
        else:
            checks.append(Check(FAIL, "public name", f"{name} is not in {server_crt}"
                                f" (it covers {shown}); hospitals dialling it fail with a"
                                " name mismatch", RENEW.replace("NAME", name)))
        resolved = check_resolves(name, DEFAULT_PORT, "public name resolves")
        if resolved.status == FAIL:  # hospitals may resolve it where this machine cannot
            resolved = Check(WARN, resolved.name, resolved.detail, resolved.fix)
        checks.append(resolved)
    return checks


def check_crl(keys: Path) -> Check:
    path = keys / "crl.pem"
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        ca = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    except FileNotFoundError as exc:
        return Check(FAIL, "revocation list", f"{exc.filename} is missing (every call would be"
                     " refused)", f"fl-keys --generate-keys --out {keys} writes an empty one")
    except (OSError, ValueError) as exc:
        return Check(FAIL, "revocation list", f"{path}: {exc}",
                     f"restore {path} from the operator's keys folder")
    key = ca.public_key()
    if crl.issuer != ca.subject or not crl.is_signature_valid(key):  # type: ignore[arg-type]
        return Check(FAIL, "revocation list", f"{path} is not signed by {keys / 'ca.crt'}",
                     f"restore {path} from the operator's keys folder")
    if crl.next_update_utc is not None and crl.next_update_utc <= datetime.now(UTC):
        return Check(FAIL, "revocation list", f"{path} is out of date (next update was"
                     f" {crl.next_update_utc:%Y-%m-%d})", "re-issue it (fl-keys --revoke)")
    return Check(OK, "revocation list", f"{path}: {len(list(crl))} revoked, signed by the CA")


def check_token_key(keys: Path) -> Check:
    active = keys / "jwt" / "active"
    try:
        kid = active.read_text().strip()
        key = serialization.load_pem_private_key((keys / "jwt" / f"{kid}.key").read_bytes(),
                                                 password=None)
    except FileNotFoundError as exc:
        return Check(FAIL, "token key", f"{exc.filename} is missing",
                     f"fl-keys --rotate-jwt-key --keys {keys}")
    except (OSError, ValueError, TypeError) as exc:
        return Check(FAIL, "token key", f"{keys / 'jwt'}: {exc}",
                     f"fl-keys --rotate-jwt-key --keys {keys}")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        return Check(FAIL, "token key", f"jwt/{kid}.key is not an Ed25519 key",
                     f"fl-keys --rotate-jwt-key --keys {keys}")
    return Check(OK, "token key", f"{keys / 'jwt' / (kid + '.key')} (Ed25519, active)")


def check_state(state_dir: Path) -> Check:
    writable = check_writable(state_dir)
    if writable.status == FAIL:
        return writable
    try:
        StateLock(state_dir, "fl-server").acquire().release()
    except StateLockError as exc:
        return Check(FAIL, "state folder", str(exc),
                     "stop the other server, or give this one its own --state_dir")
    return writable


def check_listen(host: str, port: int) -> list[Check]:
    resolved = check_resolves(host, port, "listen address")
    if resolved.status == FAIL:
        return [resolved]
    checks = [resolved]
    problem = bind_problem(host, port)
    if problem is not None:
        return [*checks, Check(FAIL, "port free", *problem)]
    checks.append(Check(OK, "port free", f"{host}:{port} can be bound"))
    return checks


def run_checks(keys: Path, state_dir: Path, host: str, port: int,
               public_names: list[str]) -> list[Check]:
    checks = check_cert_files(CertFiles(keys / "ca.crt", keys / "server.crt",
                                        keys / "server.key", "the server's", RENEW))
    checks += check_public_names(keys / "server.crt", public_names)
    checks.append(check_crl(keys))
    checks.append(check_token_key(keys))
    checks.append(check_state(state_dir))
    checks += check_listen(host, port)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        keys, state_dir, host, port = settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"fl-server doctor: keys {keys}, state {state_dir}, listen {host}:{port}", flush=True)
    return report(run_checks(keys, state_dir, host, port, args.public_name))


if __name__ == "__main__":
    sys.exit(main())
