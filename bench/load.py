"""Many clients against one server: idle cost per client, memory over rounds, capacity.

    python -m bench.load [--quick] [--clients 100] [--ladder 10,100,1000,5000]
        [--kind light|threads] [--reps R] [--fresh_transfers] [--breakdown N [--trace]]

All clients are no-op hospitals in processes separate from the server, each with its
own certificate and mTLS connection, Join, task stream and sealed transfers; the model
is small (100k float32 parameters) so the numbers are about holding and driving
connections, not moving bytes. `--kind light` (default): bench.light_clients, up to
1,250 hospitals on one asyncio loop per process; `--kind threads`: bench.noop_client,
a thread and a synchronous channel per hospital (gRPC Python polls each such channel
with a streaming call open on a thread of its own: thousands of them swamp the cores
the server runs on).

1. idle: a server that never starts a round (min_clients out of reach); server RSS
   before and after `--clients` clients have joined and opened their task streams,
   divided by the number of clients.
2. rounds: the same number of clients, all selected, 10 rounds (5 with --quick):
   every round must complete; server RSS when each round is recorded, growth from
   round 2 to round 5 (the target) and from round 5 to the last (the trend).
3. capacity: N connected clients (the ladder: 10, 100, 1000, 5000) while every
   round selects 10 of them (--fraction 10/N), so the round's work is constant and
   only the number of connections held grows; the median round time once all N are
   connected, against N = 10 (same client kind), the server's CPU per round, RSS per
   connection above N = 10, threads, sockets and load. The issue 16 target: 1.5x at
   5,000, at most 100 KB per idle connection. A second column selects all N (a full
   round's cost) up to 200 (not with --capacity_only). The server runs with its default
   flags at every N: an idle task stream holds no thread (grpc.aio).
4. --breakdown N: where an idle connection's server memory goes: N light hospitals
   that stop after TLS, after Join, or after opening the task stream, each against a
   fresh server with no round; --trace adds a tracemalloc'd server (bench.traced_server).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
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
    cpu_seconds,
    make_bench_pki,
    median,
    peak_rss,
    print_header,
    proc_status,
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
STAGGER_S = 2.0  # between thread-client processes (250 hospitals each) above 400 hospitals
KINDS = ("light", "threads")
LIGHT_PER_PROC = 1250  # light hospitals (bench.light_clients) per process, at most
LIGHT_RATE = 60.0  # new light connections per second, all processes together


class Clients:
    """The client processes of one measurement and the counts they report."""

    def __init__(self, procs: Procs, work: Path, server: BenchServer, names: list[str],
                 tag: str, kind: str = "light", mode: str = "stream",
                 fresh_transfers: bool = False) -> None:
        self.kind = kind
        self.procs: list[Any] = []
        self.status_files: list[Path] = []
        if kind == "light":
            groups = max(1, math.ceil(len(names) / LIGHT_PER_PROC))
            per_proc = math.ceil(len(names) / groups)
            for gi in range(groups):
                status = work / f"light-{tag}-{gi}.json"
                status.unlink(missing_ok=True)
                self.status_files.append(status)
                self.procs.append(procs.start(
                    ["-m", "bench.light_clients", "--server", server.target, "--work",
                     str(work), "--clients", ",".join(names[gi * per_proc:(gi + 1) * per_proc]),
                     "--mode", mode, "--rate", f"{LIGHT_RATE / groups:.2f}",
                     "--status_file", str(status), "--timeout_s", "7200",
                     *(["--fresh_transfers"] if fresh_transfers else [])],
                    work / f"light-{tag}-{gi}.log", cwd=work))
            return
        per_proc = PER_PROC if len(names) <= 400 else 5 * PER_PROC  # bounds client memory
        for gi in range(0, len(names), per_proc):
            self.procs.append(procs.start(
                ["-m", "bench.noop_client", "--server", server.target, "--work", str(work),
                 "--clients", ",".join(names[gi:gi + per_proc]), "--timeout_s", "3600"],
                work / f"noop-{tag}-{gi // per_proc}.log", cwd=work))
            if len(names) > 400:
                time.sleep(STAGGER_S)  # thousands of TLS handshakes at once only measure the storm

    def counts(self) -> dict[str, Any]:
        """The light processes' counts summed (states, reconnects, ...), their RSS
        (thread clients report only their RSS)."""
        if self.kind != "light":
            return {"states": {}, "rss": sum(rss(p.pid) for p in self.procs if p.alive())}
        total: dict[str, Any] = {"states": {}, "reconnects": 0, "failures": 0, "tasks": 0,
                                 "heartbeats": 0, "threads": 0, "loop_lag_s": 0.0,
                                 "rss": sum(rss(p.pid) for p in self.procs if p.alive())}
        for path in self.status_files:
            try:
                one = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            for state, k in one["states"].items():
                total["states"][state] = total["states"].get(state, 0) + k
            for key in ("reconnects", "failures", "tasks", "heartbeats", "threads"):
                total[key] += one[key]
            total["loop_lag_s"] = max(total["loop_lag_s"], one["loop_lag_s"])
        return total

    def wait_state(self, state: str, n: int, timeout_s: float) -> None:
        """Until the light processes report `n` hospitals in `state` (tls, joined)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.counts()["states"].get(state, 0) >= n:
                return
            if not all(p.alive() for p in self.procs):
                raise RuntimeError(f"a client process died:\n{self.procs[0].tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.counts()['states']} of {n} hospitals after {timeout_s:.0f}s")


