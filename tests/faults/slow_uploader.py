"""A hospital process that dies mid-upload (the test SIGKILLs it).

It joins with its real certificate, takes its TRAIN task, fetches the model, then
streams a *poisoned* update (every value 1000: it would move the model visibly if
any of it were used) in small chunks, stops after half of them, writes a marker
file saying how many chunks it sent, and waits to be killed.

    python -m tests.faults.slow_uploader PORT WORKDIR CLIENT_ID MARKER
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fl_proto import aggregator_pb2 as apb
from fl_proto import coordinator_pb2 as cpb
from tests.hostile.kit import HostileClient, Identity, site_identity


def main() -> int:
    port, workdir, client_id, marker = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], \
        Path(sys.argv[4])
    ident: Identity = site_identity(workdir, client_id)
    client = HostileClient(port, ident, client_id, num_examples=64)
    client.open_tasks()
    task = client.next_task(cpb.TRAIN, timeout=120)
    client.fetch_model(task, task.model_manifest)
    poison = {s.name: torch.full(tuple(s.shape), 1000.0) for s in task.model_manifest.tensors}
    stall_mid_upload(client, client.sealed(task, poison, chunk_size=32, num_examples=64),
                     marker)
    return 1  # never reached: the upload never ends by itself


def stall_mid_upload(client: HostileClient, up: Any, marker: Path) -> None:
    """Send the header and half the sealed chunks, write "sent total" to `marker`, then
    hold the stream open until the test SIGKILLs this process."""
    half = len(up.chunks) // 2
    forever = threading.Event()

    def stream() -> Iterator[apb.UpdateStreamMessage]:
        yield apb.UpdateStreamMessage(header=up.header)
        yield from up.chunks[:half]
        marker.write_text(f"{half} {len(up.chunks)}")
        forever.wait()  # mid-upload, until SIGKILL

    client.submit(stream(), timeout=600)


if __name__ == "__main__":
    sys.exit(main())
