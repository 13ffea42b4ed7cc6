"""The server's side of a secure-aggregation round (SecAgg+), beside the round engine.

Secure aggregation is a property of a round, not a strategy: the engine opens a
`SecAggRound` with the round's TRAIN tasks, hospitals advertise keys and exchange
encrypted shares through it (the server relays, it cannot read), send masked inputs
in the ordinary sealed upload stream, and the round folds each into one running
uint32 sum (modular addition: memory one vector whatever the count). When the
uploads are in, survivors reveal the shares the server may have (self-mask seeds of
survivors, mask keys of hospitals that dropped after sharing, never both for one
hospital); the masks are removed, the sum dequantized and handed to the linear
strategy as one summed update. A round attempt unmasks at most once; a restarted
server starts the round again with a new session (fresh keys on every hospital).

Stages: advertise -> share -> collect -> unmask -> done (or failed). The four rpcs
each answer when their stage closes: when every hospital still in it has answered,
or when the stage times out (the hospitals missing then count as dropped).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fl_core.constants import SECAGG_UNMASK_GRACE_S
from fl_core.errors import abort
from fl_core.logs import log_event
from fl_core.secagg import MASKED_TENSOR, SecAggError
from fl_core.secagg.adverts import Advert, RoundId, Verifier
from fl_core.secagg.graph import neighbour_count, neighbours, positions, threshold
from fl_core.secagg.masks import dropped_mask_removals, remove_masks, self_mask_removals
from fl_core.secagg.quantize import QuantParams, dequantize, signed
from fl_core.secagg.shamir import combine
from fl_proto import secagg_pb2 as spb
from fl_server.auth import identity_of
from fl_server.rounds import RoundRefusal

log = logging.getLogger("fl_server.secagg")

# Strategies whose aggregate is a (weighted) sum of the updates: they can take the
# unmasked sum. The rest need each update on its own, which secure aggregation hides.
SECURE_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                     "dp_fedavg", "norm_bounding")
EQUAL_WEIGHT_STRATEGIES = ("dp_fedavg",)
# The strategy parameter that each hospital applies as an L2 clip before masking.
CLIENT_CLIP_PARAM = {"dp_fedavg": "clip", "norm_bounding": "bound"}

ADVERTISE, SHARE, COLLECT, UNMASK, DONE, FAILED = (
    "advertise", "share", "collect", "unmask", "done", "failed")
_ORDER = (ADVERTISE, SHARE, COLLECT, UNMASK, DONE)


def strategy_refusal(name: str) -> str | None:
    """One line saying why `name` cannot run with secure aggregation, or None."""
    if name in SECURE_STRATEGIES:
        return None
    return (f"strategy {name!r} needs each hospital's update on its own, but with"
            f" --secure_aggregation the server sees only their sum; use one of"
            f" {', '.join(SECURE_STRATEGIES)}")


class SecAggRefusal(RoundRefusal):
    """A secure-aggregation call the round cannot take; `code` names the gRPC status."""


@dataclass(frozen=True)
class SecAggSettings:
    threshold_fraction: float
    bits: int
    clip: float
    stage_timeout_s: float


@dataclass
class UnmaskedSum:
    """What the strategy receives: sum_i n_i clip(delta_i) (or sum_i clip(delta_i))."""

    sums: dict[str, torch.Tensor]
    weight_total: float
    survivors: list[str]
    dropped: list[str]
    unclipped: float | None = None  # adaptive clipping: how many updates fitted the clip


class SecAggRound:
    def __init__(self, job_id: str, round_no: int, participants: Sequence[str],
                 settings: SecAggSettings, layout: Sequence[tuple[str, torch.Size, torch.dtype]],
                 examples: Mapping[str, int], equal_weights: bool, l2_clip: float,
                 verifier: Verifier, crl_pem: bytes,
                 on_dropped: Callable[[str, str], None] | None = None,
                 count_unclipped: bool = False) -> None:
        self.rid = RoundId(job_id, round_no, uuid.uuid4().hex)
        self.participants = sorted(participants)
        self.settings = settings
        self.params = QuantParams(settings.bits, settings.clip)
        self.k = neighbour_count(len(self.participants))
        self.t = threshold(self.k, settings.threshold_fraction)
        self.graph = neighbours(self.participants, self.rid.session_id)
        self.pos = positions(self.participants)
        self.layout = list(layout)
        self.model_length = sum(int(math.prod(shape)) for _, shape, _ in self.layout)
        # adaptive clipping: one more word, each hospital's unclipped bit (summed)
        self.count_unclipped = count_unclipped and l2_clip > 0
        self.length = self.model_length + (1 if self.count_unclipped else 0)
        self.equal_weights = equal_weights
        self.divisor = (float(len(self.participants)) if equal_weights
                        else float(sum(examples[c] for c in self.participants)))
        self.l2_clip = l2_clip
        self.verifier = verifier
        self.crl_pem = crl_pem
        self.on_dropped = on_dropped
        self._cv = threading.Condition()
        self.stage = ADVERTISE
        self._deadline = time.monotonic() + settings.stage_timeout_s
        self.adverts: dict[str, spb.KeyAdvert] = {}
        self.boxes: dict[str, list[spb.EncryptedShare]] = {}  # by receiver
        self.sharers: set[str] = set()
        self.total: np.ndarray | None = None
        self.examples: dict[str, int] = {}
        self.reveals: dict[str, list[spb.RevealedShare]] = {}
        self._share_counts: dict[tuple[str, int], int] = {}  # (owner, kind) -> usable shares
        self.failure = ""
        log_event(log, "secagg_open", job=job_id, round=round_no,
                  session=self.rid.session_id[:8], n=len(self.participants), k=self.k,
                  t=self.t, graph="complete" if self.k == len(self.participants) - 1
                  else "k-regular", bits=settings.bits, clip=settings.clip,
                  l2_clip=f"{l2_clip:.6g}", count_unclipped=self.count_unclipped)

    # ----------------------------------------------------------------- task config
    def config(self) -> spb.SecAggConfig:
        return spb.SecAggConfig(
            session_id=self.rid.session_id, participants=self.participants, threshold=self.t,
            neighbours=self.k, bits=self.settings.bits, clip=self.settings.clip,
            weight_divisor=self.divisor, equal_weights=self.equal_weights,
            vector_length=self.model_length, l2_clip=self.l2_clip,
            stage_timeout_s=self.settings.stage_timeout_s,
            count_unclipped=self.count_unclipped)

    def upload_layout(self) -> dict[str, torch.Tensor]:
        """The one tensor a masked upload carries (int32 words: uint32 on the wire)."""
        return {MASKED_TENSOR: torch.empty((self.length,), dtype=torch.int32, device="meta")}

    # ----------------------------------------------------------------- stage machinery
    def _expected(self) -> set[str]:
        if self.stage == ADVERTISE:
            return set(self.participants)
        if self.stage == SHARE:
            return set(self.adverts)
        return set()

    def _done(self) -> set[str]:
        if self.stage == ADVERTISE:
            return set(self.adverts)
        if self.stage == SHARE:
            return set(self.sharers)
        return set()

    def _advance_if_due(self) -> list[tuple[str, str]]:
        """Closes the advertise or share stage when everyone answered or time is up.
        Returns (hospital, reason) drops to report outside the lock."""
        drops: list[tuple[str, str]] = []
        while self.stage in (ADVERTISE, SHARE):
            missing = self._expected() - self._done()
            if missing and time.monotonic() < self._deadline:
                break
            reason = ("advertised no keys" if self.stage == ADVERTISE
                      else "shared no keys")
            drops += [(cid, f"secure aggregation: {reason} in time") for cid in sorted(missing)]
            if self.stage == ADVERTISE:
                self.stage = SHARE
            else:
                self.stage = COLLECT
            self._deadline = time.monotonic() + self.settings.stage_timeout_s
            self._cv.notify_all()
            log_event(log, "secagg_stage", round=self.rid.round,
                      stage=self.stage, missing=",".join(sorted(missing)) or "-")
            if self.stage == SHARE and len(self.adverts) < self.t:
                self._fail(f"only {len(self.adverts)} hospitals advertised keys, t={self.t}")
            elif self.stage == COLLECT and len(self.sharers) < self.t:
                self._fail(f"only {len(self.sharers)} hospitals shared keys, t={self.t}")
        return drops

    def _fail(self, reason: str) -> None:
        self.stage = FAILED
        self.failure = reason
        self._cv.notify_all()
        log_event(log, "secagg_failed", round=self.rid.round, reason=reason)

    def abort(self, reason: str) -> None:
        """Ends the attempt (quorum missed, server stopping): every waiting call returns
        ABORTED at once, and nothing can be unmasked any more."""
        with self._cv:
            if self.stage not in (DONE, FAILED):
                self._fail(reason)
                self.total = None

    def summary(self) -> dict[str, float]:
        """The round record's secure-aggregation figures (Status shows them)."""
        with self._cv:
            return {"secure": 1.0, "secagg_threshold": float(self.t),
                    "secagg_neighbours": float(self.k),
                    "secagg_dropped": float(len(self.participants) - len(self.examples))}

    def _report_drops(self, drops: list[tuple[str, str]]) -> None:
        if self.on_dropped is not None:
            for cid, reason in drops:
                self.on_dropped(cid, reason)

    def _wait_past(self, stage: str, timeout: float) -> None:
        """Blocks until the round has left `stage` (closing it when due)."""
        end = time.monotonic() + timeout
        drops: list[tuple[str, str]] = []
        with self._cv:
            while self.stage == stage:
                drops += self._advance_if_due()
                if self.stage != stage:
                    break
                left = min(self._deadline, end) - time.monotonic()
                if left <= 0 and time.monotonic() >= end:
                    break
                self._cv.wait(timeout=max(0.01, min(left, 0.5)))
        self._report_drops(drops)

    def tick(self) -> None:
        """Lets the engine close a stage that timed out with nobody waiting on it."""
        with self._cv:
            drops = self._advance_if_due()
        self._report_drops(drops)

    def _need(self, stage: str, cid: str) -> None:
        if self.stage == FAILED:
            raise SecAggRefusal("ABORTED", f"secure aggregation of round {self.rid.round}"
                                f" failed: {self.failure}")
        if self.stage != stage:
            raise SecAggRefusal("FAILED_PRECONDITION", f"the round is in its {self.stage}"
                                f" stage, not {stage}")
        if cid not in self.pos:
            raise SecAggRefusal("PERMISSION_DENIED", f"{cid} is not in this secure round")

    # ----------------------------------------------------------------- stage 1
    def advertise(self, cid: str, advert: spb.KeyAdvert, timeout: float) -> spb.AdvertiseKeysReply:
        with self._cv:
            self._need(ADVERTISE, cid)
            if cid in self.adverts:
                raise SecAggRefusal("ALREADY_EXISTS", f"{cid} already advertised its keys")
            try:
                self.verifier.verify(self.rid, Advert(
                    advert.client_id, bytes(advert.mask_public_key),
                    bytes(advert.share_public_key), bytes(advert.certificate_pem),
                    bytes(advert.signature)), cid)
            except SecAggError as exc:
                raise SecAggRefusal("INVALID_ARGUMENT", f"key advert refused: {exc}") from None
            self.adverts[cid] = advert
            self._cv.notify_all()
        self._wait_past(ADVERTISE, timeout)
        with self._cv:
            if self.stage == FAILED:
                self._need(SHARE, cid)
            return spb.AdvertiseKeysReply(
                adverts=[self.adverts[c] for c in sorted(self.adverts)], crl_pem=self.crl_pem)

    # ----------------------------------------------------------------- stage 2
    def share(self, cid: str, shares: Sequence[spb.EncryptedShare],
              timeout: float) -> spb.ShareKeysReply:
        with self._cv:
            self._need(SHARE, cid)
            if cid not in self.adverts:
                raise SecAggRefusal("FAILED_PRECONDITION", f"{cid} advertised no keys in time")
            if cid in self.sharers:
                raise SecAggRefusal("ALREADY_EXISTS", f"{cid} already sent its shares")
            receivers = [s.receiver for s in shares]
            wanted = {p for p in self.graph[cid] if p in self.adverts}
            if any(s.sender != cid for s in shares) or set(receivers) != wanted \
                    or len(receivers) != len(wanted):
                raise SecAggRefusal("INVALID_ARGUMENT", f"{cid} must send one share to each"
                                    f" neighbour that advertised keys: {sorted(wanted)}")
            for s in shares:
                self.boxes.setdefault(s.receiver, []).append(s)
            self.sharers.add(cid)
            self._cv.notify_all()
        self._wait_past(SHARE, timeout)
        with self._cv:
            if self.stage == FAILED:
                self._need(COLLECT, cid)
            return spb.ShareKeysReply(
                shares=[s for s in self.boxes.get(cid, []) if s.sender in self.sharers],
                sharers=sorted(self.sharers))

    # ----------------------------------------------------------------- stage 3
    def check_upload(self, cid: str) -> None:
        with self._cv:
            self._need(COLLECT, cid)
            if cid not in self.sharers:
                raise SecAggRefusal("FAILED_PRECONDITION",
                                    f"{cid} did not share its keys: no masked input taken")
            if cid in self.examples:
                raise SecAggRefusal("ALREADY_EXISTS", f"{cid} already sent its masked input")

    def fold(self, cid: str, masked: torch.Tensor, num_examples: int) -> None:
        """Adds one masked input into the running sum (mod 2^32)."""
        words = masked.detach().reshape(-1).numpy().view(np.uint32)
        if words.shape[0] != self.length:
            raise SecAggRefusal("INVALID_ARGUMENT", f"masked input has {words.shape[0]}"
                                f" words, the round expects {self.length}")
        weight = 1.0 if self.equal_weights else float(num_examples)
        with self._cv:
            self.check_upload(cid)
            if weight / self.divisor > 1.0 or sum(
                    1.0 if self.equal_weights else n for n in self.examples.values()) \
                    + weight > self.divisor:
                raise SecAggRefusal("INVALID_ARGUMENT", f"{cid} claims {num_examples}"
                                    " examples, more than it joined with")
            if self.total is None:
                self.total = np.zeros(self.length, dtype=np.uint32)
            np.add(self.total, words, out=self.total)
            self.examples[cid] = int(num_examples)

    # ----------------------------------------------------------------- stage 4
    def close_collect(self) -> None:
        """The engine's call when the uploads are in (or the round deadline passed)."""
        with self._cv:
            drops = self._advance_if_due()
            if self.stage == COLLECT:
                self.stage = UNMASK
                self._deadline = time.monotonic() + self.settings.stage_timeout_s
                self._cv.notify_all()
        self._report_drops(drops)

    def await_unmask(self, cid: str, timeout: float) -> spb.UnmaskRequest:
        end = time.monotonic() + timeout
        with self._cv:
            if cid not in self.pos:
                raise SecAggRefusal("PERMISSION_DENIED", f"{cid} is not in this secure round")
            while self.stage in (ADVERTISE, SHARE, COLLECT) and time.monotonic() < end:
                self._cv.wait(timeout=0.5)
            if not (self.stage == DONE and cid in self.examples):
                # DONE: t shares of every secret came before this survivor asked; it gets
                # the same request, and its reveal is taken and dropped
                self._need(UNMASK, cid)
            if cid not in self.examples:
                raise SecAggRefusal("FAILED_PRECONDITION", f"{cid} sent no masked input")
            survivors = sorted(self.examples)
            return spb.UnmaskRequest(survivors=survivors,
                                     dropped=sorted(self.sharers - set(survivors)))

    def reveal(self, cid: str, shares: Sequence[spb.RevealedShare]) -> None:
        with self._cv:
            if self.stage == DONE and cid in self.examples:
                return  # t shares of every secret came first: the sum is unmasked already
            self._need(UNMASK, cid)
            if cid not in self.examples:
                raise SecAggRefusal("FAILED_PRECONDITION", f"{cid} sent no masked input")
            if cid in self.reveals:
                raise SecAggRefusal("ALREADY_EXISTS", f"{cid} already revealed its shares")
            self.reveals[cid] = list(shares)
            for owner, kind in self._usable(cid, shares):
                self._share_counts[(owner, kind)] = self._share_counts.get((owner, kind), 0) + 1
            self._cv.notify_all()

    def _usable(self, holder: str, shares: Sequence[spb.RevealedShare]
                ) -> list[tuple[str, int]]:
        """The (owner, kind) of each share the unmasking can use: a seed share of a
        survivor or a mask-key share of a dropped hospital, held by one of the owner's
        neighbours or the owner itself (the same rule unmask() applies)."""
        dropped = self.sharers - set(self.examples)
        out = []
        for s in shares:
            if not (s.owner in self.graph[holder] or s.owner == holder):
                continue
            if (s.kind == spb.SEED and s.owner in self.examples) or \
                    (s.kind == spb.MASK_KEY and s.owner in dropped):
                out.append((s.owner, int(s.kind)))
        return out

    def _reconstructible(self) -> bool:
        """Whether the reveals so far hold t shares of every secret the unmasking needs
        (each survivor's seed, each dropped hospital's mask key): then the stage waits
        SECAGG_UNMASK_GRACE_S more at most, not the stage timeout, for survivors that
        have not revealed (t-of-(k+1) sharing is there so that a silent survivor costs
        nothing). The shares used are the same either way (the first t of each)."""
        counts = self._share_counts
        dropped = self.sharers - set(self.examples)
        return all(counts.get((c, spb.SEED), 0) >= self.t for c in self.examples) and \
            all(counts.get((d, spb.MASK_KEY), 0) >= self.t for d in dropped)

    def unmask_into(self, strategy: Any, stop: threading.Event | None = None) -> UnmaskedSum:
        """Unmasks and hands the sum to a linear strategy (FedAvg.accept_sum); with
        adaptive clipping also the securely summed count of unclipped updates."""
        total = self.unmask(stop)
        if total.unclipped is None:
            strategy.accept_sum(total.survivors, total.sums, total.weight_total)
        else:
            strategy.accept_sum(total.survivors, total.sums, total.weight_total,
                                unclipped_count=total.unclipped)
        return total

    def unmask(self, stop: threading.Event | None = None) -> UnmaskedSum:
        """Waits for the reveals (all of them; or t shares of every secret needed and a
        short grace), removes the masks and dequantizes. Once per attempt."""
        ready_since: float | None = None  # when t shares of every secret were first in
        with self._cv:
            while self.stage == UNMASK and set(self.examples) - set(self.reveals) \
                    and time.monotonic() < self._deadline \
                    and not (stop is not None and stop.is_set()):
                if ready_since is None and self._reconstructible():
                    ready_since = time.monotonic()
                if ready_since is not None and \
                        time.monotonic() - ready_since >= SECAGG_UNMASK_GRACE_S:
                    break  # a survivor that has not revealed by now is not waited for
                self._cv.wait(timeout=0.05 if ready_since is not None else 0.2)
            if self.stage != UNMASK:
                raise SecAggError("UNMASK_REFUSED", f"round attempt is {self.stage}: a round"
                                  " is unmasked at most once")
            self.stage = DONE  # never again, whatever happens below
            survivors = sorted(self.examples)
            dropped = sorted(self.sharers - set(survivors))
            total = self.total
            reveals = dict(self.reveals)
        if total is None or not survivors:
            raise SecAggError("NO_INPUT", "no masked input arrived")
        seeds: dict[str, dict[int, bytes]] = {c: {} for c in survivors}
        keys: dict[str, dict[int, bytes]] = {c: {} for c in dropped}
        for holder, shares in reveals.items():
            x = self.pos[holder]
            for s in shares:
                owner_ok = s.owner in self.graph[holder] or s.owner == holder
                if s.kind == spb.SEED and s.owner in seeds and owner_ok:
                    seeds[s.owner][x] = bytes(s.share)
                elif s.kind == spb.MASK_KEY and s.owner in keys and owner_ok:
                    keys[s.owner][x] = bytes(s.share)
        try:
            removals = self_mask_removals(
                self.rid, {c: combine(seeds[c], self.t) for c in survivors})
            for d in dropped:
                sk = X25519PrivateKey.from_private_bytes(combine(keys[d], self.t))
                alive = [(s, bytes(self.adverts[s].mask_public_key))
                         for s in self.graph[d] if s in self.examples]
                removals += dropped_mask_removals(self.rid, d, sk, alive)
            remove_masks(total, removals)  # one pass over the sum
        except SecAggError as exc:
            with self._cv:
                self.stage = FAILED
                self.failure = str(exc)
            raise
        sums: dict[str, torch.Tensor] = {}
        pos = 0
        for name, shape, dtype in self.layout:  # one pass per tensor, straight into its dtype
            n = int(math.prod(shape))
            acc = np.float64 if dtype == torch.float64 else np.float32
            part = dequantize(total[pos:pos + n], self.params, self.divisor, acc)
            sums[name] = torch.from_numpy(part).reshape(shape)
            pos += n
        unclipped = float(signed(total[pos:])[0]) if self.count_unclipped else None
        self.total = None
        weight_total = float(len(survivors)) if self.equal_weights \
            else float(sum(self.examples[c] for c in survivors))
        log_event(log, "secagg_unmasked", round=self.rid.round, survivors=len(survivors),
                  dropped=len(dropped), t=self.t, k=self.k, revealed=len(reveals),
                  unclipped="-" if unclipped is None else f"{unclipped:g}")
        return UnmaskedSum(sums, weight_total, survivors, dropped, unclipped)


