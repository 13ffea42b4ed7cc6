"""Secure aggregation (SecAgg+) costs.

    python -m bench.secagg [--quick] [--only mask per_hospital rounds many]

- mask: the PRG mask generator (AES-256-CTR keystream added into a uint32 buffer
  chunk by chunk), GB/s of mask on one core, next to a plain numpy uint32 add of the
  same buffer (the floor: a mask can be no faster than adding it); and the
  quantization (clip, weight, stochastic rounding) in M coordinates/s. Target: mask
  generation >= 1 GB/s per core.
- rounds: whole rounds over real processes (the real server with a synthetic model,
  bench.sized_server; no-op hospitals as in bench.rounds, which fetch the model and
  send small noise as their delta without training; a secure one runs the key
  stages while its model downloads), each scenario run plain and with
  --secure_aggregation in the same invocation, alternately (3 pairs of jobs for
  100k, 2 for 100 MB): median wall time between rounds being recorded (round 1 of
  each job left out). Targets: 100k x 10 hospitals at most 2x plain, 100 MB x 4 at
  most 1.5x.
- per_hospital: one hospital's own CPU time for a whole secure round at 100k
  parameters among n = 25, 50, 100 hospitals (verify the neighbours' signed adverts,
  Shamir-share and seal to each neighbour, open the neighbours' shares, quantize and
  mask, answer the unmask request), measured in-process on the real protocol
  objects (the network is not in it). With the complete graph the work would grow
  like n; SecAgg+ keeps it like k = O(log n).
- many: plain and secure rounds of 25, 50 and 100 no-op hospitals over real
  processes (25 hospitals per process), round wall time per hospital.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import median, print_header, table, verdict
from fl_core.constants import SECAGG_MASK_CHUNK_BYTES
from fl_core.secagg.prg import apply_mask, apply_masks
from fl_core.secagg.quantize import QuantParams, quantize_into

BENCHES = ("mask", "per_hospital", "rounds", "many")


def _time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def bench_mask(mb: int, runs: int) -> bool:
    print_header(f"Mask generation ({mb} MB vector, one core, median of {runs})")
    words = mb * 1_000_000 // 4
    buf = np.zeros(words, dtype=np.uint32)
    other = np.ones(words, dtype=np.uint32)
    seeds = [os.urandom(32) for _ in range(10)]
    small = np.zeros(SECAGG_MASK_CHUNK_BYTES // 4, dtype=np.uint32)
    reps = max(1, buf.nbytes // small.nbytes)
    def generate() -> None:
        for _ in range(reps):
            apply_mask(small, seeds[0])

    t_gen = _time(generate, runs)
    t_one = _time(lambda: apply_mask(buf, seeds[0]), runs)
    t_ten = _time(lambda: apply_masks(buf, [(s, 1) for s in seeds]), runs)
    t_add = _time(lambda: np.add(buf, other, out=buf), runs)
    params = QuantParams(24, 4.0)
    x = torch.randn(words)
    t_q = _time(lambda: quantize_into(buf, [x], 0.5, params), runs)
    gb = buf.nbytes / 1e9
    print(table(["step", "seconds", "GB of mask/s", "M coords/s"], [
        ["keystream + add, in cache (pure generation)", t_gen, gb / t_gen, words / t_gen / 1e6],
        ["1 mask over the vector", t_one, gb / t_one, words / t_one / 1e6],
        ["10 masks in one pass over the vector", t_ten, 10 * gb / t_ten,
         10 * words / t_ten / 1e6],
        ["numpy uint32 add over the vector (memory floor)", t_add, gb / t_add,
         words / t_add / 1e6],
        ["quantize (clip, weight, stochastic round)", t_q, "-", words / t_q / 1e6],
    ]))
    gbs = 10 * gb / t_ten
    ok = gbs >= 1.0
    print(f"\nmask generation {gbs:.2f} GB/s per core over a {mb} MB vector (10 masks, one"
          f" pass; target >= 1): {verdict(ok)}")
    return ok


def _one_hospital(n: int, params_count: int, ca: object, reps: int) -> tuple[int, int,
                                                                          dict[str, float]]:
    """Medians over `reps` of one hospital's CPU seconds per stage among n."""
    from cryptography.hazmat.primitives import serialization

    from fl_client.secagg_client import SecAggClientSession
    from fl_core.secagg.graph import neighbour_count, threshold
    from fl_proto import coordinator_pb2 as cpb
    from fl_proto import secagg_pb2 as spb

    ids = [f"h{i:03d}" for i in range(n)]
    k = neighbour_count(n)
    t = threshold(k, 0.5)
    cfg = spb.SecAggConfig(session_id="bench", participants=ids, threshold=t, neighbours=k,
                           bits=24, clip=4.0, weight_divisor=float(n), equal_weights=True,
                           vector_length=params_count, stage_timeout_s=10)
    task = cpb.Task(task_id="t", job_id="job", round=1, secagg=cfg)
    creds = {}
    for cid in ids:
        key, pem, _ = ca.issue(cid)  # type: ignore[attr-defined]
        creds[cid] = (pem, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    delta = [torch.randn(params_count) * 0.01]
    samples: dict[str, list[float]] = {}
    for _ in range(reps):
        sessions = {cid: SecAggClientSession(cid, task, ca.pem, *creds[cid])  # type: ignore[attr-defined]
                    for cid in ids}
        adverts = spb.AdvertiseKeysReply(adverts=[s.advert() for s in sessions.values()])
        me = sessions[ids[0]]
        boxes: list[spb.EncryptedShare] = []
        for cid, other in sessions.items():  # the shares the server would relay to me
            if cid != ids[0] and ids[0] in other.peers:
                boxes += [b for b in other.on_adverts(adverts) if b.receiver == ids[0]]
        for name, seconds in _time_stages(me, adverts, boxes, ids, delta).items():
            samples.setdefault(name, []).append(seconds)
    return k, t, {name: median(v) for name, v in samples.items()}


def _time_stages(me: Any, adverts: Any, boxes: list[Any], ids: list[str],
                 delta: list[torch.Tensor]) -> dict[str, float]:
    from fl_proto import secagg_pb2 as spb

    steps: list[tuple[str, Callable[[], object]]] = [
        ("adverts checked, shares out", lambda: me.on_adverts(adverts)),
        ("shares in", lambda: me.on_shares(spb.ShareKeysReply(shares=boxes, sharers=ids))),
        ("masked input", lambda: me.masked_input(delta, 1)),
        ("reveal", lambda: me.on_unmask(spb.UnmaskRequest(survivors=ids))),
    ]
    out = {}
    for name, step in steps:
        t0 = time.process_time()
        step()
        out[name] = time.process_time() - t0
    return out


def bench_per_hospital(sizes: list[int], params_count: int, reps: int) -> bool:
    import fl_core.secagg.graph as graph
    from tests.secagg.ca_helpers import TestCA

    print_header(f"One hospital's CPU per secure round ({params_count // 1000}k parameters,"
                 f" in-process, no network, median of {reps})")
    ca = TestCA()
    rows = []
    totals: dict[tuple[str, int], float] = {}
    default_max = graph.SECAGG_COMPLETE_GRAPH_MAX  # type: ignore[attr-defined]
    for mode in ("SecAgg+", "complete graph"):
        graph.SECAGG_COMPLETE_GRAPH_MAX = default_max if mode == "SecAgg+" else 10**9  # type: ignore[attr-defined,misc]
        try:
            for n in sizes:
                k, t, stages = _one_hospital(n, params_count, ca, reps)
                totals[(mode, n)] = sum(stages.values())
                rows.append([mode, n, k, t, *stages.values(), totals[(mode, n)]])
        finally:
            graph.SECAGG_COMPLETE_GRAPH_MAX = default_max  # type: ignore[attr-defined,misc]
    print(table(["graph", "hospitals", "k", "t", "adverts checked, shares out (s)",
                 "shares in (s)", "masked input (s)", "reveal (s)", "total (s)"], rows))
    lo, hi = sizes[0], sizes[-1]
    plus = totals[("SecAgg+", hi)] / totals[("SecAgg+", lo)]
    full = totals[("complete graph", hi)] / totals[("complete graph", lo)]
    ok = plus < full
    print(f"\nper-hospital cost from {lo} to {hi} hospitals: SecAgg+ x{plus:.2f}, complete"
          f" graph x{full:.2f}; at {hi}, SecAgg+ costs"
          f" {totals[('SecAgg+', hi)] / totals[('complete graph', hi)]:.2f} of the complete"
          f" graph: {verdict(ok)}")
    return ok


class _SecureNoop:
    """Makes bench.noop_client's no-op hospital take part in secure rounds."""

    @staticmethod
    def make(name: str, server: str, tls: tuple[bytes, bytes, bytes], seed: int) -> Any:
        from bench.noop_client import NUM_EXAMPLES, NoopClient, log
        from fl_client.secagg_client import SecureRound
        from fl_core.secagg import SecAggError

        class SecureNoopClient(NoopClient):
            def _train(self, task: Any) -> None:
                if not task.HasField("secagg"):
                    super()._train(task)
                    return
                secure = SecureRound(self.conn, self.name, task, *tls)
                # the key stages run while the model downloads (as a hospital may)
                model = secure.setup_while(
                    lambda: self.conn.fetch_model(task, task.model_manifest))
                update = self._update(task, model)
                state = secure.masked_state(update, model, True, NUM_EXAMPLES)
                self.conn.submit_update(task, state, NUM_EXAMPLES, {"train_loss": 0.0},
                                        stop=self.stop_event)
                try:
                    secure.finish()
                except SecAggError as exc:  # as the real client: logged, not fatal
                    log.warning("secagg_refused %s", exc)

        return SecureNoopClient(name, server, tls, "sized", seed=seed)


def noop_clients(server: str, work: Path, names: list[str], timeout_s: float) -> int:
    """Process entry: secure-capable no-op hospitals as threads until the job ends."""
    import logging
    import threading

    from bench.common import client_tls

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    clients = [_SecureNoop.make(n, server, client_tls(work, n), i) for i, n in enumerate(names)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return 0 if all(c.failures == 0 for c in clients) else 1


def _round_walls(work: Path, params: int, clients: int, rounds: int, per_proc: int,
                 secure: bool, repeat: int = 0) -> list[float]:
    from bench.common import BenchServer, Procs, client_names

    procs = Procs()
    # one state directory per job: the rounds read back are that job's only
    tag = f"{'secure' if secure else 'plain'}-{params}-{clients}-{repeat}"
    try:
        extra = ["--rounds", str(rounds), "--min_clients", str(clients),
                 "--round_deadline_s", "600", "--wait_for_clients_s", "300",
                 "--max_round_attempts", "1"]
        if secure:
            extra.append("--secure_aggregation")
        server = BenchServer(procs, work, params, extra=extra, name=f"server-{tag}")
        names = client_names(clients)
        for gi in range(0, clients, per_proc):
            procs.start(["-m", "bench.secagg", "--noop_clients", ",".join(
                names[gi:gi + per_proc]), "--server", server.target, "--work", str(work)],
                work / f"noop-{tag}-{gi}.log", cwd=work)
        deadline = time.monotonic() + 300 + rounds * params * 4 / 1e6 * 2
        while time.monotonic() < deadline:
            state = server.status(rounds_after=rounds).job_state
            if state in ("completed", "failed"):
                break
            time.sleep(0.2)
        if state != "completed":
            raise RuntimeError(f"{tag}: job {state}:\n{server.proc.tail()}")
        recorded = {r: t for r, st, _, t in server.recorded_rounds() if st == "completed"}
        server.close()
        return [recorded[r] - recorded[r - 1] for r in sorted(recorded) if r - 1 in recorded]
    finally:
        procs.stop_all()


def bench_rounds(quick: bool, only: list[str] | None) -> bool:
    """Plain and secure jobs alternate (`repeats` pairs), so load that comes and goes
    on a shared machine falls on both; the medians are over every timed round."""
    from bench.common import make_bench_pki, workdir

    scenarios = [("100k x10", 100_000, 10, 6 if quick else 11, 5, 2.0, 1 if quick else 3),
                 ("100MB x4", 25_000_000, 4, 3 if quick else 4, 1, 1.5, 1 if quick else 2)]
    print_header("Rounds with no-op hospitals: plain vs --secure_aggregation (medians)")
    rows = []
    ok = True
    with workdir("secagg") as work:
        make_bench_pki(work, [f"hospital_{i + 1}" for i in range(10)])
        for name, params, clients, rounds, per_proc, target, repeats in scenarios:
            if only and not any(o in name for o in only):
                continue
            walls: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(repeats):
                for secure in (False, True):
                    walls[secure] += _round_walls(work, params, clients, rounds, per_proc,
                                                  secure, repeat)
            plain, secure_s = median(walls[False]), median(walls[True])
            ratio = secure_s / plain
            met = ratio <= target
            ok &= met
            rows.append([name, f"{repeats} x {rounds - 1}", plain, secure_s, ratio,
                         f"<= {target}", verdict(met)])
    print(table(["scenario", "rounds timed (jobs x rounds)", "plain round (s)",
                 "secure round (s)", "secure / plain", "target", ""], rows))
    return ok


def bench_many(sizes: list[int], rounds: int, per_proc: int) -> None:
    """Secure rounds of 25, 50, 100 no-op hospitals over real processes (threads of
    `per_proc` hospitals per process): wall seconds per round and per hospital. On a
    machine with fewer cores than hospitals the round's wall time is about the sum of
    everyone's CPU, so its share per hospital follows each hospital's work (k peers),
    which SecAgg+ keeps growing like log n."""
    from bench.common import make_bench_pki, workdir
    from fl_core.secagg.graph import neighbour_count

    print_header(f"Secure rounds of many no-op hospitals (100k parameters, real processes,"
                 f" {per_proc} hospitals per process, median of {rounds - 1} rounds)")
    rows = []
    with workdir("secagg-many") as work:
        make_bench_pki(work, [f"hospital_{i + 1}" for i in range(max(sizes))])
        for n in sizes:
            plain = median(_round_walls(work, 100_000, n, rounds, per_proc, False))
            secure = median(_round_walls(work, 100_000, n, rounds, per_proc, True))
            rows.append([n, neighbour_count(n), plain, secure, secure / plain,
                         1000 * plain / n, 1000 * secure / n])
    print(table(["hospitals", "k", "plain round (s)", "secure round (s)", "secure / plain",
                 "plain ms per hospital", "secure ms per hospital"], rows))
    first, last = rows[0], rows[-1]
    print(f"\nsecure ms per hospital from {first[0]} to {last[0]} hospitals:"
          f" x{last[6] / first[6]:.2f} (k {first[1]} -> {last[1]}: x{last[1] / first[1]:.2f};"
          f" n x{last[0] / first[0]:.0f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.secagg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=BENCHES)
    p.add_argument("--scenario", nargs="*", help="rounds: scenario names containing these")
    p.add_argument("--noop_clients", help=argparse.SUPPRESS)  # internal: client process
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.noop_clients:
        return noop_clients(args.server, args.work, args.noop_clients.split(","), 3600)
    torch.set_num_threads(1)
    want = set(args.only or BENCHES)
    if "mask" in want:
        bench_mask(40 if args.quick else 100, 3 if args.quick else 5)
    if "per_hospital" in want:
        bench_per_hospital([25, 50, 100], 100_000, 1 if args.quick else 3)
    if "rounds" in want:
        bench_rounds(args.quick, args.scenario)
    if "many" in want:
        bench_many([25, 50, 100], 3 if args.quick else 4, 25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
