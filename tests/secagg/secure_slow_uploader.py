"""A hospital process that dies mid masked upload (the test SIGKILLs it).

It joins with its real certificate, takes its secure TRAIN task, runs the key stages
with the real client's SecureRound (so it holds shares of its peers and they of it),
fetches the model, masks a large delta (every coordinate 0.5: it would move the model
visibly if any of it were summed unmasked) and streams the masked input in 32-byte
chunks, stops after half of them, writes a marker file saying how many it sent, and
waits to be killed.

    python -m tests.secagg.secure_slow_uploader PORT WORKDIR CLIENT_ID MARKER
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fl_client.secagg_client import SecureRound
from fl_proto import coordinator_pb2 as cpb
from tests.faults.slow_uploader import stall_mid_upload
from tests.hostile.kit import HostileClient, Identity, site_identity

NUM_EXAMPLES = 64


def main() -> int:
    port, workdir, client_id, marker = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], \
        Path(sys.argv[4])
    ident: Identity = site_identity(workdir, client_id)
    client = HostileClient(port, ident, client_id, num_examples=NUM_EXAMPLES)
    client.open_tasks()
    task = client.next_task(cpb.TRAIN, timeout=120)
    secure = SecureRound(client, client_id, task, ident.ca, ident.cert, ident.key)
    global_state = secure.setup_while(lambda: client.global_state(task))
    delta = {name: torch.full_like(t, 0.5) for name, t in global_state.items()
             if t.is_floating_point()}
    state = secure.masked_state(delta, global_state, True, NUM_EXAMPLES)
    stall_mid_upload(client, client.sealed(task, state, chunk_size=32,
                                            num_examples=NUM_EXAMPLES), marker)
    return 1  # never reached: the upload never ends by itself


if __name__ == "__main__":
    sys.exit(main())
