"""Many clients against one server: idle cost per client, memory over rounds, capacity.

    python -m bench.load [--quick] [--clients 100] [--ladder 10,100,1000,5000]

All clients are no-op clients (bench.noop_client: real mTLS connections with sealing,
each with its own certificate and channel) run as threads, 50 per process (250 above
400 clients), in processes separate from the server; the model is small (100k float32
parameters) so the numbers are about holding and driving connections, not moving bytes.

1. idle: a server that never starts a round (min_clients out of reach); server RSS
   before and after `--clients` clients have joined and opened their task streams,
   divided by the number of clients.
2. rounds: the same number of clients, all selected, 10 rounds (5 with --quick):
   every round must complete; server RSS when each round is recorded, growth from
   round 2 to round 5 (the target) and from round 5 to the last (the trend).
3. capacity: N connected clients (the ladder: 10, 100, 1000, 5000) while every
   round selects 10 of them (--fraction 10/N), so the round's work is constant and
   only the number of connections held grows; the median round time once all N are
   connected, against N = 10, and the server's RSS per connection above N = 10. The
   server "holds" the largest N whose round time is under twice that of N = 10 (the
   issue 16 target: 1.5x at 5,000, at most 100 KB per idle connection). A second
   column selects all N (a full round's cost) up to 200. The server runs with its
   default flags at every N: an idle task stream holds no thread (grpc.aio).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    MB,
    BenchServer,
    Procs,
    RssSampler,
    client_names,
    connected_count,
    make_bench_pki,
    median,
    print_header,
    rss,
    table,
    threads_of,
    verdict,
    workdir,
)

PARAMS = 100_000
PER_PROC = 50
SELECTED = 10
DEFAULT_WORKERS = 512  # fl_server.config.ServerConfig.max_workers
LADDER = (10, 100, 1000, 5000)
STAGGER_S = 2.0  # between client processes (250 hospitals each) above 400 hospitals


def _start_clients(procs: Procs, work: Path, server: BenchServer, names: list[str],
                   tag: str) -> list[Any]:
    per_proc = PER_PROC if len(names) <= 400 else 5 * PER_PROC  # bounds client memory
    out = []
    for gi in range(0, len(names), per_proc):
        group = names[gi:gi + per_proc]
        out.append(procs.start(
            ["-m", "bench.noop_client", "--server", server.target, "--work", str(work),
             "--clients", ",".join(group), "--timeout_s", "3600"],
            work / f"noop-{tag}-{gi // per_proc}.log", cwd=work))
        if len(names) > 400:
            time.sleep(STAGGER_S)  # thousands of TLS handshakes at once only measure the storm
    return out


def _wait_connected(server: BenchServer, n: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if connected_count(server.status()) >= n:
                return time.time()
        except grpc.RpcError as exc:  # a busy server while thousands connect: ask again
            print(f"load: Status while {n} connect: {exc.code().name}", file=sys.stderr,
                  flush=True)
        if not server.proc.alive():
            raise RuntimeError(f"server died:\n{server.proc.tail()}")
        time.sleep(0.2)
    raise TimeoutError(f"only {connected_count(server.status())} of {n} clients connected "
                       f"after {timeout_s:.0f}s")


def idle_cost(work: Path, clients: int) -> dict[str, Any]:
    procs = Procs()
    try:
        server = BenchServer(procs, work, PARAMS, name="load-idle",
                             extra=["--rounds", "1", "--min_clients", "100000",
                                    "--wait_for_clients_s", "3600"])
        time.sleep(1.0)
        before = rss(server.pid)
        threads_before = threads_of(server.pid)
        _start_clients(procs, work, server, client_names(clients), "idle")
        _wait_connected(server, clients, 120 + clients * 0.5)
        time.sleep(3.0)  # let joins, logs and first heartbeats settle
        after = rss(server.pid)
        threads_after = threads_of(server.pid)
        server.close()
        return {"clients": clients, "rss_before": before, "rss_after": after,
                "per_client": (after - before) / clients,
                "threads_per_client": (threads_after - threads_before) / clients}
    finally:
        procs.stop_all()


def rounds_memory(work: Path, clients: int, rounds: int) -> dict[str, Any]:
    procs = Procs()
    sampler = None
    try:
        server = BenchServer(procs, work, PARAMS, name="load-rounds",
                             extra=["--rounds", str(rounds), "--min_clients", str(clients),
                                    "--wait_for_clients_s", "600", "--round_deadline_s", "300",
                                    "--max_round_attempts", "1"])
        sampler = RssSampler(server.pid, 0.02)
        _start_clients(procs, work, server, client_names(clients), "rounds")
        deadline = time.monotonic() + 300 + rounds * 60
        state = ""
        while time.monotonic() < deadline:
            state = server.status().job_state
            if state in ("completed", "failed"):
                break
            time.sleep(0.3)
        time.sleep(0.2)
        sampler.stop()
        recorded = server.recorded_rounds()
        server.close()
        completed = [r for r in recorded if r[1] == "completed"]
        at_round = {r: sampler.at(t) for r, _, _, t in completed}
        walls = [b[3] - a[3] for a, b in zip(completed, completed[1:], strict=False)]

        def growth(first: int, last: int) -> float:
            if first in at_round and last in at_round:
                return (at_round[last] - at_round[first]) / at_round[first]
            return float("nan")

        return {"clients": clients, "rounds": rounds, "job_state": state,
                "completed": len(completed), "rss_at_round": at_round,
                "round_wall_s": median(walls[1:] if len(walls) > 1 else walls),
                "growth": growth(2, 5), "growth_late": growth(5, rounds),
                "peak": sampler.max()}
    finally:
        if sampler is not None:
            sampler.stop()
        procs.stop_all()


def capacity_point(work: Path, n: int, selected: int | None, rounds_after: int) -> dict[str, Any]:
    """Median round time once all n clients are connected; `selected` per round (None: all)."""
    procs = Procs()
    try:
        pick = n if selected is None else min(selected, n)
        fraction = min(1.0, pick / n)
        server = BenchServer(procs, work, PARAMS, name=f"load-cap-{n}-{pick}",
                             extra=["--rounds", "100000", "--min_clients", str(pick),
                                    "--fraction", f"{fraction:.6f}",
                                    "--wait_for_clients_s", "1800",
                                    "--round_deadline_s", "120",
                                    "--max_round_attempts", "3", "--log_level", "WARNING"],
                             log_level="WARNING")
        _start_clients(procs, work, server, client_names(n), f"cap-{n}-{pick}")
        all_in = _wait_connected(server, n, 60 + n * 0.3)
        connected_rss = rss(server.pid)
        deadline = time.monotonic() + 60 + rounds_after * 30
        times: list[float] = []
        while time.monotonic() < deadline:
            recorded = [r for r in server.recorded_rounds() if r[1] == "completed"]
            times = [t for _, _, _, t in recorded if t > all_in]
            if len(times) >= rounds_after + 1:
                break
            if not server.proc.alive():
                raise RuntimeError(f"server died:\n{server.proc.tail()}")
            time.sleep(0.25)
        status = server.status()
        still = connected_count(status)
        server_threads = threads_of(server.pid)
        server_rss = rss(server.pid)
        server.close()
        walls = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"n": n, "selected": pick, "round_wall_s": median(walls),
                "max_workers": DEFAULT_WORKERS, "connected_rss": connected_rss,
                "rounds_measured": len(walls), "connected_at_end": still,
                "server_threads": server_threads, "server_rss": server_rss}
    finally:
        procs.stop_all()


def run(quick: bool = False, clients: int = 100, ladder: tuple[int, ...] = LADDER,
        keep: bool = False, capacity_only: bool = False) -> dict[str, Any]:
    rounds = 5 if quick else 10  # the target is on rounds 2..5; later ones show the trend
    ladder = sorted(set(ladder))
    if quick:
        clients = min(clients, 50)
        ladder = [n for n in ladder if n <= 100]
    rounds_after = 3 if quick else 6
    out: dict[str, Any] = {}
    with workdir("load", keep) as work:
        make_bench_pki(work, client_names(max(clients, max(ladder))))
        idle: dict[str, Any] = {}
        rm: dict[str, Any] = {}
        if not capacity_only:
            print("load: idle connections ...", file=sys.stderr, flush=True)
            out["idle"] = idle = idle_cost(work, clients)
            print("load: rounds ...", file=sys.stderr, flush=True)
            out["rounds"] = rm = rounds_memory(work, clients, rounds)
        cap = []
        for n in ladder:
            print(f"load: capacity n={n} ...", file=sys.stderr, flush=True)
            fixed = capacity_point(work, n, SELECTED, rounds_after)
            full = capacity_point(work, n, None, rounds_after) if n <= 200 else None
            cap.append((fixed, full))
        out["capacity"] = cap

    print_header(f"Load: {clients} no-op clients, {PARAMS // 1000}k-parameter model, one server")
    if idle and rm:
        print(table(["measure", "value"], [
            ["server RSS, no clients (MB)", f"{idle['rss_before'] / MB:.0f}"],
            [f"server RSS, {clients} idle connected clients (MB)", f"{idle['rss_after'] / MB:.0f}"],
            ["server RSS per idle connected client (KB)", f"{idle['per_client'] / 1e3:.0f}"],
            ["server threads per idle connected client", f"{idle['threads_per_client']:.2f}"],
            [f"rounds completed ({clients} clients, all selected)",
             f"{rm['completed']} of {rm['rounds']} ({rm['job_state']})"],
            ["median round s (rounds 2..)", f"{rm['round_wall_s']:.3f}"],
            ["server RSS at each round (MB)",
             ", ".join(f"r{r}: {v / MB:.0f}" for r, v in sorted(rm["rss_at_round"].items()))],
            ["server RSS growth, round 2 to 5", f"{rm['growth'] * 100:.1f}%"],
            *([[f"server RSS growth, round 5 to {rounds}", f"{rm['growth_late'] * 100:.1f}%"]]
              if rounds > 5 else []),
            ["server peak RSS (MB)", f"{rm['peak'] / MB:.0f}"],
        ]))
        print()
        print(f"- every round completed: {verdict(rm['completed'] == rm['rounds'])}; RSS growth "
              f"round 2 -> 5: {rm['growth'] * 100:.1f}% (target < 5%: "
              f"{verdict(rm['growth'] < 0.05)})")
    base = cap[0][0]["round_wall_s"]
    base_rss, base_n = cap[0][0]["connected_rss"], cap[0][0]["n"]
    rows = []
    holds = cap[0][0]["n"]
    for fixed, full in cap:
        ratio = fixed["round_wall_s"] / base
        if ratio <= 2.0 and fixed["n"] >= holds and fixed["connected_at_end"] >= fixed["n"]:
            holds = fixed["n"]
        per_conn = ((fixed["connected_rss"] - base_rss) / (fixed["n"] - base_n) / 1e3
                    if fixed["n"] > base_n else float("nan"))
        rows.append([fixed["n"], fixed["max_workers"], f"{fixed['round_wall_s']:.3f}",
                     f"{ratio:.2f}",
                     f"{full['round_wall_s']:.3f}" if full else "-",
                     fixed["connected_at_end"], fixed["server_threads"],
                     f"{fixed['connected_rss'] / MB:.0f}",
                     "-" if per_conn != per_conn else f"{per_conn:.0f}",
                     f"{fixed['server_rss'] / MB:.0f}"])
    print()
    print(table(["connected N", "--max_workers", f"round s, {SELECTED} selected", "vs N=10",
                 "round s, all N selected", "connected at end", "server threads",
                 "RSS all connected MB", f"KB per connection above N={base_n}",
                 "RSS after rounds MB"], rows))
    tested = cap[-1][0]["n"]
    more = " (the largest N tried)" if holds == tested else ""
    print()
    print(f"- one server holds {holds} connected clients{more} before a {SELECTED}-client "
          f"round's time doubles against N = 10")
    sys.stdout.flush()
    out["holds"] = holds
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--ladder", default=",".join(map(str, LADDER)),
                   help="connected clients at each capacity point (comma-separated)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--capacity_only", action="store_true",
                   help="only the capacity ladder (skip the idle-cost and rounds parts)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    ladder = tuple(int(n) for n in args.ladder.split(",") if n.strip())
    out = run(args.quick, args.clients, ladder, args.keep, args.capacity_only)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
