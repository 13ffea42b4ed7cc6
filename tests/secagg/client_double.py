"""A hospital for the secure-aggregation tests: the real fl_client.client process that
also writes its quantized update, just before masking, to FL_SECAGG_PLAIN_DIR. Only a
test needs that (to compare what the server held with what the hospital meant);
nothing else about the hospital changes.

    python -m tests.secagg.client_double <fl_client.client flags>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import fl_client.secagg_client as secagg_client


def main() -> int:
    folder = Path(os.environ["FL_SECAGG_PLAIN_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    original = secagg_client.mask_in_place

    def recording(vector: np.ndarray, rid: Any, client_id: str, *rest: Any) -> None:
        np.save(folder / f"plain-r{rid.round}-{client_id}.npy", vector.copy())
        original(vector, rid, client_id, *rest)

    secagg_client.mask_in_place = recording  # type: ignore[assignment]
    from fl_client.client import main as client_main

    return client_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