class SecureAggregation:
    """The job's secure-aggregation policy: opens one SecAggRound per round attempt."""

    def __init__(self, settings: SecAggSettings, strategy: Any, ca_pem: bytes,
                 crl_path: Path) -> None:
        refusal = strategy_refusal(strategy.name)
        if refusal:
            raise ValueError(refusal)
        self.settings = settings
        self.strategy = strategy
        self.equal_weights = strategy.name in EQUAL_WEIGHT_STRATEGIES
        self.ca_pem = ca_pem
        self.crl_path = crl_path

    @property
    def l2_clip(self) -> float:
        """The L2 clip each hospital applies this round: the strategy's current one, so
        dp_fedavg's adaptive clip (which moves every round) reaches the hospitals."""
        if self.strategy.name not in CLIENT_CLIP_PARAM:
            return 0.0
        return float(getattr(self.strategy, "bound", 0.0))

    @property
    def count_unclipped(self) -> bool:
        """Adaptive clipping needs how many updates fitted the clip: each hospital adds
        its bit to the masked vector, and the server reads only their sum."""
        return bool(getattr(self.strategy, "adaptive", False))

    def open_round(self, job_id: str, round_no: int, participants: Sequence[str],
                   global_state: Mapping[str, torch.Tensor], examples: Mapping[str, int],
                   on_dropped: Callable[[str, str], None] | None = None) -> SecAggRound:
        crl = self.crl_path.read_bytes() if self.crl_path.exists() else b""
        layout = [(name, t.shape, t.dtype) for name, t in global_state.items()
                  if t.is_floating_point()]
        return SecAggRound(job_id, round_no, participants, self.settings, layout,
                           {c: max(1, int(examples.get(c, 1))) for c in participants},
                           self.equal_weights, self.l2_clip, Verifier(self.ca_pem, crl or None),
                           crl, on_dropped, self.count_unclipped)


