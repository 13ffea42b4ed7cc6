"""A hospital's view of its own privacy spending:

    python -m fl_client.ledger show --state_dir client_state/hospital_1

One row per training run in the privacy ledger: job, round, attempt, epsilon of the
run, cumulative epsilon after it and the budget left; then the totals. The ledger is
read through PrivacyLedger's public API only (its file format is the ledger's own
business). The ledger's settings (client id, budget, delta, accountant) default to
those the daemon recorded when it last started (the `client_started` record of
STATE_DIR/audit.jsonl); flags override them. `python -m fl_client.audit verify
STATE_DIR/audit.jsonl` checks the audit trail itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fl_core.audit import AUDIT_FILE


def _last_start(state_dir: Path) -> dict[str, Any]:
    """The settings of the daemon's last start, from its audit trail ({} if none)."""
    path = state_dir / AUDIT_FILE
    found: dict[str, Any] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "client_started":
            data = rec.get("data")
            found = data if isinstance(data, dict) else found
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fl_client.ledger",
                                description="Show this hospital's privacy ledger.")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="table of rounds, epsilon per round and cumulative,"
                                       " budget left")
    show.add_argument("--state_dir", type=Path, required=True,
                      help="the client daemon's --state_dir")
    show.add_argument("--client_id", default=None,
                      help="default: the one the daemon last started with")
    show.add_argument("--epsilon_budget", type=float, default=None,
                      help="default: the budget the daemon last started with")
    show.add_argument("--delta", type=float, default=None,
                      help="default: the delta the daemon last started with")
    show.add_argument("--accountant", default=None,
                      help="default: the accountant the daemon last started with")
    show.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def rows(ledger: Any) -> list[dict[str, Any]]:
    budget = float(ledger.total_epsilon_budget)
    out = []
    for e in ledger.entries():
        cumulative = float(getattr(e, "epsilon_cumulative", 0.0))
        out.append({
            "job_id": e.job_id, "round": int(e.round), "attempt": int(getattr(e, "attempt", 1)),
            "dp_enabled": bool(e.dp_enabled), "epsilon_round": float(e.epsilon_round),
            "epsilon_cumulative": cumulative, "budget_left": max(0.0, budget - cumulative),
            "time": float(getattr(e, "timestamp", 0.0))})
    return out


def render(ledger: Any, table: list[dict[str, Any]]) -> str:
    lines = [f"privacy ledger of {ledger.client_id}  ({ledger.path})",
             f"delta {ledger.delta:g}  accountant {getattr(ledger, 'accountant', 'rdp')}",
             "", "job                          round  try  dp   eps round  eps cumul  budget left"
                 "  when (UTC)"]
    for r in table:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["time"])) if r["time"] else "-"
        lines.append(f"{r['job_id'][:28]:<28} {r['round']:>5} {r['attempt']:>4}"
                     f"  {'yes' if r['dp_enabled'] else 'NO ':<3} {r['epsilon_round']:>9.4f}"
                     f"  {r['epsilon_cumulative']:>9.4f}  {r['budget_left']:>11.4f}  {when}")
    if not table:
        lines.append("(no training run recorded)")
    lines += ["", f"spent {ledger.spent():.4f} of {ledger.total_epsilon_budget:.4f};"
                  f" left {ledger.remaining():.4f}"]
    if ledger.non_private_runs():
        lines.append(f"WARNING: {ledger.non_private_runs()} run(s) trained WITHOUT"
                     " differential privacy: the guarantee does not cover them")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fl_client.privacy_ledger import LedgerError, PrivacyLedger

    args = build_parser().parse_args(argv)
    prog = "python -m fl_client.ledger"
    if not args.state_dir.is_dir():
        print(f"{prog}: error: {args.state_dir} is not a folder", file=sys.stderr)
        return 2
    start = _last_start(args.state_dir)
    client_id = args.client_id or start.get("client")
    budget = args.epsilon_budget if args.epsilon_budget is not None \
        else start.get("epsilon_budget")
    delta = args.delta if args.delta is not None else start.get("delta")
    accountant = args.accountant or start.get("accountant") or None
    missing = [flag for flag, v in (("--client_id", client_id), ("--epsilon_budget", budget),
                                    ("--delta", delta)) if v is None]
    if missing:
        print(f"{prog}: error: {args.state_dir / AUDIT_FILE} has no record of the daemon's"
              f" start: pass {' '.join(missing)}", file=sys.stderr)
        return 2
    try:
        kwargs = {"accountant": accountant} if accountant else {}
        ledger = PrivacyLedger(args.state_dir, str(client_id), float(str(budget)),
                               float(str(delta)), **kwargs)
    except (LedgerError, ValueError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if not ledger.path.exists():
        print(f"{prog}: error: no privacy ledger for {client_id} in {args.state_dir}",
              file=sys.stderr)
        return 2
    table = rows(ledger)
    if args.json:
        print(json.dumps({"client_id": ledger.client_id, "budget": ledger.total_epsilon_budget,
                          "spent": ledger.spent(), "left": ledger.remaining(), "rounds": table},
                         indent=2))
    else:
        print(render(ledger, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
