"""FedProx (Li et al. 2020): FedAvg aggregation with a proximal term on the clients.

The server side is exactly FedAvg; what differs is the local objective
``loss + mu/2 * ||w - w_global||^2``, which limits client drift on heterogeneous
hospitals' data. The server's only job is to tell clients ``mu`` each round.
"""

from __future__ import annotations

from typing import ClassVar

from fl_server.strategies.base import check_positive
from fl_server.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose client_config() carries the proximal coefficient mu."""

    name: ClassVar[str] = "fedprox"
    streaming: ClassVar[bool] = True

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        self.mu = check_positive("mu", mu, allow_zero=True)

    def client_config(self) -> dict[str, float]:
        return {"proximal_mu": self.mu}
