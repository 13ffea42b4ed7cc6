"""Check a hospital site before it goes live: `python -m fl_client.doctor` with the same
flags (or `--config site.toml`) as the client daemon.

One line per check, OK / WARN / FAIL / SKIP, each failure with its fix; exit 1 when
any check fails (2 for a usage error). Checks: the identity files (present, key
matches certificate, signed by ca.crt, dates, key private), the data (loads, examples
per class), the server's name and port, a TLS handshake with the site's files (the
cause named as the daemon names it), a Join (the server accepts this hospital and
its model type) and the clock against the server's (from the Join token's issue
time), and the state folder (writable; whether a daemon already runs on it).

The Join is skipped while a client daemon holds the state folder, so running the
doctor on a live site never disturbs the running daemon's session.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import grpc
import jwt

from fl_client.client import build_parser
from fl_client.config import parse_args
from fl_client.site_data import class_counts, describe
from fl_core.constants import MAX_CLOCK_SKEW_S, TLS_PROBE_TIMEOUT_S
from fl_core.site_checks import (
    FAIL,
    OK,
    SKIP,
    WARN,
    CertFiles,
    Check,
    check_cert_files,
    check_port,
    check_resolves,
    check_writable,
    report,
)
from fl_core.statelock import StateLock, StateLockError
from fl_core.tls import parse_server_url, target
from fl_core.tls_diagnosis import Cause, client_tls_files, explain, probe

RENEW = ("make a new key and CSR (python -m fl_client.identity --client_id {id}) and ask the"
         " operator to sign it (fl-keys --sign-csr)")


def check_identity(keys_dir: Path, client_id: str) -> list[Check]:
    files = client_tls_files(keys_dir, client_id)
    checks = check_cert_files(CertFiles(files.ca, files.cert, files.key, "this hospital's",
                                        RENEW.format(id=client_id)))
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError):
        return checks  # already reported
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if cn == client_id:
        checks.append(Check(OK, "certificate name", f"{files.cert} is issued to {cn!r}"))
    else:
        checks.append(Check(FAIL, "certificate name",
                            f"{files.cert} is issued to {cn!r}, not --client_id {client_id!r}",
                            f"use --client_id {cn} or the certificate issued for {client_id}"))
    return checks


def check_data(model_type: str, data_path: Path) -> tuple[list[Check], int]:
    """The task's loader on both splits, with examples per class; (checks, train size)."""
    from fl_models.registry import get_task

    try:
        task = get_task(model_type)
    except (KeyError, ValueError) as exc:
        return [Check(FAIL, "model type", str(exc).strip("'\""),
                      "use one of breast_cancer, ecg, glaucoma, pneumonia, symptom")], 0
    checks: list[Check] = []
    size = 0
    for split in ("train", "test"):
        if split == "test" and not size:
            checks.append(Check(SKIP, "data (test)", "the training data did not load"))
            continue
        try:
            data = task.load_split(data_path, split)
        except Exception as exc:  # each task raises its own DataFormatError; report any
            status = FAIL if split == "train" else WARN
            fix = (f"point --data_path at this hospital's {model_type} data (see"
                   f" fl_models/{model_type}/README.md for the layouts it reads)")
            if split == "test":
                fix = "add a test split, or accept evaluation on the training data"
            checks.append(Check(status, f"data ({split})", f"{type(exc).__name__}: {exc}", fix))
            continue
        counts = class_counts(data, task.class_names)
        empty = [name for name, n in counts.items() if n == 0]
        if split == "train":
            size = len(data)
        if len(data) == 0:
            checks.append(Check(FAIL, f"data ({split})", f"{data_path}: no examples",
                                "check --data_path"))
        elif empty:
            checks.append(Check(WARN, f"data ({split})", f"{len(data)} examples"
                                f" ({describe(counts)}); no {', '.join(empty)}",
                                "fine under label skew; otherwise check --data_path"))
        else:
            checks.append(Check(OK, f"data ({split})", f"{len(data)} examples"
                                f" ({describe(counts)})"))
    return checks, size


def check_state(state_dir: Path) -> tuple[Check, bool]:
    """(the check, whether a daemon holds the folder)."""
    writable = check_writable(state_dir)
    if writable.status == FAIL:
        return writable, False
    try:
        StateLock(state_dir, "fl-client").acquire().release()
    except StateLockError as exc:
        return Check(OK, "state folder", f"{exc}: a client daemon is running on it"), True
    return writable, False