def established(port: int) -> int:
    """TCP connections established to `port` on this host (the server's side of each)."""
    count = 0
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table_path) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            continue
    return count


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
        time.sleep(0.5)
    raise TimeoutError(f"only {connected_count(server.status())} of {n} clients connected "
                       f"after {timeout_s:.0f}s")


def idle_cost(work: Path, clients: int, kind: str = "light") -> dict[str, Any]:
    procs = Procs()
    try:
        server = BenchServer(procs, work, PARAMS, name="load-idle",
                             extra=["--rounds", "1", "--min_clients", "100000",
                                    "--wait_for_clients_s", "3600"])
        time.sleep(1.0)
        before = rss(server.pid)
        threads_before = threads_of(server.pid)
        Clients(procs, work, server, client_names(clients), "idle", kind)
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


def rounds_memory(work: Path, clients: int, rounds: int, kind: str = "light") -> dict[str, Any]:
    procs = Procs()
    sampler = None
    try:
        server = BenchServer(procs, work, PARAMS, name="load-rounds",
                             extra=["--rounds", str(rounds), "--min_clients", str(clients),
                                    "--wait_for_clients_s", "600", "--round_deadline_s", "300",
                                    "--max_round_attempts", "1"])
        sampler = RssSampler(server.pid, 0.02)
        Clients(procs, work, server, client_names(clients), "rounds", kind)
        deadline = time.monotonic() + 300 + rounds * 60
        state = ""
        while time.monotonic() < deadline:
            state = server.status(rounds_after=rounds).job_state
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


def capacity_point(work: Path, n: int, selected: int | None, rounds_after: int,
                   kind: str = "light", fresh_transfers: bool = False) -> dict[str, Any]:
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
        time.sleep(1.0)
        rss_before = rss(server.pid)
        clients = Clients(procs, work, server, client_names(n), f"cap-{n}-{pick}", kind,
                          fresh_transfers=fresh_transfers)
        started = time.monotonic()
        all_in = _wait_connected(server, n, 60 + n * 0.3)
        connect_s = time.monotonic() - started
        connected_rss, load_connected = rss(server.pid), os.getloadavg()[0]
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
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
        cpu = cpu_seconds(server.pid) - cpu0
        window = time.monotonic() - t0
        load_rounds = os.getloadavg()[0]
        status = server.status()
        still = connected_count(status)
        sockets = established(server.port)
        server_threads = threads_of(server.pid)
        server_rss, server_hwm = rss(server.pid), peak_rss(server.pid)
        status_after = proc_status(server.pid)  # anonymous vs file-backed (mapped spools)
        counts = clients.counts()
        server.close()
        walls = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"n": n, "selected": pick, "kind": kind, "round_wall_s": median(walls),
                "max_workers": DEFAULT_WORKERS, "rss_before": rss_before,
                "connected_rss": connected_rss, "connect_s": connect_s,
                "rounds_measured": len(walls), "connected_at_end": still, "sockets": sockets,
                "server_threads": server_threads, "server_rss": server_rss,
                "server_hwm": server_hwm, "server_anon": status_after.get("RssAnon", 0),
                "server_file": status_after.get("RssFile", 0),
                "server_cpu_per_round": cpu / max(1, len(times)), "server_cores": cpu / window,
                "load_connected": load_connected, "load_rounds": load_rounds,
                "client_procs": len(clients.procs), "clients": counts}
    finally:
        procs.stop_all()


