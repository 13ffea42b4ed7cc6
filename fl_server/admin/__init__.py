"""The operator's view of a running server, and its jobs:

    python -m fl_server.admin --server_url HOST:PORT --keys_dir keys --admin operator
    python -m fl_server.admin dashboard --server_url HOST:PORT --keys_dir keys [--port 8080]
    python -m fl_server.admin submit JOB.toml | list | status JOB | abort JOB [--reason R]
    python -m fl_server.admin download JOB --out model.safetensors

Calls Status with an admin certificate (from `--issue-admin NAME`) and prints the
job, the round and its phase, each hospital (connected, last seen, epsilon spent)
and each recorded round with its metrics; `--json` prints the reply as JSON for
scripts and monitoring. `dashboard` serves the same, live, as a local web page
(fl_server/admin/dashboard.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from fl_core.tls import channel_credentials, channel_options, load_pem, parse_server_url, target
from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc

JOB_VERBS = ("submit", "list", "status", "abort", "download")
SHOWN_METRICS = ("train_loss", "eval_accuracy", "eval_auroc", "fed_accuracy", "epsilon_max")
DEFAULT_ROUNDS_SHOWN = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-admin", description="Show the state of a running federated learning server"
                                     " (`fl-admin dashboard --help`: the live web page;"
                                     " `fl-admin submit|list|status|abort|download --help`:"
                                     " its jobs).")
    add_connection_flags(p)
    p.add_argument("--json", action="store_true", help="print the Status reply as JSON")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS_SHOWN, metavar="N",
                   help="show the last N rounds (0: all of them)")
    return p


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """Where the server is and which admin certificate to call it with."""
    p.add_argument("--server_url", default="127.0.0.1:5000",
                   help="host:port, grpcs://host:port or https://host[:port]")
    p.add_argument("--keys_dir", type=Path, default=Path("keys"),
                   help="the server's keys folder (holds ca.crt and clients/<admin>.{crt,key})")
    p.add_argument("--admin", default="operator",
                   help="name of the admin certificate made with --issue-admin")
    p.add_argument("--server_name", default=None,
                   help="name to check in the server certificate when it differs from the host")
    p.add_argument("--timeout_s", type=float, default=10.0, help="seconds to wait for the server")


def admin_channel(args: argparse.Namespace) -> grpc.Channel:
    """An mTLS channel to the server with the admin certificate `--admin`."""
    host, port = parse_server_url(args.server_url)
    keys: Path = args.keys_dir
    creds = channel_credentials(load_pem(keys / "ca.crt"),
                                load_pem(keys / "clients" / f"{args.admin}.crt"),
                                load_pem(keys / "clients" / f"{args.admin}.key"))
    return grpc.secure_channel(target(host, port), creds,
                               options=channel_options(args.server_name))


def fetch_status(args: argparse.Namespace) -> cpb.StatusReply:
    with admin_channel(args) as channel:
        reply: cpb.StatusReply = cpb_grpc.CoordinatorStub(channel).Status(
            cpb.StatusRequest(), timeout=args.timeout_s)
        return reply


def render(reply: cpb.StatusReply, last_rounds: int = DEFAULT_ROUNDS_SHOWN) -> str:
    """Status as a table: the job, each hospital (with why its last task was refused and
    how much of its declared budget is left), the last `last_rounds` rounds (secure ones
    with their dropped hospitals and threshold), and the jobs queued behind it."""
    head = (f"job {reply.job_id}  model {reply.model_type}  strategy {reply.strategy}  "
            f"state {reply.job_state}" if reply.job_id else "no job yet: waiting for"
            " `fl-admin submit JOB.toml`")
    lines = [head,
             f"round {reply.round}/{reply.total_rounds}  phase {reply.phase}  "
             f"model sha256 {reply.model_sha256[:16]}",
             "", "hospital             connected  last seen  examples  epsilon  budget left"
             "  last status"]
    now = time.time()
    for c in reply.clients:
        seen = f"{now - c.last_seen_unix_ms / 1000:.0f}s ago" if c.last_seen_unix_ms else "-"
        left = f"{c.epsilon_budget_left:.2f}" if c.epsilon_budget else "-"
        status = c.last_report_status
        if c.last_report_reason:
            status += f": {c.last_report_reason}"
        lines.append(f"{c.client_id:<20} {'yes' if c.connected else 'no':<10} {seen:>9}"
                     f"  {c.num_examples:>8}  {c.epsilon_total:>7.2f}  {left:>11}  {status}")
    rounds = list(reply.rounds)
    shown = rounds[-last_rounds:] if last_rounds > 0 else rounds
    lines += [""]
    if len(shown) < len(rounds):
        lines.append(f"last {len(shown)} of {len(rounds)} rounds (--rounds 0 shows all)")
    lines.append("round  state      sel  rep  fail  seconds  waited  secure  "
                 + "  ".join(f"{m:>13}" for m in SHOWN_METRICS))
    for r in shown:
        values = "  ".join(f"{r.metrics[m]:>13.4f}" if m in r.metrics else f"{'-':>13}"
                           for m in SHOWN_METRICS)
        # secure: SecAgg+ (the server saw only the sum), dropped hospitals / threshold t
        secure = f"{r.secagg_dropped}d/t{r.secagg_threshold}" if r.secure else "no"
        lines.append(f"{r.round:>5}  {r.state:<9} {r.selected:>4} {r.reported:>4} {r.failed:>5}"
                     f"  {r.seconds:>7.2f}  {r.wait_seconds:>6.1f}  {secure:>6}  {values}")
    if reply.queue:
        lines += ["", "queued: " + ", ".join(
            f"{j.queue_position}. {j.job_id} ({j.model_type}, {j.total_rounds} rounds)"
            for j in reply.queue)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dashboard"]:
        from fl_server.admin.dashboard import main as dashboard_main

        return dashboard_main(argv[1:])
    if argv[:1] and argv[0] in JOB_VERBS:
        from fl_server.admin.jobs import main as jobs_main

        return jobs_main(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        reply = fetch_status(args)
    except (ValueError, OSError) as exc:
        print(f"fl-admin: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"fl-admin: error: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        print(render(reply, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
