"""Whole rounds with no-op clients: round time, round overhead and server memory.

    python -m bench.rounds [--quick] [--only NAME ...] [--rounds N]

The real server daemon (bench.sized_server: fl_server.server with a synthetic float32
model of a chosen size, --no_fed_eval, no --eval_data, FedAvg, checkpoint every
round) and no-op clients (bench.noop_client: real ServerConnection over mTLS with
sealing, separate processes from the server) that fetch the model and send back
small noise as their DELTA without training. Every round therefore costs exactly
the system's own work: task push, sealed download to every client, sealed upload
from every client (spool, hashes, finiteness), FedAvg fold, the new global model's
manifest and hashes, and the atomic safetensors checkpoint + SQLite record.

Per scenario: the median wall-clock time between consecutive rounds being recorded
(the first round is left out: it includes connection set-up), the server's own
`seconds` (Status rounds[].seconds: select to aggregate, without the checkpoint),
a phase breakdown from the server's log, and the server's peak RSS (VmHWM, reset
once the server is ready, so the start-up's model build is not counted; "idle" is
the RSS of the ready server with the model loaded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MB,
    BenchServer,
    Procs,
    RssSampler,
    client_names,
    cpu_seconds,
    make_bench_pki,
    median,
    peak_rss,
    print_header,
    reset_peak,
    rss,
    table,
    verdict,
    workdir,
)
from bench.transfer import load_average


@dataclass
class Scenario:
    name: str
    params: int
    clients: int
    rounds: int
    per_proc: int = 1  # no-op clients per process
    target_round_s: float | None = None
    target_rss: int | None = None  # bytes
    note: str = ""
    # a peak RSS target relative to the run: the ready server's RSS (the runtime, its
    # model loaded) plus this many models (issue 16 item 3: 2.5); replaces target_rss
    target_models_over_idle: float | None = None

    @property
    def model_bytes(self) -> int:
        return self.params * 4


def scenarios(quick: bool) -> list[Scenario]:
    r = 3 if quick else 6
    return [
        # round targets: issue 16 items 3 (2.0 s) and 2 (0.05 s), on a quiet machine
        Scenario("100MB x4", 25_000_000, 4, r, 1, 2.0, target_models_over_idle=2.5),
        Scenario("100k x10", 100_000, 10, 8 if quick else 21, 5, 0.05, None),
        Scenario("250MB x4", 62_500_000, 4, 2 if quick else 4, 1, 6.0, 1000 * MB),
        Scenario("100MB x8 uploads", 25_000_000, 8, 2 if quick else 3, 1, None,
                 3 * 100 * MB + 200 * MB, "8 clients upload at once"),
    ]


def _phases(server: BenchServer, recorded: dict[int, float]) -> dict[str, list[float]]:
    """Per-round durations of the server's phases (from its log)."""
    events = server.phase_times()
    by_round: dict[int, list[tuple[float, str]]] = {}
    for when, rnd, phase in events:
        by_round.setdefault(rnd, []).append((when, phase))
    out: dict[str, list[float]] = {"select": [], "train": [], "aggregate": [], "checkpoint": []}
    for rnd, items in by_round.items():
        if rnd <= 1 or rnd not in recorded:
            continue
        t = {phase: when for when, phase in items}  # the last attempt's times
        if {"select", "distribute", "collect", "aggregate", "checkpoint"} <= set(t):
            out["select"].append(t["distribute"] - t["select"])
            out["train"].append(t["collect"] - t["distribute"])
            out["aggregate"].append(t["checkpoint"] - t["aggregate"])
            out["checkpoint"].append(recorded[rnd] - t["checkpoint"])
    return out


def _peak_by_phase(server: BenchServer, sampler: RssSampler) -> dict[str, tuple[int, int, int]]:
    """Largest sampled (RSS, anon, file) in each server phase of rounds 2..: where a
    round's memory peaks (the fold in `train`, the new model in `aggregate`, ...)."""
    events = sorted((when, phase) for when, rnd, phase in server.phase_times() if rnd > 1)
    out: dict[str, tuple[int, int, int]] = {}
    samples = sampler.samples  # in time order, as the events: one sweep over both
    i = 0
    for (start, phase), nxt in zip(events, events[1:] + [(float("inf"), "")], strict=True):
        while i < len(samples) and samples[i][0] < start:
            i += 1
        while i < len(samples) and samples[i][0] < nxt[0]:
            _, total, anon, file = samples[i]
            if total > out.get(phase, (0, 0, 0))[0]:
                out[phase] = (int(total), int(anon), int(file))
            i += 1
    return out


