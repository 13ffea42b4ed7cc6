"""A hospital for the secure-aggregation tests: the real fl_client.client process that
also writes its quantized update (the words before masking, recovered by taking its
own masks off again) to FL_SECAGG_PLAIN_DIR, with its weight's numerator and divisor.
Only a test needs that (to compare what the server held, and the model it made, with
what the hospital meant); nothing else about the hospital changes.

    python -m tests.secagg.client_double <fl_client.client flags>
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fl_client.secagg_client import SecAggClientSession
from fl_core.secagg.prg import apply_masks


def main() -> int:
    folder = Path(os.environ["FL_SECAGG_PLAIN_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    original = SecAggClientSession.masked_input

    def recording(self: SecAggClientSession, delta: Sequence[torch.Tensor],
                  num_examples: int, noise_key: bytes | None = None) -> np.ndarray:
        vector = original(self, delta, num_examples, noise_key)
        plain = vector.copy()
        apply_masks(plain, [(seed, -sign) for seed, sign in self.mask_seeds()])
        stem = f"r{self.rid.round}-{self.client_id}"
        np.save(folder / f"plain-{stem}.npy", plain)
        (folder / f"meta-{stem}.json").write_text(json.dumps(
            {"num_examples": num_examples, "divisor": self.cfg.weight_divisor,
             "bits": self.cfg.bits, "clip": self.cfg.clip}))
        return vector

    SecAggClientSession.masked_input = recording  # type: ignore[method-assign]
    from fl_client.client import main as client_main

    return client_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
