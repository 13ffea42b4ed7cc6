"""Runs the real client and server protocol states against each other in one process
(threads stand in for hospitals; the gRPC layer is tested over real processes
elsewhere). Each hospital may drop at a chosen point."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization

from fl_client.secagg_client import SecAggClientSession
from fl_core.secagg import SecAggError
from fl_core.secagg.adverts import Verifier
from fl_core.secagg.prg import apply_masks
from fl_core.secagg.quantize import quantize_into
from fl_proto import coordinator_pb2 as cpb
from fl_proto import secagg_pb2 as spb
from fl_server.secagg_round import SecAggRefusal, SecAggRound, SecAggSettings
from tests.secagg.ca_helpers import TestCA

STAGES = ("advert", "share", "upload", "reveal")


@dataclass
class Hospital:
    cid: str
    delta: torch.Tensor
    examples: int
    drop_before: str = ""  # one of STAGES: the hospital vanishes just before it
    seed: int = 0
    error: SecAggError | SecAggRefusal | None = None
    session: SecAggClientSession | None = None
    quantized: np.ndarray | None = None
    uploaded: bool = False


@dataclass
class Outcome:
    server: SecAggRound
    hospitals: list[Hospital]
    result: object = None
    error: SecAggError | None = None
    drops: list[tuple[str, str]] = field(default_factory=list)


def make_round(hospitals: list[Hospital], ca: TestCA, *, timeout: float = 0.6,
               bits: int = 24, clip: float = 4.0, equal: bool = False, l2_clip: float = 0.0,
               count_unclipped: bool = False
               ) -> tuple[SecAggRound, dict[str, tuple[bytes, bytes]], Outcome]:
    length = hospitals[0].delta.numel()
    creds: dict[str, tuple[bytes, bytes]] = {}
    for h in hospitals:
        key, pem, _ = ca.issue(h.cid)
        creds[h.cid] = (pem, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    out = Outcome(None, hospitals)  # type: ignore[arg-type]
    server = SecAggRound("job", 1, [h.cid for h in hospitals],
                         SecAggSettings(0.5, bits, clip, timeout),
                         [("w", torch.Size([length]), torch.float32)],
                         {h.cid: h.examples for h in hospitals}, equal, l2_clip,
                         Verifier(ca.pem), ca.crl_pem(),
                         on_dropped=lambda c, r: out.drops.append((c, r)),
                         count_unclipped=count_unclipped)
    out.server = server
    return server, creds, out


def run(hospitals: list[Hospital], ca: TestCA | None = None, *,
        tamper_adverts: Callable[[str, spb.AdvertiseKeysReply], None] | None = None,
        tamper_unmask: Callable[[str, spb.UnmaskRequest], None] | None = None,
        **kw: object) -> Outcome:
    ca = ca or TestCA()
    server, creds, out = make_round(hospitals, ca, **kw)  # type: ignore[arg-type]
    task = cpb.Task(task_id="t", kind=cpb.TRAIN, job_id="job", round=1,
                    secagg=server.config())

    def first_half(h: Hospital) -> None:
        try:
            h.session = s = SecAggClientSession(h.cid, task, ca.pem, *creds[h.cid])
            if h.drop_before == "advert":
                return
            reply = server.advertise(h.cid, s.advert(), 10)
            if tamper_adverts:
                tamper_adverts(h.cid, reply)
            shares = s.on_adverts(reply)
            if h.drop_before == "share":
                return
            s.on_shares(server.share(h.cid, shares, 10))
            if h.drop_before == "upload":
                return
            noise_key = h.seed.to_bytes(32, "big")
            vec = s.masked_input([h.delta], h.examples, noise_key)
            # what the hospital meant: its masks taken off again
            h.quantized = vec.copy()
            apply_masks(h.quantized, [(seed, -sign) for seed, sign in s.mask_seeds()])
            if not s.cfg.l2_clip:  # the quantization masked_input fused with its masks
                alone = np.zeros(h.delta.numel(), dtype=np.uint32)
                quantize_into(alone, [h.delta], s.weight(h.examples), s.params, noise_key)
                assert np.array_equal(alone, h.quantized)
            server.fold(h.cid, torch.from_numpy(vec.view(np.int32)), h.examples)
            h.uploaded = True
        except (SecAggError, SecAggRefusal) as exc:
            h.error = exc

    threads = [threading.Thread(target=first_half, args=(h,)) for h in hospitals]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    server.close_collect()
    for h in hospitals:
        if not h.uploaded or h.drop_before == "reveal" or h.session is None:
            continue
        try:
            request = server.await_unmask(h.cid, 5)
            if tamper_unmask:
                tamper_unmask(h.cid, request)
            server.reveal(h.cid, h.session.on_unmask(request))
        except (SecAggError, SecAggRefusal) as exc:
            h.error = exc
    try:
        out.result = server.unmask()
    except SecAggError as exc:
        out.error = exc
    return out