def run_scenario(work: Path, sc: Scenario) -> dict[str, Any]:
    procs = Procs()
    sampler: RssSampler | None = None
    server: BenchServer | None = None
    try:
        server = BenchServer(procs, work, sc.params, name=f"server-{sc.name.replace(' ', '_')}",
                             extra=["--rounds", str(sc.rounds), "--min_clients", str(sc.clients),
                                    "--round_deadline_s", "600", "--wait_for_clients_s", "300",
                                    "--max_round_attempts", "1"])
        time.sleep(0.5)
        idle = rss(server.pid)
        reset_peak(server.pid)
        sampler = RssSampler(server.pid, 0.01)
        names = client_names(sc.clients)
        groups = [names[i:i + sc.per_proc] for i in range(0, len(names), sc.per_proc)]
        client_procs = []
        stats_files = []
        for gi, group in enumerate(groups):
            stats = work / f"noop-{sc.name.replace(' ', '_')}-{gi}.json"
            stats_files.append(stats)
            client_procs.append(procs.start(
                ["-m", "bench.noop_client", "--server", server.target, "--work", str(work),
                 "--clients", ",".join(group), "--stats_file", str(stats), "--timeout_s", "1800"],
                work / f"noop-{sc.name.replace(' ', '_')}-{gi}.log", cwd=work))
        deadline = time.monotonic() + 120 + sc.rounds * (sc.model_bytes / MB) * 0.6
        state = ""
        server_cpu: list[tuple[float, float]] = []
        while time.monotonic() < deadline:
            server_cpu.append((time.time(), cpu_seconds(server.pid)))
            status = server.status(rounds_after=sc.rounds)
            state = status.job_state
            if state in ("completed", "failed"):
                break
            if not server.proc.alive():
                raise RuntimeError(f"server died:\n{server.proc.tail()}")
            time.sleep(0.2)
        peak = peak_rss(server.pid)
        sampler.stop()
        if state != "completed":
            raise RuntimeError(f"job {state or 'unfinished'} in scenario {sc.name}:\n"
                               f"{server.proc.tail()}")
        for p in client_procs:
            p.wait(60)
        rounds = server.recorded_rounds()
        recorded = {r: t for r, st, _, t in rounds if st == "completed"}
        walls = [recorded[r] - recorded[r - 1] for r in sorted(recorded) if r - 1 in recorded]
        secs = [s for r, st, s, _ in rounds if st == "completed" and r > 1]
        phases = _phases(server, recorded)
        fetch, upload = [], []
        client_cpu = 0.0  # CPU seconds of all client processes from round 1's end to the last's
        last_round = max(recorded) if recorded else 0
        for path in stats_files:
            if path.exists():
                ends: dict[int, float] = {}
                for c in json.loads(path.read_text()).values():
                    for rec in c["records"]:
                        if rec["kind"] == "train":
                            ends[rec["round"]] = max(ends.get(rec["round"], 0.0),
                                                     rec["process_cpu"])
                        if rec["kind"] == "train" and rec["round"] > 1:
                            fetch.append(rec["fetch_s"])
                            upload.append(rec["upload_s"])
                if 1 in ends and last_round in ends:
                    client_cpu += ends[last_round] - ends[1]
        spans = last_round - 1
        # What a long job adds: the server's anonymous memory from the middle round to the
        # last (a daemon that runs for months must level off; --rounds in the thousands)
        mid = last_round // 2 + 1
        anon_growth = float("nan")
        if last_round - mid >= 2 and mid in recorded:
            anon_mid = sampler.at(recorded[mid], 2)
            anon_growth = (sampler.at(recorded[last_round], 2) - anon_mid) / (last_round - mid)
        # Server CPU rate while rounds 2.. ran, times the median round time.
        span = [(t, c) for t, c in server_cpu
                if recorded.get(1, 0) <= t <= recorded.get(last_round, 0)]
        server_cpu_round = server_cpu_hospital = float("nan")
        if len(span) > 1 and span[-1][0] > span[0][0] and spans > 0:
            rate = (span[-1][1] - span[0][1]) / (span[-1][0] - span[0][0])
            server_cpu_round = rate * median(walls)
            # Per hospital: the server's CPU over rounds 2.. (mean round, not median:
            # every round's cost counts) divided by rounds x hospitals.
            mean_round = (recorded[last_round] - recorded[1]) / spans
            server_cpu_hospital = rate * mean_round / sc.clients
        return {
            "name": sc.name, "params": sc.params, "model_bytes": sc.model_bytes,
            "clients": sc.clients, "rounds": len(recorded),
            "round_wall_s": median(walls), "round_wall_all": walls,
            "server_seconds": median(secs),
            "phases": {k: median(v) for k, v in phases.items()},
            "fetch_s": median(fetch), "upload_s": median(upload),
            "server_cpu_per_round": server_cpu_round,
            "server_cpu_per_hospital": server_cpu_hospital,
            "client_cpu_per_round": client_cpu / spans if spans > 0 else float("nan"),
            "idle_rss": idle, "peak_rss": peak,
            "peak_anon": sampler.max(2), "peak_file": sampler.max(3),
            "peak_by_phase": _peak_by_phase(server, sampler),
            "anon_growth_per_round": anon_growth, "growth_from_round": mid,
            "target_round_s": sc.target_round_s, "note": sc.note,
            "target_rss": sc.target_rss if sc.target_models_over_idle is None
            else int(idle + sc.target_models_over_idle * sc.model_bytes),
            "target_rss_rule": "" if sc.target_models_over_idle is None
            else f"idle + {sc.target_models_over_idle:g} x model = ",
        }
    finally:
        if sampler is not None:
            sampler.stop()
        if server is not None:
            server.close()
        procs.stop_all()


