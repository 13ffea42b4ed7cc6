"""What one simulation run does: the federation, the round rules, privacy and Ray.

The round rules and the training configuration are a real `ServerConfig`, so the
simulation validates them with the server's own checks and hands its virtual
hospitals the very `TrainConfig` a server would send (`fl_server.server.train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fl_server.config import ServerConfig

DEFAULT_EPSILON_BUDGET = 10.0  # the client daemon's default --epsilon_budget
DEFAULT_PROGRESS_S = 2.0  # seconds between progress lines within a round
DEFAULT_RAY_CONNECT_TIMEOUT_S = 60.0  # joining a cluster that does not answer


@dataclass(frozen=True)
class SimSettings:
    """Everything a run needs; `fl_sim.cli.parse_args` builds it from the command line."""

    server: ServerConfig  # model, rounds, strategy, selection, quorum, DP, seed
    hospitals: int = 10
    out: Path = Path("sim_out")
    data_dir: Path | None = None  # an already prepared federation folder (else prepared)
    alpha: float | None = None  # Dirichlet label skew when preparing; None = IID
    partitions: int = 0  # data parts (0: one per hospital); fewer parts are shared round-robin
    samples: int | None = None  # synthetic tasks: examples to generate
    epsilon_budget: float = DEFAULT_EPSILON_BUDGET  # each hospital's lifetime ledger budget
    dropout_rate: float = 0.0  # chance a selected hospital drops out of a round
    ray_address: str | None = None  # None: embedded Ray on this machine
    num_cpus: int = 0  # embedded Ray's CPUs (0: the machine's)
    cpus_per_hospital: float = 1.0
    gpus_per_hospital: float = 0.0
    workers: int = 0  # Ray actors in the pool (0: as many as the resources allow)
    ray_connect_timeout_s: float = DEFAULT_RAY_CONNECT_TIMEOUT_S
    progress_s: float = DEFAULT_PROGRESS_S
    plot: bool = True
    ray_logs: bool = False  # forward the workers' logs to this terminal

    @property
    def hospital_names(self) -> list[str]:
        return [f"hospital_{i}" for i in range(1, self.hospitals + 1)]

    @property
    def secure_aggregation(self) -> bool:
        """SecAgg+ rounds (a round rule, so the server config's)."""
        return self.server.secure_aggregation

    @property
    def parts(self) -> int:
        """How many data parts there are (one per hospital unless --partitions says)."""
        return self.partitions or self.hospitals

    def validate(self) -> None:
        """Reject what the run would trip over later, naming the flag."""
        self.server.validate()
        problems = []
        if self.hospitals < 1:
            problems.append("--hospitals must be at least 1")
        if self.partitions < 0 or self.partitions > self.hospitals:
            problems.append("--partitions must be between 1 and --hospitals (0: one per"
                            " hospital)")
        if self.alpha is not None and not self.alpha > 0:
            problems.append("--alpha must be positive (omit it for an IID split)")
        if not (self.epsilon_budget > 0):
            problems.append("--epsilon_budget must be positive")
        if not 0 <= self.dropout_rate < 1:
            problems.append("--dropout_rate must be in [0, 1)")
        if self.num_cpus < 0:
            problems.append("--num_cpus must not be negative (0: the machine's)")
        if not self.cpus_per_hospital > 0:
            problems.append("--cpus_per_hospital must be positive")
        if not 0 <= self.gpus_per_hospital <= 1 and not float(self.gpus_per_hospital).is_integer():
            problems.append("--gpus_per_hospital must be a fraction of one GPU or a whole number")
        if self.gpus_per_hospital < 0:
            problems.append("--gpus_per_hospital must not be negative")
        if self.workers < 0:
            problems.append("--workers must not be negative (0: as many as resources allow)")
        if self.server.min_clients > self.hospitals:
            problems.append(f"--min_clients ({self.server.min_clients}) is more than"
                            f" --hospitals ({self.hospitals}): no round could start")
        if not self.ray_connect_timeout_s > 0:
            problems.append("--ray_connect_timeout_s must be positive")
        if not self.progress_s > 0:
            problems.append("--progress_s must be positive")
        if problems:
            raise ValueError("; ".join(problems))
