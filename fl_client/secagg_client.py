"""A hospital's side of one secure-aggregation round attempt (SecAgg+).

The hospital trusts the server with nothing here: it recomputes the neighbour graph
from the participant list, checks every peer's advert against the CA and the CRL,
refuses parameters that would let the server reconstruct alone, refuses to send its
masked input when fewer than t holders of its secrets remain, and answers at most
one unmask request, never revealing both shares of one hospital. Its keys and seed
exist only in this object, made fresh per attempt and dropped with it.

`SecAggClientSession` is the protocol state (no I/O), so the protocol can be tested in
memory; `run_secure_round` drives it over a connection's four secure-aggregation rpcs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fl_core.constants import RPC_TIMEOUT_S
from fl_core.secagg import MASKED_TENSOR, SecAggError
from fl_core.secagg.adverts import Advert, RoundId, Verifier, sign_advert
from fl_core.secagg.graph import neighbour_count, neighbours, positions, threshold
from fl_core.secagg.masks import own_masks
from fl_core.secagg.prg import MaskStream
from fl_core.secagg.quantize import QuantParams, quantize_into
from fl_core.secagg.shamir import split
from fl_core.secagg.share_box import open_box, seal
from fl_proto import coordinator_pb2 as cpb
from fl_proto import secagg_pb2 as spb

# Codes of a hospital's refusal (they end up in the FAILED report's reason).
BAD_CONFIG = "BAD_CONFIG"
KEY_SUBSTITUTED = "KEY_SUBSTITUTED"
TOO_FEW_PEERS = "TOO_FEW_PEERS"
BAD_SHARES = "BAD_SHARES"
BAD_UNMASK = "BAD_UNMASK"

T = TypeVar("T")


def _to_advert(msg: spb.KeyAdvert) -> Advert:
    return Advert(msg.client_id, bytes(msg.mask_public_key), bytes(msg.share_public_key),
                  bytes(msg.certificate_pem), bytes(msg.signature))


def _flat_norm(tensors: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for t in tensors:
        total += float(torch.linalg.vector_norm(t.to(torch.float64))) ** 2
    return math.sqrt(total)


class SecAggClientSession:
    """One hospital in one attempt: advert -> shares -> masked input -> reveal."""

    def __init__(self, client_id: str, task: cpb.Task, ca_pem: bytes, cert_pem: bytes,
                 key_pem: bytes) -> None:
        cfg = task.secagg
        self.client_id = client_id
        self.cfg = cfg
        self.rid = RoundId(task.job_id, task.round, cfg.session_id)
        participants = list(cfg.participants)
        if client_id not in participants or len(set(participants)) != len(participants):
            raise SecAggError(BAD_CONFIG, "the participant list does not name this hospital once")
        if not cfg.session_id:
            raise SecAggError(BAD_CONFIG, "the secure round has no session id")
        k = neighbour_count(len(participants))
        # The server may not pick a threshold (or graph) that lets it reconstruct a
        # secret from fewer than a majority of its holders.
        if cfg.neighbours != k or not threshold(k, 0.5) <= cfg.threshold <= k + 1:
            raise SecAggError(BAD_CONFIG, f"unsafe parameters: k={cfg.neighbours} t="
                              f"{cfg.threshold} for {len(participants)} hospitals (expected"
                              f" k={k}, t in {threshold(k, 0.5)}..{k + 1})")
        self.params = QuantParams(cfg.bits, cfg.clip)
        self.t = cfg.threshold
        self.graph = neighbours(participants, cfg.session_id)
        self.peers = self.graph[client_id]
        self.pos = positions(participants)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecAggError(BAD_CONFIG, "this hospital's key is not an EC key")
        self.verifier = Verifier(ca_pem)
        self.mask_key = X25519PrivateKey.generate()
        self.share_key = X25519PrivateKey.generate()
        self.seed = os.urandom(32)
        self.own = sign_advert(self.rid, client_id,
                               self.mask_key.public_key().public_bytes_raw(),
                               self.share_key.public_key().public_bytes_raw(), key, cert_pem)
        self.adverts: dict[str, Advert] = {}
        self.holders: list[str] = []
        self.held: dict[str, spb.SharePlain] = {}  # shares this hospital holds, by owner
        self.sharers: set[str] = set()
        self.revealed = False

    # stage 1 ------------------------------------------------------------------------
    def advert(self) -> spb.KeyAdvert:
        a = self.own
        return spb.KeyAdvert(client_id=a.client_id, mask_public_key=a.mask_public_key,
                             share_public_key=a.share_public_key,
                             certificate_pem=a.certificate_pem, signature=a.signature)

    def on_adverts(self, reply: spb.AdvertiseKeysReply) -> list[spb.EncryptedShare]:
        """Checks every relayed advert; returns the sealed shares for the neighbours."""
        if reply.crl_pem:
            self.verifier.set_crl(bytes(reply.crl_pem))
        seen: dict[str, Advert] = {}
        for msg in reply.adverts:
            advert = _to_advert(msg)
            if advert.client_id in seen or advert.client_id not in self.pos:
                raise SecAggError(KEY_SUBSTITUTED, f"the server relayed an advert for"
                                  f" {advert.client_id!r} twice or for a non-participant")
            seen[advert.client_id] = advert
        if seen.get(self.client_id) != self.own:
            raise SecAggError(KEY_SUBSTITUTED, "the server relayed this hospital's own keys"
                              " altered (or not at all)")
        for peer in self.peers:
            if peer in seen:
                try:
                    self.verifier.verify(self.rid, seen[peer], peer)
                except SecAggError as exc:
                    raise SecAggError(KEY_SUBSTITUTED, f"advert of {peer} refused: {exc}") \
                        from None
        self.adverts = {p: seen[p] for p in self.peers if p in seen}
        self.holders = [*sorted(self.adverts), self.client_id]
        if len(self.holders) < self.t:
            raise SecAggError(TOO_FEW_PEERS, f"only {len(self.holders)} holders for this"
                              f" hospital's shares; {self.t} are needed")
        xs = [self.pos[h] for h in self.holders]
        seed_shares = split(self.seed, self.t, xs)
        key_shares = split(self.mask_key.private_bytes_raw(), self.t, xs)
        out: list[spb.EncryptedShare] = []
        for holder in self.holders:
            x = self.pos[holder]
            plain = spb.SharePlain(owner=self.client_id, holder=holder,
                                   seed_share=seed_shares[x], key_share=key_shares[x])
            if holder == self.client_id:
                self.held[self.client_id] = plain
                continue
            box = seal(self.share_key, self.adverts[holder].share_public_key, self.rid,
                       self.client_id, holder, plain.SerializeToString())
            out.append(spb.EncryptedShare(sender=self.client_id, receiver=holder, box=box))
        return out

    # stage 2 ------------------------------------------------------------------------
    def on_shares(self, reply: spb.ShareKeysReply) -> None:
        """Opens the shares sent to this hospital; checks enough holders remain."""
        sharers = set(reply.sharers)
        if self.client_id not in sharers or not sharers <= set(self.pos):
            raise SecAggError(BAD_SHARES, "the list of hospitals that shared keys is not"
                              " consistent with the participants")
        for msg in reply.shares:
            sender = msg.sender
            if msg.receiver != self.client_id or sender not in self.adverts \
                    or sender not in sharers or sender in self.held:
                raise SecAggError(BAD_SHARES, f"unexpected share from {sender!r}")
            plain = spb.SharePlain.FromString(open_box(
                self.share_key, self.adverts[sender].share_public_key, self.rid, sender,
                self.client_id, bytes(msg.box)))
            if plain.owner != sender or plain.holder != self.client_id:
                raise SecAggError(BAD_SHARES, f"the share from {sender} names another owner")
            self.held[sender] = plain
        missing = sorted(p for p in sharers if p in self.adverts and p not in self.held)
        if missing:
            raise SecAggError(BAD_SHARES, f"no share received from {', '.join(missing)}")
        self.sharers = sharers
        alive = [h for h in self.holders if h in sharers]
        if len(alive) < self.t:
            raise SecAggError(TOO_FEW_PEERS, f"{len(alive)} holders of this hospital's"
                              f" shares remain, {self.t} needed: not sending a masked input")

    # stage 3 ------------------------------------------------------------------------
    def weight(self, num_examples: int) -> float:
        d = self.cfg.weight_divisor
        w = 1.0 / d if self.cfg.equal_weights else num_examples / d
        if not (d > 0 and 0 < w <= 1.0):
            raise SecAggError(BAD_CONFIG, f"weight {num_examples}/{d} is outside (0, 1]")
        return w

    def masked_input(self, delta: Sequence[torch.Tensor], num_examples: int,
                     noise_key: bytes | None = None) -> np.ndarray:
        """The quantized, weighted, clipped delta plus every mask, as uint32 words
        (then, when the round counts them, this hospital's unclipped bit, masked too)."""
        if not self.sharers:
            raise SecAggError(BAD_SHARES, "masked input asked for before the share stage")
        length = sum(t.numel() for t in delta)
        if length != self.cfg.vector_length:
            raise SecAggError(BAD_CONFIG, f"the model has {length} coordinates, the round"
                              f" declares {self.cfg.vector_length}")
        tensors = list(delta)
        unclipped = 1
        if self.cfg.l2_clip > 0:
            norm = _flat_norm(tensors)
            if norm > self.cfg.l2_clip:
                tensors = [t * (self.cfg.l2_clip / norm) for t in tensors]
                unclipped = 0
        extra = 1 if self.cfg.count_unclipped else 0
        if extra and not self.cfg.l2_clip > 0:
            raise SecAggError(BAD_CONFIG, "the round counts unclipped updates but sets no clip")
        vector = np.zeros(length + extra, dtype=np.uint32)
        masks = MaskStream(self.mask_seeds())
        # each quantized slice is masked while still in cache
        quantize_into(vector[:length], tensors, self.weight(num_examples), self.params,
                      noise_key, then=masks.apply)
        if extra:
            # Andrew et al.'s bit b = [norm <= clip], an integer word: the server reads
            # only the sum of these (the count), never one hospital's
            vector[length] = unclipped
            masks.apply(vector[length:])
        return vector

    def mask_seeds(self) -> list[tuple[bytes, int]]:
        """This hospital's self-mask and its pairwise masks with the neighbours that
        shared keys (the masks that cancel, or that the server can remove)."""
        peers = {p: a.mask_public_key for p, a in self.adverts.items() if p in self.sharers}
        return own_masks(self.rid, self.client_id, self.seed, self.mask_key, peers)

    # stage 4 ------------------------------------------------------------------------
    def on_unmask(self, request: spb.UnmaskRequest) -> list[spb.RevealedShare]:
        """The shares the server may have: seeds of survivors, mask keys of the dropped."""
        if self.revealed:
            raise SecAggError(BAD_UNMASK, "this hospital already answered an unmask request"
                              " for this round")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = sorted(survivors & dropped)
        if both:
            raise SecAggError(BAD_UNMASK, f"the server asked for both shares of"
                              f" {', '.join(both)}: refused")
        if not (survivors | dropped) <= self.sharers or self.client_id not in survivors:
            raise SecAggError(BAD_UNMASK, "the unmask request names hospitals outside the"
                              " round, or not this one as a survivor")
        if len([h for h in self.holders if h in survivors]) < self.t:
            raise SecAggError(TOO_FEW_PEERS, "fewer than t holders survived: refusing to"
                              " reveal anything")
        self.revealed = True
        out: list[spb.RevealedShare] = []
        for owner, plain in sorted(self.held.items()):
            if owner in survivors:
                out.append(spb.RevealedShare(owner=owner, kind=spb.SEED,
                                             share=plain.seed_share))
            elif owner in dropped:
                out.append(spb.RevealedShare(owner=owner, kind=spb.MASK_KEY,
                                             share=plain.key_share))
        # the secrets are no use after this round; drop them early
        self.seed = b""
        return out


class SecureRound:
    """Drives one secure TRAIN task over a ServerConnection: keys and shares before
    training (so a substituted key costs no privacy budget), the masked input in the
    ordinary sealed upload, then the reveal."""

    def __init__(self, conn: Any, client_id: str, task: cpb.Task, ca_pem: bytes,
                 cert_pem: bytes, key_pem: bytes) -> None:
        self.conn = conn
        self.task = task
        self.session = SecAggClientSession(client_id, task, ca_pem, cert_pem, key_pem)
        self.stage_s = max(1.0, task.secagg.stage_timeout_s)

    def _call(self, method: str, request: Any, timeout: float) -> Any:
        try:
            return getattr(self.conn.coordinator, method)(
                request, metadata=self.conn.metadata(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name
            raise SecAggError("SERVER_REFUSED", f"{method}: {code}:"
                              f" {exc.details()}") from None

    def _deadline_left(self) -> float:
        return max(0.0, self.task.deadline_unix_ms / 1000 - time.time())

    def setup(self) -> None:
        """Advertise keys, check every peer's, exchange shares."""
        wait = 2 * self.stage_s + RPC_TIMEOUT_S
        reply = self._call("AdvertiseKeys", spb.AdvertiseKeysRequest(
            task_id=self.task.task_id, advert=self.session.advert()), wait)
        shares = self.session.on_adverts(reply)
        reply = self._call("ShareKeys", spb.ShareKeysRequest(
            task_id=self.task.task_id, shares=shares), wait)
        self.session.on_shares(reply)

    def setup_while(self, work: Callable[[], T]) -> T:
        """The key stages on a thread while `work` (the model download) runs on this
        one: both wait on the network, and the stages wait for the slowest hospital
        anyway. Keys are still checked before anything is trained. Raises what either
        raised (the key stages' SecAggError first)."""
        failed: list[BaseException] = []

        def keys() -> None:
            try:
                self.setup()
            except BaseException as exc:  # re-raised on the caller's thread
                failed.append(exc)

        thread = threading.Thread(target=keys, name="secagg-keys", daemon=True)
        thread.start()
        try:
            result = work()
        finally:
            thread.join()  # bounded: every rpc of setup() has a timeout
        if failed:
            raise failed[0]
        return result

    def masked_state(self, state: Mapping[str, torch.Tensor],
                     global_state: Mapping[str, torch.Tensor], is_delta: bool,
                     num_examples: int) -> dict[str, torch.Tensor]:
        """The one-tensor state to upload: the masked, quantized delta."""
        deltas = [(state[name] if is_delta else state[name] - ref).reshape(-1)
                  for name, ref in global_state.items() if ref.is_floating_point()]
        vector = self.session.masked_input(deltas, num_examples)
        return {MASKED_TENSOR: torch.from_numpy(vector.view(np.int32))}

    def finish(self) -> int:
        """Waits for the unmask request and reveals; returns hospitals that dropped."""
        request = self._call("AwaitUnmask", spb.UnmaskPoll(task_id=self.task.task_id),
                             self._deadline_left() + 2 * self.stage_s + RPC_TIMEOUT_S)
        shares = self.session.on_unmask(request)
        self._call("RevealShares", spb.RevealSharesRequest(task_id=self.task.task_id,
                                                           shares=shares), RPC_TIMEOUT_S)
        return len(request.dropped)