def report(results: list[dict[str, Any]]) -> None:
    print_header("Rounds with no-op clients (mTLS + sealing, FedAvg, checkpoint every round)")
    rows = []
    for r in results:
        ph = r["phases"]
        rows.append([
            r["name"], f"{r['model_bytes'] / MB:.1f}", r["clients"], r["rounds"],
            f"{r['round_wall_s']:.3f}", f"{r['server_seconds']:.3f}",
            f"{ph.get('train', float('nan')):.3f}", f"{ph.get('aggregate', float('nan')):.3f}",
            f"{ph.get('checkpoint', float('nan')):.3f}",
            f"{r['fetch_s']:.3f}", f"{r['upload_s']:.3f}",
            f"{r['server_cpu_per_round']:.3f}",
            f"{r.get('server_cpu_per_hospital', float('nan')) * 1000:.2f}",
            f"{r['client_cpu_per_round']:.2f}",
            f"{r['idle_rss'] / MB:.0f}", f"{r['peak_rss'] / MB:.0f}",
            f"{r['peak_anon'] / MB:.0f}/{r['peak_file'] / MB:.0f}",
        ])
    print(table(["scenario", "model MB", "clients", "rounds", "round s (wall, median)",
                 "server s", "train phase s", "aggregate s", "checkpoint s",
                 "client fetch s", "client upload s", "server CPU s/round",
                 "server CPU ms/hospital/round", "clients CPU s/round", "server idle RSS MB",
                 "server peak RSS MB", "peak anon/file MB (sampled)"], rows))
    print()
    for r in results:
        parts = []
        if r["target_round_s"] is not None:
            ok = r["round_wall_s"] <= r["target_round_s"]
            parts.append(f"round {r['round_wall_s']:.3f} s (target <= {r['target_round_s']} s: "
                         f"{verdict(ok)})")
        if r["target_rss"] is not None:
            ok = r["peak_rss"] <= r["target_rss"]
            parts.append(f"server peak RSS {r['peak_rss'] / MB:.0f} MB = "
                         f"{r['peak_rss'] / r['model_bytes']:.1f}x model (target <= "
                         f"{r.get('target_rss_rule', '')}"
                         f"{r['target_rss'] / MB:.0f} MB: {verdict(ok)}); idle "
                         f"{r['idle_rss'] / MB:.0f} MB, so the rounds added "
                         f"{(r['peak_rss'] - r['idle_rss']) / MB:.0f} MB")
        if r.get("peak_by_phase"):
            parts.append("sampled peak RSS (anon/file) MB by phase, rounds 2..: " + ", ".join(
                f"{ph} {v[0] / MB:.0f} ({v[1] / MB:.0f}/{v[2] / MB:.0f})"
                for ph, v in r["peak_by_phase"].items()))
        growth = r.get("anon_growth_per_round", float("nan"))
        if growth == growth:  # not NaN: enough rounds
            parts.append(f"server anonymous RSS {growth / 1024:+.1f} KB per round over rounds "
                         f"{r['growth_from_round']}..{r['rounds']}")
        if parts:
            print(f"- {r['name']}: " + "; ".join(parts))
    small = [r for r in results if r["params"] <= 1_000_000]
    if small:
        print(f"- round overhead (fixed cost of a round, tiny model, no-op clients): "
              f"{small[0]['round_wall_s'] * 1000:.0f} ms per round with {small[0]['clients']} "
              f"clients; server CPU {small[0]['server_cpu_per_hospital'] * 1000:.2f} ms per "
              "hospital per round")
    print(f"- load average during the run: {load_average()}")
    sys.stdout.flush()


def run(quick: bool = False, only: list[str] | None = None, keep: bool = False,
        rounds: int | None = None) -> list[dict]:
    chosen = [s for s in scenarios(quick) if not only or any(o in s.name for o in only)]
    for sc in chosen:
        if rounds is not None:  # more rounds: steadier medians on a noisy machine
            sc.rounds = max(2, rounds)
    results = []
    with workdir("rounds", keep) as work:
        make_bench_pki(work, client_names(max(s.clients for s in chosen)))
        for sc in chosen:
            print(f"running scenario {sc.name} (load {load_average()}) ...", file=sys.stderr,
                  flush=True)
            results.append(run_scenario(work, sc))
    report(results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.rounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--rounds", type=int, help="rounds per scenario (overrides the default)")
    p.add_argument("--only", nargs="*", help="scenario names containing these strings")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results = run(args.quick, args.only, args.keep, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