def _abort(context: grpc.ServicerContext, refusal: SecAggRefusal | RoundRefusal) -> NoReturn:
    abort(context, getattr(grpc.StatusCode, refusal.code), refusal.message)


class SecAggServicer:
    """The four secure-aggregation rpcs of service Coordinator (mixed into
    CoordinatorService, which provides `engine`). Each finds the caller's open secure
    round from its task id; identity is the certificate's, as for every call."""

    engine: Any

    def _secure_round(self, task_id: str, context: grpc.ServicerContext
                      ) -> tuple[str, SecAggRound]:
        client_id, sa, _ = self._secure_round_state(task_id, context)
        return client_id, sa

    def _secure_round_state(self, task_id: str, context: grpc.ServicerContext
                            ) -> tuple[str, SecAggRound, Any]:
        # Not engine.task_of: the unmask stage runs after the round has closed to uploads.
        client_id = identity_of(context).client_id
        rs = self.engine.current
        sa = getattr(rs, "secagg", None)
        if rs is None or sa is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "no securely aggregated round is in progress")
        task = rs.tasks.get(client_id)
        if task is None:
            abort(context, grpc.StatusCode.PERMISSION_DENIED,
                  f"{client_id} was not selected for round {rs.round}")
        if task.task_id != task_id:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"task {task_id!r} is not the open task of round {rs.round}")
        return client_id, sa, rs

    def _wait_s(self, sa: SecAggRound) -> float:
        return 2 * sa.settings.stage_timeout_s

    def AdvertiseKeys(self, request: spb.AdvertiseKeysRequest,
                      context: grpc.ServicerContext) -> spb.AdvertiseKeysReply:
        cid, sa = self._secure_round(request.task_id, context)
        try:
            return sa.advertise(cid, request.advert, self._wait_s(sa))
        except SecAggRefusal as refusal:
            _abort(context, refusal)

    def ShareKeys(self, request: spb.ShareKeysRequest,
                  context: grpc.ServicerContext) -> spb.ShareKeysReply:
        cid, sa = self._secure_round(request.task_id, context)
        try:
            return sa.share(cid, list(request.shares), self._wait_s(sa))
        except SecAggRefusal as refusal:
            _abort(context, refusal)

    def AwaitUnmask(self, request: spb.UnmaskPoll,
                    context: grpc.ServicerContext) -> spb.UnmaskRequest:
        cid, sa, rs = self._secure_round_state(request.task_id, context)
        left = rs.deadline - time.monotonic()
        try:
            return sa.await_unmask(cid, max(1.0, left + sa.settings.stage_timeout_s))
        except SecAggRefusal as refusal:
            _abort(context, refusal)

    def RevealShares(self, request: spb.RevealSharesRequest,
                     context: grpc.ServicerContext) -> spb.RevealSharesReply:
        cid, sa = self._secure_round(request.task_id, context)
        try:
            sa.reveal(cid, list(request.shares))
        except SecAggRefusal as refusal:
            _abort(context, refusal)
        return spb.RevealSharesReply(accepted=True)
