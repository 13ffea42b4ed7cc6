"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum.

``v_t = beta * v_{t-1} + D_t`` and ``x_{t+1} = x_t + eta * v_t``, where ``D_t``
is the example-weighted mean delta. Momentum damps the round-to-round
oscillation that non-IID clients cause; the velocity is server state and is
checkpointed with the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fl_server.strategies.base import check_fraction, check_positive
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.server_state import SlotState


class FedAvgM(FedAvg):
    name: ClassVar[str] = "fedavgm"
    streaming: ClassVar[bool] = True

    def __init__(self, server_lr: float = 1.0, beta: float = 0.9) -> None:
        super().__init__()
        self.server_lr = check_positive("server_lr", server_lr)
        self.beta = check_fraction("beta", beta, 0.0, 1.0, high_open=True)
        self._state = SlotState(self.name, ("momentum",))
        self._pending: dict[str, torch.Tensor] | None = None

    def _on_begin(self) -> None:
        super()._on_begin()
        self._state.check_against(self._global_state())
        self._pending = None

    def _on_end(self) -> None:
        super()._on_end()
        self._pending = None

    def _aggregate(self) -> dict[str, torch.Tensor]:
        mean = self._mean_delta()
        old = self._state.buffers["momentum"]
        velocity: dict[str, torch.Tensor] = {}
        for name, d in mean.items():
            v = old[name].mul(self.beta).add_(d) if name in old else d.clone()
            velocity[name] = v
            mean[name] = d.copy_(v).mul_(self.server_lr)
        self._pending = velocity
        return mean

    def _commit(self) -> None:
        if self._pending is not None:
            self._state.buffers = {"momentum": self._pending}
            self._pending = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state.load_state_dict(state)