def check_join(args: Any, host: str, port: int, num_examples: int) -> list[Check]:
    """A real Join: the server accepts this certificate and model type; the token's
    issue time gives the server's clock."""
    from fl_client.connection import ServerConnection
    from fl_client.identity import load_client_tls

    try:
        ca, cert, key = load_client_tls(args.keys_dir, args.client_id)
    except Exception as exc:
        return [Check(SKIP, "server accepts this hospital", f"identity files: {exc}")]
    conn = ServerConnection(target(host, port), ca, cert, key, args.client_id,
                            args.model_type, max(1, num_examples),
                            server_name=args.server_name, epsilon_budget=args.epsilon_budget)
    try:
        conn.connect()
        before = time.time()
        session = conn.join()
        after = time.time()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return [Check(WARN, "server accepts this hospital", f"{code.name}: {details}",
                          "another daemon is connected as this hospital; stop it first")]
        fix = "ask the operator why the server refuses this hospital"
        if "revoked" in details:
            files = client_tls_files(args.keys_dir, args.client_id)
            fix = explain(Cause.CLIENT_CERT_REVOKED, files, "", host, None).fix
        elif code == grpc.StatusCode.FAILED_PRECONDITION:
            fix = "use the --model_type the server trains, with data of that task"
        return [Check(FAIL, "server accepts this hospital", f"{code.name}: {details}", fix)]
    except Exception as exc:
        return [Check(FAIL, "server accepts this hospital", f"{type(exc).__name__}: {exc}",
                      "ask the operator")]
    finally:
        conn.close()
    checks = [Check(OK, "server accepts this hospital",
                    f"joined job {session.job_id} as {session.client_id}")]
    issued = jwt.decode(session.token, options={"verify_signature": False}).get("iat")
    if not isinstance(issued, int | float):
        checks.append(Check(SKIP, "clock", "the server's token has no issue time"))
        return checks
    # iat has 1 s resolution: compare with the call's midpoint, allow that second.
    skew = float(issued) - (before + after) / 2
    span = (after - before) / 2 + 1.0
    if abs(skew) > MAX_CLOCK_SKEW_S + span:
        checks.append(Check(FAIL, "clock", f"this machine's clock is {abs(skew):.0f} s"
                            f" {'behind' if skew > 0 else 'ahead of'} the server's",
                            "synchronise both clocks (NTP, e.g. systemd-timesyncd or chrony)"))
    else:
        checks.append(Check(OK, "clock", f"within {abs(skew) + span:.0f} s of the server's"))
    return checks


def run_checks(args: Any) -> list[Check]:
    checks: list[Check] = []
    checks += check_identity(args.keys_dir, args.client_id)
    identity_ok = all(check.status != FAIL for check in checks)
    data_checks, size = check_data(args.model_type, args.data_path)
    checks += data_checks
    state_dir = args.state_dir or Path("client_state") / args.client_id
    state, running = check_state(state_dir)
    checks.append(state)
    try:
        host, port = parse_server_url(args.server_url)
    except ValueError as exc:
        return [*checks, Check(FAIL, "server URL", str(exc), "fix --server_url")]
    resolved = check_resolves(host, port)
    checks.append(resolved)
    if resolved.status == FAIL:
        return checks
    reachable = check_port(host, port, TLS_PROBE_TIMEOUT_S)
    checks.append(reachable)
    if reachable.status == FAIL:
        return checks
    files = client_tls_files(args.keys_dir, args.client_id)
    found = probe(host, port, files, args.server_name, client_cert=identity_ok)
    if found.cause is not Cause.OK:
        checks.append(Check(FAIL, "TLS handshake", f"{found.cause.summary}: {found.detail}",
                            found.fix))
        return checks
    if not identity_ok:
        checks.append(Check(SKIP, "TLS handshake", f"the server's certificate checks out"
                            f" against {files.ca}; this site's own certificate is not tried"
                            " until the lines above are fixed"))
        return checks
    checks.append(Check(OK, "TLS handshake", f"{host}:{port} with {files.cert}"
                        f" (server name {args.server_name or host!r})"))
    if running:
        checks.append(Check(SKIP, "server accepts this hospital",
                            "a daemon is running on this site (it holds the state folder)"))
    else:
        checks += check_join(args, host, port, size)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m fl_client.doctor"
    parser.description = ("Check a hospital site before it goes live: takes the client"
                          " daemon's flags (or --config); one line per check with its fix;"
                          " exit 1 if any check fails.")
    args = parse_args(parser, argv)
    print(f"fl-client doctor: {args.client_id} -> {args.server_url} ({args.model_type},"
          f" {args.data_path})", flush=True)
    return report(run_checks(args))


if __name__ == "__main__":
    sys.exit(main())
