"""The simulation's rounds: the server's round rules, with Ray actors as the hospitals.

Everything a round computes is the daemons' own code, called rather than copied:
selection (`fl_server.rounds.select_clients`), each task's seed (`task_seed`), the
quorum (`quorum_required`), the averaged training metrics (the strategy's), the
TrainConfig (`fl_server.server.train_config`), the strategy (`make_strategy`, fed
each update as it lands, like the aggregator does), and on the hospitals' side the
trainer and ledger (see `fl_sim.worker`). What the simulation adds is only what a
network would have done: it hands tasks to a bounded pool of actors, collects
their answers in whatever order they finish, and injects dropouts.

Dropouts are drawn per selected hospital from a seeded RNG at --dropout_rate. Half
of them (again drawn) happen before training (the hospital is unreachable: no
privacy spent, no update), the other half after training (privacy spent and in the
ledger, the update lost on the way): both are recorded as the round's failures,
and both count against the quorum exactly as a silent client does on the server.

With --secure_aggregation each attempt is a `fl_sim.secure.SecureSimRound`: the key
stages before training (an unreachable hospital never advertises), each update
masked and folded as it lands, and the server's unmasking into the strategy's
`accept_sum` once the quorum is in; an unmasking that fails (fewer than t shares)
fails the attempt, which is retried with fresh keys, as on the server.

Strategies that need every update at once (median, trimmed mean, Krum) get each
update as the server's aggregator gives it to them: written to a spool file in the
simulation's state folder by the receiving `StreamAssembler` and memory-mapped back
(`spool_update`), so the driver's heap does not grow with the round's size.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fl_core.allocator import fix_mmap_threshold
from fl_core.constants import SIM_MMAP_THRESHOLD_BYTES
from fl_core.secagg import SecAggError
from fl_core.tensor_codec import StreamAssembler, build_manifest, iter_chunks
from fl_proto import coordinator_pb2 as cpb
from fl_server.config import ServerConfig
from fl_server.rounds import quorum_required, select_clients, task_seed
from fl_server.secagg_round import SecureAggregation
from fl_server.strategies import Strategy, StrategyError
from fl_sim.cluster import SimError
from fl_sim.secure import SECURE_ERRORS, SecureSimRound, SimIdentity
from fl_sim.worker import DROPPED, OK, HospitalResult

BEFORE = "before"  # injected dropout: unreachable, never trained
AFTER = "after"  # injected dropout: trained, update lost
IN_FLIGHT_PER_WORKER = 2  # tasks queued at each actor, so none idles between two


def injected_dropouts(selected: list[str], rate: float, seed: int, job_id: str,
                      round_no: int, attempt: int) -> dict[str, str]:
    """Which selected hospitals drop out of this attempt, and when (BEFORE or AFTER)."""
    if rate <= 0:
        return {}
    rng = random.Random(f"dropout:{seed}:{job_id}:{round_no}:{attempt}")
    out: dict[str, str] = {}
    for name in selected:
        if rng.random() < rate:
            out[name] = BEFORE if rng.random() < 0.5 else AFTER
    return out


def fixed_mmap_threshold() -> None:
    """Large allocations are mapped, and unmapped when freed, whatever came before:
    otherwise, after the first update each update-sized buffer (deserialized from Ray,
    then folded, masked or spooled) comes from the heap, and the small objects kept
    between two updates pin the holes they leave: the driver's heap grew by about one
    update per update taken (bench.sim --robust: +378 MB for 100 updates of 4 MB, all
    spooled). No-op without glibc."""
    fix_mmap_threshold(SIM_MMAP_THRESHOLD_BYTES)


def spool_update(path: Path, delta: Mapping[str, torch.Tensor],
                 expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`delta` as the server's aggregator hands it to a buffered strategy: written into
    a spool file by the receiving `StreamAssembler` (checked against the model's layout
    and hashes) and memory-mapped back. The file is unlinked at once, as the server's
    is: the mapping keeps its pages (page cache, not heap) until the strategy lets go."""
    manifest = build_manifest(delta)
    assembler = StreamAssembler(manifest, expected=expected, spool_path=path)
    try:
        for sequence, chunk in enumerate(iter_chunks(delta, manifest)):
            assembler.add_chunk(sequence, chunk)
        return assembler.finish()
    finally:
        assembler.close()
        path.unlink(missing_ok=True)


