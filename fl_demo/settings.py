"""What one demo run does: the federation's size and the training and privacy knobs.

Each model gets its own quick defaults (`PROFILES`) because the five tasks differ a
lot in cost: the tabular ones train a round in about a second, the image ones take
several on a laptop CPU, and `make demo` should finish in a few minutes whatever
MODEL is. Command-line flags override a profile field by field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fl_core.constants import TRAINING_DEVICES


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imported here only when cuda is asked for)."""
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class Profile:
    """Per-model defaults, tuned so the demo is quick and the federation still learns.

    The privacy budget is per hospital for the whole job (`epsilon_per_hospital`):
    each hospital plans its own noise for `rounds` rounds (fl_client/budget_planner.py),
    so the number of rounds is part of the DP tuning: fewer, larger steps cost less
    privacy per unit of signal. The local training (epochs, batch size, learning rate,
    clipping) is the task's own DP-tuned hyperparams.py unless a field here says
    otherwise. `noise_multiplier` is used only when no epsilon is given (--epsilon inf
    trains without DP).
    """

    rounds: int
    noise_multiplier: float
    epsilon_budget: float
    epsilon_per_hospital: float = 3.0
    local_epochs: int | None = None  # None: the task's hyperparams.py
    samples: int | None = None  # synthetic tasks: examples to generate (None: the task's)
    learning_rate: float | None = None  # None: the task's default
    # The server's strategy, and its --strategy_param NAME=VALUE pairs; a --strategy
    # on the command line replaces both.
    strategy: str = "fedavg"
    strategy_params: tuple[str, ...] = ()

    @property
    def strategy_args(self) -> tuple[str, ...]:
        """The server flags that carry `strategy_params`."""
        return tuple(arg for param in self.strategy_params
                     for arg in ("--strategy_param", param))


PROFILES: dict[str, Profile] = {
    # Real Wisconsin data (569 cases): cheap.
    "breast_cancer": Profile(rounds=4, noise_multiplier=1.0, epsilon_budget=20.0),
    # symptom: one full-batch DP step per round and server momentum, so the 12 rounds
    # are 12 momentum steps of centralised DP-SGD (fl_models/symptom/hyperparams.py).
    "symptom": Profile(rounds=12, noise_multiplier=1.0, epsilon_budget=20.0,
                       strategy="fedavgm", strategy_params=("server_lr=1", "beta=0.7")),
    "ecg": Profile(rounds=4, noise_multiplier=0.8, epsilon_budget=25.0, samples=1800),
    # glaucoma and pneumonia (issue 13): a fixed scattering front end and a linear head
    # (fl_models/fixed_features.py), one full-batch DP step per hospital a round, and
    # server momentum, so the rounds act as momentum steps of centralised DP-SGD on the
    # pooled images (their hyperparams.py); the image budget is epsilon 8.
    "glaucoma": Profile(rounds=12, noise_multiplier=0.8, epsilon_budget=20.0,
                        epsilon_per_hospital=8.0, strategy="fedavgm",
                        strategy_params=("server_lr=1", "beta=0.7")),
    "pneumonia": Profile(rounds=15, noise_multiplier=0.8, epsilon_budget=20.0,
                         epsilon_per_hospital=8.0, strategy="fedavgm",
                         strategy_params=("server_lr=1", "beta=0.7")),
}
FALLBACK_PROFILE = Profile(rounds=3, noise_multiplier=1.0, epsilon_budget=20.0)


@dataclass(frozen=True)
class DemoSettings:
    """Everything a run needs; `fl_demo.demo.parse_args` builds it from the command line."""

    model_type: str = "breast_cancer"
    out: Path = Path("demo_out")
    hospitals: int = 3
    rounds: int = 5
    local_epochs: int | None = None  # None: the task's hyperparams.py
    noise_multiplier: float = 1.0  # used only without an epsilon (math.inf: no DP)
    epsilon_budget: float = 20.0
    # The job's budget per hospital (math.inf: no DP; None: the fixed noise_multiplier).
    epsilon_per_hospital: float | None = 3.0
    alpha: float | None = 0.5  # Dirichlet label skew; None = IID
    samples: int | None = None
    learning_rate: float | None = None  # None: the task's default
    seed: int = 0
    strategy: str = "fedavg"
    # SecAgg+ (issue 12): the server sees only the sum of the hospitals' updates.
    secure_aggregation: bool = True
    baseline: bool = True
    fed_eval: bool = False  # hospitals also score each global model on their own test split
    timeout_s: float = 600.0
    device: str = "cpu"  # where the hospitals train: cpu, cuda or auto (fl-client --device)
    extra_server_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def private(self) -> bool:
        """False only for the sweep's epsilon = inf point (no DP, the utility ceiling)."""
        return self.epsilon_per_hospital is None or math.isfinite(self.epsilon_per_hospital)

    @property
    def hospital_names(self) -> list[str]:
        return [f"hospital_{i}" for i in range(1, self.hospitals + 1)]

    def validate(self) -> None:
        """Reject values the daemons would reject later, with the flag's name."""
        problems = []
        if self.hospitals < 1:
            problems.append("--hospitals must be at least 1")
        if self.rounds < 1:
            problems.append("--rounds must be at least 1")
        if self.local_epochs is not None and self.local_epochs < 1:
            problems.append("--local_epochs must be at least 1")
        if self.noise_multiplier <= 0:
            problems.append("--noise_multiplier must be positive (the demo always trains with DP)")
        if self.epsilon_budget <= 0:
            problems.append("--epsilon_budget must be positive")
        eps = self.epsilon_per_hospital
        if eps is not None and not eps > 0:
            problems.append("--epsilon must be positive (inf: train without DP)")
        elif eps is not None and eps > self.epsilon_budget and self.private:
            problems.append(f"--epsilon {self.epsilon_per_hospital:g} is over each hospital's"
                            f" --epsilon_budget {self.epsilon_budget:g}")
        if self.alpha is not None and self.alpha <= 0:
            problems.append("--alpha must be positive (omit it with --iid)")
        if self.learning_rate is not None and self.learning_rate <= 0:
            problems.append("--learning_rate must be positive")
        if self.timeout_s <= 0:
            problems.append("--timeout_s must be positive")
        if self.device not in TRAINING_DEVICES:
            problems.append(f"--device must be one of {', '.join(TRAINING_DEVICES)}")
        elif self.device == "cuda" and not cuda_available():
            problems.append("--device cuda: no CUDA device is available on this machine"
                            " (use cpu, or auto to take one when there is)")
        if problems:
            raise ValueError("; ".join(problems))
