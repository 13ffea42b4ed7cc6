"""Update norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?").

Each client's delta is scaled by ``min(1, bound / ||delta||_2)`` (the L2 norm over
all its floating tensors together), then the clipped deltas are averaged with
example weights. A single client can then move the global model by at most
``bound`` times its weight share, which blunts boosted (scaled-up) backdoor
updates while leaving honest small updates untouched.

Still streaming: the norm is one read of the delta, the fold a second, so memory
stays one model.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fl_server.strategies.base import check_positive, update_norm
from fl_server.strategies.fedavg import FedAvg


class NormBounding(FedAvg):
    name: ClassVar[str] = "norm_bounding"
    streaming: ClassVar[bool] = True

    def __init__(self, bound: float = 1.0) -> None:
        super().__init__()
        self.bound = check_positive("bound", bound)
        self.clipped: dict[str, float] = {}

    def _on_begin(self) -> None:
        super()._on_begin()
        self.clipped = {}

    def _weight(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> float:
        norm = update_norm(delta, self._release)
        scale = 1.0
        if norm > self.bound:
            scale = self.bound / norm
            self.clipped[client_id] = norm
        return float(num_examples) * scale