@dataclass
class SecureSetup:
    """What secure aggregation needs beyond the round rules: the server's policy, the
    throwaway advert key, and each hospital's training examples (the count a client
    joins with, which sets its weight's divisor)."""

    policy: SecureAggregation
    identity: SimIdentity
    examples: dict[str, int]


@dataclass
class Attempt:
    """One attempt at a round, as the simulation records it."""

    round: int
    attempt: int
    state: str  # completed | failed
    selected: list[str]
    accepted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    dropouts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "state": self.state,
                "selected": len(self.selected), "accepted": self.accepted,
                "failures": self.failures, "dropouts": self.dropouts,
                "seconds": round(self.seconds, 3), "reason": self.reason}


@dataclass
class Outcome:
    """What the whole run produced."""

    state: dict[str, torch.Tensor]
    attempts: list[Attempt]
    epsilon_by_round: dict[int, dict[str, float]]
    completed: bool
    reason: str = ""


class Progress:
    """Progress lines: hospitals done in the round, its time so far, the ETAs."""

    def __init__(self, say: Callable[[str], None], rounds: int, interval_s: float) -> None:
        self.say = say
        self.rounds = rounds
        self.interval_s = interval_s
        self.round_seconds: list[float] = []
        self._last = 0.0

    def start(self) -> None:
        self._last = time.monotonic()

    def tick(self, round_no: int, attempt: int, done: int, total: int, failed: int,
             started: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = now - started
        left = total - done
        eta_round = elapsed / done * left if done else float("nan")
        mean = (sum(self.round_seconds) / len(self.round_seconds)) if self.round_seconds \
            else (elapsed / done * total if done else float("nan"))
        eta_job = eta_round + mean * (self.rounds - round_no)
        again = f" (attempt {attempt})" if attempt > 1 else ""
        self.say(f"round {round_no}/{self.rounds}{again}: {done}/{total} hospitals done"
                 f" ({failed} failed or dropped), {elapsed:.1f} s, ETA round"
                 f" {_secs(eta_round)}, ETA job {_secs(eta_job)}")


def _secs(value: float) -> str:
    return "?" if value != value else f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


class Simulation:
    """Runs the job's rounds on a pool of actors; see the module docstring."""

    def __init__(self, ray: Any, actors: list[Any], cfg: ServerConfig, strategy: Strategy,
                 task: Any, train_config: cpb.TrainConfig, hospitals: list[str], job_id: str,
                 dropout_rate: float, eval_set: TensorDataset | None,
                 progress: Progress, spool_dir: Path | None = None,
                 secure: SecureSetup | None = None) -> None:
        self.ray = ray
        self.actors = list(actors)
        self.cfg = cfg
        self.strategy = strategy
        self.task = task
        self.train_config = train_config
        self.hospitals = hospitals
        self.job_id = job_id
        self.dropout_rate = dropout_rate
        self.eval_set = eval_set
        self.progress = progress
        self.spool_dir = spool_dir
        if not strategy.streaming and spool_dir is None:
            raise ValueError(f"{strategy.name} keeps every update: it needs a spool folder")
        self.secure = secure
        self.epsilon: dict[str, float] = dict.fromkeys(hospitals, 0.0)
        fixed_mmap_threshold()  # the driver's heap stays flat as updates come and go

    def run(self, initial: dict[str, torch.Tensor]) -> Outcome:
        state = initial
        attempts: list[Attempt] = []
        epsilon_by_round: dict[int, dict[str, float]] = {}
        self.progress.start()
        for round_no in range(1, self.cfg.rounds + 1):
            record: Attempt | None = None
            for attempt in range(1, self.cfg.max_round_attempts + 1):
                record, new_state = self._round(state, round_no, attempt)
                attempts.append(record)
                epsilon_by_round[round_no] = dict(self.epsilon)
                if record.state == "completed":
                    assert new_state is not None
                    state = new_state
                    break
            assert record is not None
            if record.state != "completed":
                reason = (f"round {round_no} failed {self.cfg.max_round_attempts} times; last:"
                          f" {record.reason}")
                return Outcome(state, attempts, epsilon_by_round, False, reason)
        return Outcome(state, attempts, epsilon_by_round, True)

    # one attempt ------------------------------------------------------------------
    def _round(self, global_state: dict[str, torch.Tensor], round_no: int,
               attempt: int) -> tuple[Attempt, dict[str, torch.Tensor] | None]:
        started = time.monotonic()
        selected = select_clients(self.hospitals, self.cfg.min_clients, self.cfg.fraction,
                                  self.cfg.seed, self.job_id, round_no, attempt)
        dropouts = injected_dropouts(selected, self.dropout_rate, self.cfg.seed, self.job_id,
                                     round_no, attempt)
        record = Attempt(round_no, attempt, "failed", selected, dropouts=dropouts)
        for name, when in dropouts.items():
            if when == BEFORE:
                record.failures[name] = "injected dropout: unreachable, never trained"
        self.strategy.begin_round(global_state)
        secure: SecureSimRound | None = None
        if self.secure is not None:
            secure = SecureSimRound(self.secure.policy, self.secure.identity, self.job_id,
                                    round_no, selected, global_state, self.secure.examples,
                                    absent=[h for h, w in dropouts.items() if w == BEFORE])
            if secure.failed:
                record.reason = f"secure aggregation failed: {secure.failed}"
                self._close(record, started, {})
                return record, None
            for name, why in secure.failures.items():
                record.failures.setdefault(name, why)
        accepted = self._train(global_state, record, started, secure)
        required = quorum_required(self.cfg.quorum, len(selected))
        if len(accepted) < required:
            record.reason = (f"quorum not reached: {len(accepted)} of {len(selected)} updates,"
                             f" need {required}")
            if secure is not None:
                secure.abort(record.reason)
            self._close(record, started, accepted)
            return record, None
        try:
            if secure is not None:  # the server's _unmask: the sum into accept_sum
                secure.unmask_into(self.strategy)
        except (SecAggError, StrategyError) as exc:
            record.reason = f"secure aggregation failed: {exc}"
            self._close(record, started, accepted)
            return record, None
        try:
            new_state = self.strategy.finish_round()
        except StrategyError as exc:
            record.reason = f"aggregation refused: {exc}"
            self._close(record, started, accepted)
            return record, None
        metrics = self.strategy.train_metrics(
            [(a["num_examples"], a["metrics"]) for a in accepted.values()])
        metrics.update(self.strategy.round_metrics())
        if secure is not None:
            metrics.update(secure.summary())
        metrics.update(self._evaluate(new_state))
        record.state = "completed"
        record.metrics = metrics
        self._close(record, started, accepted)
        return record, new_state

    def _close(self, record: Attempt, started: float, accepted: dict[str, Any]) -> None:
        record.accepted = sorted(accepted)
        record.seconds = time.monotonic() - started
        self.progress.round_seconds.append(record.seconds)
        shown = "; ".join(f"{k}={v:.4g}" for k, v in sorted(record.metrics.items())
                          if k in ("train_loss", "eval_accuracy", "epsilon_max",
                                   "central_epsilon"))
        dropped = len(record.dropouts)
        self.progress.say(
            f"round {record.round} attempt {record.attempt}: {record.state},"
            f" {len(record.accepted)}/{len(record.selected)} updates ({dropped} dropouts"
            f" injected, {len(record.failures)} failed in all), {record.seconds:.1f} s"
            + (f"; {shown}" if shown else "") + (f"; {record.reason}" if record.reason else ""))

    def _train(self, global_state: dict[str, torch.Tensor], record: Attempt,
               started: float, secure: SecureSimRound | None) -> dict[str, dict[str, Any]]:
        """Hand every task to the pool, fold each update as it lands; accepted updates'
        num_examples and metrics by hospital (the round engine's `accepted`)."""
        ray = self.ray
        queue = [h for h in record.selected if record.dropouts.get(h) != BEFORE
                 and h not in record.failures]
        total, done = len(record.selected), len(record.selected) - len(queue)
        global_ref = ray.put(global_state)
        in_flight: dict[Any, tuple[Any, str]] = {}
        accepted: dict[str, dict[str, Any]] = {}

        def submit(actor: Any) -> None:
            hospital = queue.pop(0)
            config = cpb.TrainConfig()
            config.CopyFrom(self.train_config)
            config.seed = task_seed(self.cfg.seed, record.round, record.attempt, hospital)
            ref = actor.train.remote(hospital, self.job_id, record.round, global_ref,
                                     config.SerializeToString(),
                                     record.dropouts.get(hospital) == AFTER,
                                     secure=secure is not None)
            in_flight[ref] = (actor, hospital)

        for _ in range(IN_FLIGHT_PER_WORKER):
            for actor in self.actors:
                if queue:
                    submit(actor)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1,
                                timeout=self.progress.interval_s)
            for ref in ready:
                actor, hospital = in_flight.pop(ref)
                result = self._result(ref, actor, hospital)
                done += 1
                self._take(result, record, accepted, global_state, secure)
                if queue and actor in self.actors:
                    submit(actor)
            if queue and not in_flight:
                raise SimError("every Ray worker of the pool has died; see the Ray logs")
            self.progress.tick(record.round, record.attempt, done, total,
                               len(record.failures), started)
        self.progress.tick(record.round, record.attempt, done, total, len(record.failures),
                           started, force=True)
        return accepted

    def _result(self, ref: Any, actor: Any, hospital: str) -> HospitalResult:
        ray = self.ray
        try:
            result: HospitalResult = ray.get(ref)
            return result
        except ray.exceptions.RayActorError as exc:
            # The worker process died (killed, out of memory): its hospital fails this
            # round, like a client whose process died; the pool goes on without it.
            if actor in self.actors:
                self.actors.remove(actor)
            first = (str(exc).strip().splitlines() or ["died"])[0]
            return HospitalResult(hospital, "failed", f"the worker training it died: {first}")
        except ray.exceptions.RayTaskError as exc:
            # Not a training failure (those come back as results): e.g. a corrupt privacy
            # ledger, which a client daemon also refuses to run past.
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise SimError(f"{hospital}: {type(cause).__name__}: {cause}") from None

    def _take(self, result: HospitalResult, record: Attempt,
              accepted: dict[str, dict[str, Any]], global_state: dict[str, torch.Tensor],
              secure: SecureSimRound | None) -> None:
        name = result.hospital
        if result.status in (OK, DROPPED) or result.epsilon_total:
            self.epsilon[name] = result.epsilon_total
        if result.status != OK:
            label = "DROPPED" if result.status == DROPPED else result.status.upper()
            record.failures[name] = f"{label}: {result.reason}"
            return
        try:
            if secure is not None:  # masked by the hospital, folded mod 2^32 by the server
                secure.fold(name, result.state, global_state, result.num_examples)
            elif self.strategy.streaming:
                self.strategy.accept(name, result.state, result.num_examples)
            else:
                assert self.spool_dir is not None
                spool = self.spool_dir / (f"{self.job_id}-{record.round}-{record.attempt}"
                                          f"-{name}.spool")
                self.strategy.accept(name, spool_update(spool, result.state, global_state),
                                     result.num_examples)
        except (StrategyError, *SECURE_ERRORS) as exc:
            record.failures[name] = f"update refused: {exc}"
            return
        finally:
            result.state = {}  # the driver keeps no update: folded, masked or spooled
        accepted[name] = {"num_examples": result.num_examples, "metrics": result.metrics}

    def _evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """The server's --eval_data scoring: the task's metrics on the held-out test set."""
        if self.eval_set is None:
            return {}
        from fl_client.local_training import evaluate_state

        metrics = evaluate_state(self.task, state, self.eval_set, torch.device("cpu"))
        return {f"eval_{k}": float(v) for k, v in metrics.items()}
