"""Secure aggregation in the simulation: the daemons' SecAgg+ code, driven in memory.

A simulated secure round is the server's own `SecAggRound` (opened by the server's
`SecureAggregation` policy, so the same strategy refusals, weights, L2 clips and
parameters) and, per hospital, the client's own `SecureRound` and its session
(`fl_client.secagg_client`): the same graph, thresholds, Shamir shares, share boxes,
quantization, pairwise and self masks, modular fold and unmasking. What a network
would carry between them is handed over in this process instead:

- advertise: each hospital's advert goes to `SecAggRound.advertise`; each hospital
  then gets its own and its neighbours' adverts (the server relays all of them, but a
  hospital reads only those, so the simulation saves the n^2 relay);
- share: each hospital's sealed shares go to `SecAggRound.share`; each gets back the
  shares addressed to it and the list of hospitals that shared, as the rpc answers;
- collect: a trained hospital's delta is quantized, weighted and masked by
  `SecureRound.masked_state` and folded by `SecAggRound.fold` (uint32 addition);
- unmask: each survivor answers the server's unmask request with
  `SecAggClientSession.on_unmask`, and `SecAggRound.unmask_into` removes the masks
  and hands the dequantized sum to the strategy's `accept_sum`, as the server does.

What the simulation leaves out, and why: key adverts are signed (by one throwaway
key) but never checked against a CA, because there is no network and no server in
the middle that could substitute keys; and the key stages never wait for a timeout,
because the simulation knows who will not answer (its injected dropouts): a stage
closes as the server's does when its timeout expires, at once.

The hospitals' key, share and masking steps run in the driver process, one after
another (each hospital recomputes the SecAgg+ graph, as its daemon does): their cost
grows like n^2 log n per round, against the n log n of hospitals on their own machines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl_client.secagg_client import SecureRound
from fl_core.secagg import MASKED_TENSOR, SecAggError
from fl_core.secagg.adverts import BAD_ADVERT, Advert, RoundId, Verifier
from fl_proto import coordinator_pb2 as cpb
from fl_proto import secagg_pb2 as spb
from fl_server.config import ServerConfig
from fl_server.secagg_round import (
    ADVERTISE,
    FAILED,
    SHARE,
    SecAggRefusal,
    SecAggRound,
    SecAggSettings,
    SecureAggregation,
    UnmaskedSum,
)
from fl_server.strategies import Strategy

# A key stage is closed by the simulation as soon as every hospital that will answer
# has: this timeout is never reached, it only has to outlast the driver's own work.
SIM_STAGE_TIMEOUT_S = 24 * 3600.0
# What a secure step may raise for one hospital's masked input.
SECURE_ERRORS = (SecAggError, SecAggRefusal)


class TrustingVerifier(Verifier):
    """Takes every well-formed advert without a certificate check: in a simulation no
    server stands between the hospitals to substitute keys (see the module docstring)."""

    def __init__(self) -> None:  # no CA to load
        self.revoked: frozenset[int] = frozenset()

    def set_crl(self, crl_pem: bytes) -> None:
        return None

    def verify(self, rid: RoundId, advert: Advert, expected_id: str) -> None:
        if advert.client_id != expected_id:
            raise SecAggError(BAD_ADVERT, f"advert for {expected_id!r} names"
                              f" {advert.client_id!r}")


TRUSTING = TrustingVerifier()


@dataclass(frozen=True)
class SimIdentity:
    """The one throwaway key (and a self-signed certificate, which the hospital's
    session needs in order to build its verifier) that signs every simulated advert."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def make(cls) -> SimIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl_sim throwaway")])
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=30))
                .sign(key, hashes.SHA256()))
        return cls(cert.public_bytes(serialization.Encoding.PEM),
                   key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))


def secure_policy(cfg: ServerConfig, strategy: Strategy, identity: SimIdentity,
                  state_dir: Path) -> SecureAggregation:
    """The server's secure-aggregation policy for the job (raises ValueError with the
    server's own reason for a strategy it refuses). There is no CRL in a simulation."""
    return SecureAggregation(
        SecAggSettings(cfg.secagg_threshold, cfg.secagg_bits, cfg.secagg_clip,
                       SIM_STAGE_TIMEOUT_S),
        strategy, identity.cert_pem, state_dir / "no-crl-in-a-simulation.pem")


