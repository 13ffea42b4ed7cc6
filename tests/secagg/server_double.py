"""A server double for the secure-aggregation tests: the real fl_server.server process
with one behaviour changed, chosen by FL_SECAGG_DOUBLE:

- ``tap:<dir>``: an honest but curious server. It keeps a copy of everything it
  receives for the sum (each hospital's masked input, the relayed adverts and share
  boxes, the revealed shares) in <dir>, as an attacker holding the server would.
- ``swap_key:<client>``: a malicious server that relays a mask key of its own in
  place of <client>'s to every other hospital (a man in the middle).
- ``both_shares:<client>``: a malicious server that asks every survivor for both
  the self-mask seed share and the mask-key share of <client>.
- ``swap_then_both:<client1>,<client2>``: both attacks in one job, one per attempt:
  the first secure round attempt swaps <client1>'s key, the second asks for both
  shares of <client2> (one server and one set of hospitals for the two cases).

    python -m tests.secagg.server_double <fl_server.server flags>
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fl_proto import secagg_pb2 as spb
from fl_server import secagg_round
from fl_server.secagg_round import SecAggRound


def _tap(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fold, advertise, reveal = SecAggRound.fold, SecAggRound.advertise, SecAggRound.reveal

    def tapped_fold(self: SecAggRound, cid: str, masked: Any, num_examples: int) -> None:
        words = masked.detach().reshape(-1).numpy().view(np.uint32).copy()
        np.save(folder / f"masked-r{self.rid.round}-{cid}.npy", words)
        fold(self, cid, masked, num_examples)

    def tapped_advertise(self: SecAggRound, cid: str, advert: spb.KeyAdvert,
                         timeout: float) -> spb.AdvertiseKeysReply:
        reply = advertise(self, cid, advert, timeout)
        (folder / f"adverts-r{self.rid.round}.bin").write_bytes(reply.SerializeToString())
        (folder / f"session-r{self.rid.round}.txt").write_text(
            f"{self.rid.job_id}\n{self.rid.session_id}\n{self.t}\n")
        return reply

    def tapped_reveal(self: SecAggRound, cid: str,
                      shares: Sequence[spb.RevealedShare]) -> None:
        req = spb.RevealSharesRequest(task_id=cid, shares=list(shares))
        (folder / f"reveal-r{self.rid.round}-{cid}.bin").write_bytes(req.SerializeToString())
        reveal(self, cid, shares)

    SecAggRound.fold = tapped_fold  # type: ignore[method-assign]
    SecAggRound.advertise = tapped_advertise  # type: ignore[method-assign]
    SecAggRound.reveal = tapped_reveal  # type: ignore[method-assign]


def _swap_key(victim: str) -> None:
    advertise = SecAggRound.advertise
    mine = X25519PrivateKey.generate().public_key().public_bytes_raw()

    def swapping(self: SecAggRound, cid: str, advert: spb.KeyAdvert,
                 timeout: float) -> spb.AdvertiseKeysReply:
        reply = advertise(self, cid, advert, timeout)
        if cid != victim:
            for a in reply.adverts:
                if a.client_id == victim:
                    a.mask_public_key = mine
        return reply

    SecAggRound.advertise = swapping  # type: ignore[method-assign]


def _both_shares(victim: str) -> None:
    await_unmask = SecAggRound.await_unmask

    def greedy(self: SecAggRound, cid: str, timeout: float) -> spb.UnmaskRequest:
        request = await_unmask(self, cid, timeout)
        if victim in request.survivors:
            request.dropped.append(victim)
        return request

    SecAggRound.await_unmask = greedy  # type: ignore[method-assign]


def _swap_then_both(first: str, second: str) -> None:
    """The attacks of _swap_key and _both_shares, each on one attempt only."""
    init, advertise, await_unmask = (SecAggRound.__init__, SecAggRound.advertise,
                                     SecAggRound.await_unmask)
    opened: list[SecAggRound] = []
    mine = X25519PrivateKey.generate().public_key().public_bytes_raw()

    def numbered(self: SecAggRound, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        opened.append(self)

    def attempt(self: SecAggRound) -> int:
        return opened.index(self) + 1

    def swapping(self: SecAggRound, cid: str, advert: spb.KeyAdvert,
                 timeout: float) -> spb.AdvertiseKeysReply:
        reply = advertise(self, cid, advert, timeout)
        if attempt(self) == 1 and cid != first:
            for a in reply.adverts:
                if a.client_id == first:
                    a.mask_public_key = mine
        return reply

    def greedy(self: SecAggRound, cid: str, timeout: float) -> spb.UnmaskRequest:
        request = await_unmask(self, cid, timeout)
        if attempt(self) == 2 and second in request.survivors:
            request.dropped.append(second)
        return request

    SecAggRound.__init__ = numbered  # type: ignore[method-assign]
    SecAggRound.advertise = swapping  # type: ignore[method-assign]
    SecAggRound.await_unmask = greedy  # type: ignore[method-assign]


def main() -> int:
    kind, _, arg = os.environ.get("FL_SECAGG_DOUBLE", "").partition(":")
    if kind == "tap":
        _tap(Path(arg))
    elif kind == "swap_key":
        _swap_key(arg)
    elif kind == "both_shares":
        _both_shares(arg)
    elif kind == "swap_then_both":
        first, _, second = arg.partition(",")
        _swap_then_both(first, second)
    else:
        print(f"server_double: unknown FL_SECAGG_DOUBLE {kind!r}", file=sys.stderr)
        return 2
    assert secagg_round.SecAggRound is SecAggRound
    from fl_server.server import main as server_main

    return server_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