class _TracedProcs(Procs):
    """Procs that start the server as bench.traced_server (tracemalloc on)."""

    def __init__(self, trace_dir: Path) -> None:
        super().__init__()
        self.trace_dir = trace_dir

    def start(self, args: Any, log_path: Path, cwd: Path | None = None) -> Any:
        args = list(args)
        if args[:2] == ["-m", "bench.sized_server"]:
            args = ["-m", "bench.traced_server", "--trace_dir", str(self.trace_dir), *args[2:]]
        return super().start(args, log_path, cwd)


def _trace(trace_dir: Path, tag: str, timeout_s: float = 120.0) -> dict[str, Any]:
    out = trace_dir / f"trace-{tag}.json"
    (trace_dir / f"request-{tag}").touch()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out.exists():
            return dict(json.loads(out.read_text()))
        time.sleep(0.2)
    raise TimeoutError(f"no tracemalloc snapshot {tag} after {timeout_s:.0f}s")


BREAKDOWN_MODES = ("tls", "join", "stream")
IDLE_WINDOW_S = 30.0  # one heartbeat interval (fl_core.constants.HEARTBEAT_INTERVAL_S)


def breakdown_point(work: Path, n: int, mode: str, trace: bool = False) -> dict[str, Any]:
    """A server that never starts a round, then n light hospitals that stop at `mode`
    (tls: connected, no call; join: + a session; stream: + the task stream): the
    server's RSS, threads and CPU per second before and after, and with `trace` the
    Python heap (tracemalloc) and its largest growth by allocation site."""
    trace_dir = work / f"trace-{mode}-{n}"
    procs: Procs = _TracedProcs(trace_dir) if trace else Procs()
    try:
        server = BenchServer(procs, work, PARAMS, name=f"load-mem-{mode}-{n}",
                             extra=["--rounds", "1", "--min_clients", "100000",
                                    "--wait_for_clients_s", "7200", "--log_level", "WARNING"],
                             log_level="WARNING")
        time.sleep(2.0)
        before = proc_status(server.pid)
        threads_before = threads_of(server.pid)
        traced_before = _trace(trace_dir, "before") if trace else None
        clients = Clients(procs, work, server, client_names(n), f"mem-{mode}-{n}", mode=mode)
        if mode == "stream":
            _wait_connected(server, n, 60 + n * 0.3)
        else:
            clients.wait_state("tls" if mode == "tls" else "joined", n, 60 + n * 0.3)
        time.sleep(5.0)  # joins, logs and the first heartbeats settle
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(IDLE_WINDOW_S)
        idle_cores = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        after = proc_status(server.pid)
        out: dict[str, Any] = {
            "n": n, "mode": mode, "sockets": established(server.port),
            "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
            "anon_before": before.get("RssAnon", 0), "anon_after": after.get("RssAnon", 0),
            "hwm": after["VmHWM"], "threads_before": threads_before,
            "threads_after": threads_of(server.pid), "idle_cores": idle_cores,
            "load": os.getloadavg()[0], "clients": clients.counts()}
        if traced_before is not None:
            traced_after = _trace(trace_dir, "after")
            out["traced_before"], out["traced_after"] = (traced_before["traced"],
                                                         traced_after["traced"])
            was = {t["where"]: t["bytes"] for t in traced_before["top"]}
            growth = [(t["where"], t["bytes"] - was.get(t["where"], 0), t["count"])
                      for t in traced_after["top"]]
            out["traced_top"] = sorted(growth, key=lambda g: -g[1])[:15]
            # what of the RSS is free heap glibc keeps (handed back by malloc_trim)
            trimmed = _trace(trace_dir, "trim")
            out["rss_before_trim"] = trimmed["rss_before_trim"]
            out["rss_after_trim"] = trimmed["rss_after_trim"]
        server.close()
        return out
    finally:
        procs.stop_all()