class SecureSimRound:
    """One attempt's secure aggregation; see the module docstring.

    After construction (the two key stages), `failed` says why the attempt cannot
    go on (too few hospitals advertised or shared keys), `failures` names the
    hospitals whose own session refused (they do not train, as their daemon would
    not), and `ready` those that may train and send a masked input.
    """

    def __init__(self, policy: SecureAggregation, identity: SimIdentity, job_id: str,
                 round_no: int, participants: list[str],
                 global_state: Mapping[str, torch.Tensor], examples: Mapping[str, int],
                 absent: Iterable[str] = ()) -> None:
        self.server: SecAggRound = policy.open_round(job_id, round_no, participants,
                                                     global_state, examples)
        self.server.verifier = TRUSTING
        self.failures: dict[str, str] = {}
        self.failed = ""
        self.hospitals: dict[str, SecureRound] = {}
        config = self.server.config()
        gone = set(absent)
        for cid in sorted(participants):
            if cid in gone:
                continue  # unreachable: never advertises (dropped when the stage closes)
            task = cpb.Task(job_id=job_id, round=round_no, secagg=config)
            task.config.update_kind = cpb.DELTA
            hospital = SecureRound(None, cid, task, identity.cert_pem, b"", identity.key_pem)
            session = hospital.session
            session.verifier = TRUSTING
            # every session computed the same graph and positions as the server; one
            # copy is kept, so memory is n k, not n^2
            session.graph, session.pos = self.server.graph, self.server.pos
            self.server.advertise(cid, session.advert(), 0.0)
            self.hospitals[cid] = hospital
        self._close_stage(ADVERTISE)
        if self._check_failed():
            return
        for cid, hospital in list(self.hospitals.items()):
            session = hospital.session
            near = [p for p in (*session.peers, cid) if p in self.server.adverts]
            reply = spb.AdvertiseKeysReply(adverts=[self.server.adverts[p] for p in sorted(near)])
            try:
                shares = session.on_adverts(reply)
            except SecAggError as exc:
                self._refused(cid, exc)
                continue
            self.server.share(cid, shares, 0.0)
        self._close_stage(SHARE)
        if self._check_failed():
            return
        sharers = sorted(self.server.sharers)
        for cid, hospital in list(self.hospitals.items()):
            answer = spb.ShareKeysReply(
                shares=[s for s in self.server.boxes.get(cid, [])
                        if s.sender in self.server.sharers], sharers=sharers)
            try:
                hospital.session.on_shares(answer)
            except SecAggError as exc:
                self._refused(cid, exc)

    def _refused(self, cid: str, exc: SecAggError) -> None:
        """The hospital's daemon reports FAILED "secure aggregation: ..." and stops."""
        self.failures[cid] = f"FAILED: secure aggregation: {exc}"
        del self.hospitals[cid]

    def _close_stage(self, stage: str) -> None:
        """Closes `stage` (advertise or share) now: everyone who will answer has. With
        hospitals missing this is what the server's stage timeout does when it expires
        (they count as dropped); the simulation has no reason to wait for it. (With
        nobody missing, the last answer has closed it already.)"""
        if self.server.stage == stage:
            self.server._deadline = time.monotonic()  # noqa: SLF001 - the timeout, now
            self.server.tick()

    def _check_failed(self) -> bool:
        if self.server.stage == FAILED:
            self.failed = self.server.failure
            self.hospitals.clear()
            return True
        return False

    @property
    def ready(self) -> set[str]:
        return set(self.hospitals)

    def fold(self, cid: str, delta: Mapping[str, torch.Tensor],
             global_state: Mapping[str, torch.Tensor], num_examples: int) -> None:
        """The hospital masks its delta (its daemon's `masked_state`), the server folds
        it; raises SecAggError/SecAggRefusal when either side refuses."""
        masked = self.hospitals[cid].masked_state(delta, global_state, True, num_examples)
        self.server.fold(cid, masked[MASKED_TENSOR], num_examples)

    def abort(self, reason: str) -> None:
        self.server.abort(reason)

    def unmask_into(self, strategy: Strategy) -> UnmaskedSum:
        """Survivors reveal what the server may have, and the server unmasks (once) into
        the strategy. Raises SecAggError when too few shares came back."""
        server = self.server
        server.close_collect()
        for cid in sorted(server.examples):
            request = server.await_unmask(cid, 0.0)
            try:
                shares = self.hospitals[cid].session.on_unmask(request)
            except SecAggError:
                continue  # the hospital refuses to reveal (fewer than t holders survived)
            server.reveal(cid, shares)
        done = threading.Event()
        done.set()  # every reveal is in: the server need not wait for a late one
        return server.unmask_into(strategy, done)

    def summary(self) -> dict[str, float]:
        return self.server.summary()
