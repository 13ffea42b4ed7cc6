"""FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAdam, FedYogi, FedAdagrad.

The example-weighted mean delta is treated as a pseudo-gradient for a server
optimiser (Algorithm 2 of the paper, no bias correction)::

    m_t = beta1 * m_{t-1} + (1 - beta1) * D_t
    v_t = v_{t-1} + D_t^2                                          (Adagrad)
    v_t = v_{t-1} - (1 - beta2) * D_t^2 * sign(v_{t-1} - D_t^2)     (Yogi)
    v_t = beta2 * v_{t-1} + (1 - beta2) * D_t^2                     (Adam)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper's ``v_{-1} >= tau^2``).
The adaptivity makes the server step robust to the scale of heterogeneous
clients' deltas; ``tau`` bounds how large a step a near-zero ``v`` allows.
The moments are server state: they are checkpointed with the model, and a
failed round leaves them untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fl_server.strategies.base import check_fraction, check_positive
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.server_state import SlotState


class FedOpt(FedAvg):
    """Shared machinery; subclasses define the second-moment update."""

    name: ClassVar[str] = "fedopt"
    streaming: ClassVar[bool] = True

    def __init__(
        self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        self.eta = check_positive("eta", eta)
        self.beta1 = check_fraction("beta1", beta1, 0.0, 1.0, high_open=True)
        self.beta2 = check_fraction("beta2", beta2, 0.0, 1.0, high_open=True)
        self.tau = check_positive("tau", tau)
        self._state = SlotState(self.name, ("m", "v"))
        self._pending: dict[str, dict[str, torch.Tensor]] | None = None

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _on_begin(self) -> None:
        super()._on_begin()
        self._state.check_against(self._global_state())
        self._pending = None

    def _on_end(self) -> None:
        super()._on_end()
        self._pending = None

    def _aggregate(self) -> dict[str, torch.Tensor]:
        mean = self._mean_delta()
        m_old, v_old = self._state.buffers["m"], self._state.buffers["v"]
        new_m: dict[str, torch.Tensor] = {}
        new_v: dict[str, torch.Tensor] = {}
        steps: dict[str, torch.Tensor] = {}
        for name, d in mean.items():
            if name in m_old:
                m_prev, v_prev = m_old[name], v_old[name]
            else:
                m_prev = torch.zeros_like(d)
                v_prev = torch.full_like(d, self.tau * self.tau)
            m = m_prev.mul(self.beta1).add_(d, alpha=1.0 - self.beta1)
            v = self._second_moment(v_prev, d.square_())
            step = v.sqrt().add_(self.tau)
            torch.div(m, step, out=step)
            steps[name] = step.mul_(self.eta)
            new_m[name], new_v[name] = m, v
        self._pending = {"m": new_m, "v": new_v}
        return steps

    def _commit(self) -> None:
        if self._pending is not None:
            self._state.buffers = self._pending
            self._pending = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state.load_state_dict(state)


class FedAdam(FedOpt):
    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.mul(self.beta2).add_(d2, alpha=1.0 - self.beta2)


class FedYogi(FedOpt):
    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        sign = torch.sign(v - d2)
        return v - (1.0 - self.beta2) * d2 * sign


class FedAdagrad(FedOpt):
    """Adagrad accumulates every squared pseudo-gradient; beta2 is not used."""

    name: ClassVar[str] = "fedadagrad"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.add(d2)
