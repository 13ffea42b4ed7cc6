"""The operator's job verbs: `fl-admin submit | list | status | abort | download`.

Each is one call to the server with the admin certificate. `download` writes the
final model of a completed job and checks it against the hash the server recorded for
the job's last round before calling it done: a truncated or altered file is removed,
never left looking like a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from fl_proto import coordinator_pb2 as cpb
from fl_proto import coordinator_pb2_grpc as cpb_grpc
from fl_server.admin import DEFAULT_ROUNDS_SHOWN, add_connection_flags, admin_channel, render

HELP = {
    "submit": "queue a job from a TOML job file (model_type, rounds, strategy, ...)",
    "list": "every job on the server, oldest first, with its state",
    "status": "one job: its rounds, hospitals and state",
    "abort": "stop a running or queued job; hospitals stop their work on it",
    "download": "write the final model of a completed job (safetensors)",
}


def build_parser(verb: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fl-admin {verb}", description=HELP[verb])
    if verb == "submit":
        p.add_argument("job_file", type=Path,
                       help="TOML: model_type (required), rounds, strategy, strategy_params,"
                            " fraction, min_clients, quorum, epsilon_per_hospital,"
                            " secure_aggregation, ... (the server's job options) and job_id")
    elif verb in ("status", "abort", "download"):
        p.add_argument("job_id", help="the job's id (fl-admin list)")
    if verb == "abort":
        p.add_argument("--reason", default="", help="why (logged, audited, told to hospitals)")
    if verb == "download":
        p.add_argument("--out", type=Path, required=True,
                       help="file to write the model to (safetensors)")
    if verb == "status":
        p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS_SHOWN, metavar="N",
                       help="show the last N rounds (0: all of them)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_connection_flags(p)
    return p


def _show_job(job: cpb.JobInfo) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_unix_ms / 1000))
    where = f"  queue #{job.queue_position}" if job.queue_position else ""
    return (f"{job.job_id:<32} {job.state:<10} {job.model_type:<14} {job.strategy:<12}"
            f" {job.completed_rounds:>3}/{job.total_rounds:<3} {created}{where}")


def _as_json(message: object) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True),  # type: ignore[arg-type]
                      indent=2)


def _download(stub: cpb_grpc.CoordinatorStub, args: argparse.Namespace) -> str:
    """Stream the model into a temporary file beside --out; rename it once it matches."""
    from fl_server.jobs import read_model_file
    from fl_server.store import state_sha256

    out: Path = args.out
    tmp = out.with_name(f".{out.name}.part")
    digest = hashlib.sha256()
    expected = ("", "", 0, 0)
    try:
        with tmp.open("wb") as fh:
            for piece in stub.DownloadModel(cpb.JobRequest(job_id=args.job_id),
                                            timeout=max(args.timeout_s, 600.0)):
                if piece.offset != fh.tell():
                    raise ValueError(f"the server sent bytes at {piece.offset}, expected"
                                     f" {fh.tell()}")
                fh.write(piece.data)
                digest.update(piece.data)
                expected = (piece.sha256, piece.file_sha256, piece.total_bytes, piece.round)
            size = fh.tell()
        sha, file_sha, total, round_no = expected
        if size != total or digest.hexdigest() != file_sha:
            raise ValueError(f"the file is damaged ({size} of {total} bytes, or its SHA-256"
                             " differs from the server's)")
        if state_sha256(read_model_file(str(tmp))) != sha:
            raise ValueError("the model's SHA-256 is not the one recorded for the job")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return (f"wrote {out} ({size} bytes): job {args.job_id} round {round_no},"
            f" model sha256 {sha}")


def main(verb: str, argv: list[str]) -> int:
    args = build_parser(verb).parse_args(argv)
    try:
        with admin_channel(args) as channel:
            stub = cpb_grpc.CoordinatorStub(channel)
            if verb == "submit":
                text = args.job_file.read_text()
                job = stub.SubmitJob(cpb.SubmitJobRequest(job_toml=text), timeout=args.timeout_s)
                print(_as_json(job) if args.json else
                      f"queued {job.job_id} ({job.model_type}, {job.total_rounds} rounds,"
                      f" {job.strategy}) at position {job.queue_position};"
                      f" job file sha256 {job.job_sha256}")
            elif verb == "list":
                reply = stub.ListJobs(cpb.ListJobsRequest(), timeout=args.timeout_s)
                if args.json:
                    print(_as_json(reply))
                elif not reply.jobs:
                    print("no jobs yet (fl-admin submit JOB.toml)")
                else:
                    print(f"{'job':<32} {'state':<10} {'model':<14} {'strategy':<12} rounds"
                          "  created")
                    print("\n".join(_show_job(j) for j in reply.jobs))
            elif verb == "status":
                status = stub.Status(cpb.StatusRequest(job_id=args.job_id),
                                     timeout=args.timeout_s)
                print(_as_json(status) if args.json else render(status, args.rounds))
            elif verb == "abort":
                job = stub.AbortJob(cpb.JobRequest(job_id=args.job_id, reason=args.reason),
                                    timeout=args.timeout_s)
                print(_as_json(job) if args.json else f"{job.job_id}: {job.state}")
            else:
                print(_download(stub, args))
    except (ValueError, OSError) as exc:
        print(f"fl-admin {verb}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"fl-admin {verb}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0