def _capacity_table(cap: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> int:
    """Print the ladder (one repetition); returns the largest N held under 2x N=10."""
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
        own = (fixed["connected_rss"] - fixed["rss_before"]) / fixed["n"] / 1e3
        after = (fixed["server_rss"] - fixed["rss_before"]) / fixed["n"] / 1e3
        clients = fixed["clients"]
        rows.append([fixed["n"], fixed["client_procs"], f"{fixed['round_wall_s']:.3f}",
                     f"{ratio:.2f}", f"{full['round_wall_s']:.3f}" if full else "-",
                     f"{fixed['server_cpu_per_round'] * 1e3:.0f}",
                     f"{fixed['connected_at_end']} / {fixed['sockets']}",
                     fixed["server_threads"], f"{fixed['connected_rss'] / MB:.0f}",
                     "-" if per_conn != per_conn else f"{per_conn:.0f}", f"{own:.0f}",
                     f"{after:.0f}",
                     f"{fixed['server_hwm'] / MB:.0f}", f"{fixed['connect_s']:.0f}",
                     f"{fixed['load_connected']:.1f} / {fixed['load_rounds']:.1f}",
                     clients.get("reconnects", "-")])
    print(table(["connected N", "client procs", f"round s, {SELECTED} selected", "vs N=10",
                 "round s, all N", "server CPU ms / round", "connected / sockets at end",
                 "server threads", "RSS all connected MB", f"KB / conn above N={base_n}",
                 "KB / conn, same server", "KB / conn after the timed rounds", "VmHWM MB",
                 "connect s", "load connected / rounds",
                 "client reconnects"], rows))
    return int(holds)


def _breakdown_table(points: list[dict[str, Any]]) -> None:
    rows = []
    for pt in points:
        n = pt["n"]
        traced = ((pt["traced_after"] - pt["traced_before"]) / n / 1e3
                  if "traced_after" in pt else float("nan"))
        rows.append([pt["mode"], n, pt["sockets"],
                     f"{pt['rss_before'] / MB:.0f} -> {pt['rss_after'] / MB:.0f}",
                     f"{(pt['rss_after'] - pt['rss_before']) / n / 1e3:.1f}",
                     f"{(pt['anon_after'] - pt['anon_before']) / n / 1e3:.1f}",
                     "-" if traced != traced else f"{traced:.1f}",
                     f"{pt['threads_before']} -> {pt['threads_after']}",
                     f"{pt['idle_cores'] * 100:.1f}%", f"{pt['load']:.1f}"])
    print(table(["hospitals stop at", "N", "server sockets", "server RSS MB",
                 "KB RSS / conn", "KB anon / conn", "KB Python heap / conn (tracemalloc)",
                 "server threads", "server CPU, idle", "load"], rows))
    for pt in points:
        if "rss_after_trim" in pt:
            freed = (pt["rss_before_trim"] - pt["rss_after_trim"]) / pt["n"] / 1e3
            print(f"\n{pt['mode']} x {pt['n']} (traced): malloc_trim(0) after took RSS "
                  f"{pt['rss_before_trim'] / MB:.0f} -> {pt['rss_after_trim'] / MB:.0f} MB "
                  f"({freed:.1f} KB per connection was free heap)")
        if pt.get("traced_top"):
            print(f"\n{pt['mode']} x {pt['n']}: largest Python heap growth by site")
            for where, grew, count in pt["traced_top"][:10]:
                print(f"  {grew / pt['n']:8.0f} B/conn  {count:8d} blocks  {where}")


def run(quick: bool = False, clients: int = 100, ladder: Sequence[int] = LADDER,
        keep: bool = False, capacity_only: bool = False, kind: str = "light", reps: int = 1,
        breakdown: tuple[int, ...] = (), trace: bool = False,
        rounds_after: int = 6, fresh_transfers: bool = False,
        breakdown_modes: Sequence[str] = BREAKDOWN_MODES) -> dict[str, Any]:
    rounds = 5 if quick else 10  # the target is on rounds 2..5; later ones show the trend
    ladder = sorted(set(ladder))
    if quick:
        clients = min(clients, 50)
        ladder = [n for n in ladder if n <= 100]
    rounds_after = 3 if quick else rounds_after
    out: dict[str, Any] = {"kind": kind}
    with workdir("load", keep) as work:
        make_bench_pki(work, client_names(max(clients, *ladder, *breakdown)))
        idle: dict[str, Any] = {}
        rm: dict[str, Any] = {}
        if not capacity_only:
            print("load: idle connections ...", file=sys.stderr, flush=True)
            out["idle"] = idle = idle_cost(work, clients, kind)
            print("load: rounds ...", file=sys.stderr, flush=True)
            out["rounds"] = rm = rounds_memory(work, clients, rounds, kind)
        caps = []
        for rep in range(reps if ladder else 0):  # --ladder "": the breakdown alone
            cap = []
            for n in ladder:
                print(f"load: capacity n={n} ({kind}, rep {rep + 1}) ...", file=sys.stderr,
                      flush=True)
                fixed = capacity_point(work, n, SELECTED, rounds_after, kind, fresh_transfers)
                full = (capacity_point(work, n, None, rounds_after, kind)
                        if n <= 200 and not capacity_only else None)
                cap.append((fixed, full))
            caps.append(cap)
        out["capacity"] = caps
        points = []
        for n in breakdown:
            for mode in breakdown_modes:
                print(f"load: memory n={n} mode={mode} ...", file=sys.stderr, flush=True)
                points.append(breakdown_point(work, n, mode))
            if trace:
                print(f"load: memory n={n} stream, traced ...", file=sys.stderr, flush=True)
                points.append(breakdown_point(work, n, "stream", trace=True))
        out["breakdown"] = points

    print_header(f"Load: {clients} no-op clients ({kind}), {PARAMS // 1000}k-parameter "
                 "model, one server")
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
    for rep, cap in enumerate(caps):
        print(f"\nCapacity, repetition {rep + 1} of {reps}:\n")
        holds = _capacity_table(cap)
        more = " (the largest N tried)" if holds == cap[-1][0]["n"] else ""
        print(f"\n- one server holds {holds} connected clients{more} before a {SELECTED}-"
              "client round's time doubles against N = 10")
        out["holds"] = holds
    if len(caps) > 1:
        print("\nMedian over repetitions (each ratio against its own repetition's N = 10):\n")
        rows = []
        for i, n in enumerate(ladder):
            ratios = [c[i][0]["round_wall_s"] / c[0][0]["round_wall_s"] for c in caps]
            per_conn = [(c[i][0]["connected_rss"] - c[0][0]["connected_rss"])
                        / max(1, n - ladder[0]) / 1e3 for c in caps]
            rows.append([n, f"{median(c[i][0]['round_wall_s'] for c in caps):.3f}",
                         f"{median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})",
                         "-" if i == 0 else f"{median(per_conn):.0f}"])
        print(table(["connected N", f"round s, {SELECTED} selected", "vs N=10 (each rep)",
                     "KB / conn above N=10"], rows))
    if points:
        print("\nWhere an idle connection's server memory goes (a server with no round):\n")
        _breakdown_table(points)
    sys.stdout.flush()
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
    p.add_argument("--kind", choices=KINDS, default="light",
                   help="light: bench.light_clients (one asyncio loop per process); threads: "
                        "bench.noop_client (a thread and a synchronous channel per hospital)")
    p.add_argument("--rounds_after", type=int, default=6,
                   help="rounds timed at each capacity point once all N are connected")
    p.add_argument("--reps", type=int, default=1, help="repetitions of the capacity ladder")
    p.add_argument("--breakdown", default="",
                   help="N hospitals stopping after TLS, Join, the task stream: where an "
                        "idle connection's server memory goes (comma-separated Ns)")
    p.add_argument("--breakdown_modes", default=",".join(BREAKDOWN_MODES),
                   help="which of tls,join,stream --breakdown measures (each a fresh server;"
                        " stream alone when iterating on the task stream's cost)")
    p.add_argument("--trace", action="store_true",
                   help="with --breakdown, one more server with tracemalloc (Python heap)")
    p.add_argument("--fresh_transfers", action="store_true",
                   help="light hospitals move each task's model over a new connection, "
                        "closed after (the task stream's connection carries no model)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    ladder = tuple(int(n) for n in args.ladder.split(",") if n.strip())
    breakdown = tuple(int(n) for n in args.breakdown.split(",") if n.strip())
    modes = tuple(m.strip() for m in args.breakdown_modes.split(",") if m.strip())
    unknown = sorted(set(modes) - set(BREAKDOWN_MODES))
    if unknown:
        p.error(f"--breakdown_modes: unknown {', '.join(unknown)} (of {BREAKDOWN_MODES})")
    out = run(args.quick, args.clients, ladder, args.keep, args.capacity_only, args.kind,
              max(1, args.reps), breakdown, args.trace, args.rounds_after,
              args.fresh_transfers, modes)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
