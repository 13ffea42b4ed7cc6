"""A hospital's privacy budget planned over the whole job, not round by round.

Why: people state a privacy budget for a job ("epsilon 3 per hospital for this
study"), not per round. Asking each round for a fixed epsilon either wastes most of
the budget (a loose per-round target) or runs out half way (a tight one), and a
fixed noise multiplier lands wherever the data size puts it. So each hospital plans:
given the job's epsilon ``E``, the rounds left, and its own sample rate and steps per
round (both follow from its data size and batch size), it picks the smallest noise
multiplier for which the *composed* history (its ledger so far plus the rounds left
at that noise) is at or under ``E`` after the job's last round, and at or under its
ledger's lifetime budget. It plans with the same accountant the ledger keeps (PRV by
default), so the figure planned is the figure the ledger will show.

How the noise is found: the search Opacus's ``get_noise_multiplier`` does (double
sigma until the budget holds, then narrow), but over the composed history: Opacus's
function only takes one ``(sigma, sample_rate, steps)``, and a job's history has
the rounds already trained (perhaps at another noise, or a retried round). It
narrows geometrically and stops once the epsilon is within ``PLANNER_TOLERANCE`` of
the target (at most the target, never above), so about ten accountant calls.

Each round re-plans from the ledger, so whatever happened (a retried round, a
changed data size) the remaining rounds absorb it; when the previous round's noise
still fits, it is kept, so a job's history stays one mechanism (cheap to compose).
A job that can no longer fit (its history alone already at ``E``) is refused with
``BudgetExceeded`` before any data is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fl_client.privacy_ledger import BudgetExceeded, Mechanism, PrivacyLedger
from fl_core.constants import PLANNER_TOLERANCE

MAX_SIGMA = 1e6  # as Opacus's get_noise_multiplier: a budget needing more is "too low"
MIN_SIGMA = 0.05  # below this there is no meaningful privacy left to save
MAX_ITERATIONS = 60

EpsilonFn = Callable[[Sequence[Mechanism]], float]


@dataclass(frozen=True)
class RoundPlan:
    """This round's noise and what the job will have spent if the plan is followed."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # this round's
    rounds_left: int  # this one included
    job_epsilon: float  # projected, after the job's last round
    total_epsilon: float  # projected ledger total, after the job's last round
    epsilon_per_job: float
    kept: bool  # the previous round's noise still fitted


def calibrate_noise(
    history: Sequence[Mechanism],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    epsilon_of: EpsilonFn,
    tolerance: float = PLANNER_TOLERANCE,
) -> tuple[float, float]:
    """(sigma, epsilon): the smallest noise multiplier, to ``tolerance``, for which
    ``epsilon_of([*history, (sigma, sample_rate, steps)]) <= target_epsilon``.

    Raises ``ValueError`` for bad arguments or a target the history alone reaches,
    or one that would need more noise than ``MAX_SIGMA``.
    """
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target_epsilon!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    already = epsilon_of(history)
    if already >= target_epsilon:
        raise ValueError(f"the history alone is at epsilon {already:.4f}, not under the "
                         f"target {target_epsilon:.4f}")

    def eps(sigma: float) -> float:
        return epsilon_of([*history, (sigma, sample_rate, steps)])

    # Bracket: eps(low) > target >= eps(high).
    high = 1.0
    eps_high = eps(high)
    low = 0.0
    while eps_high > target_epsilon:
        low, high = high, high * 2
        if high > MAX_SIGMA:
            raise ValueError(f"epsilon {target_epsilon:.4f} is too low a budget for "
                             f"{steps} steps at sample rate {sample_rate:.4g}")
        eps_high = eps(high)
    if low == 0.0:
        low = high / 2
        while eps(low) <= target_epsilon:
            high, eps_high = low, eps(low)
            if low < MIN_SIGMA:
                return _rounded_up(high, eps_high, eps, target_epsilon)
            low /= 2
    for _ in range(MAX_ITERATIONS):
        if eps_high >= (1 - tolerance) * target_epsilon or high / low < 1 + 1e-9:
            break
        mid = math.sqrt(low * high)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return _rounded_up(high, eps_high, eps, target_epsilon)


def _rounded_up(sigma: float, eps_sigma: float, eps: Callable[[float], float],
                target: float) -> tuple[float, float]:
    """Four decimals for a readable ledger, rounded up (more noise: never over)."""
    rounded = math.ceil(sigma * 1e4) / 1e4
    if rounded == sigma:
        return sigma, eps_sigma
    eps_rounded = eps(rounded)
    return (rounded, eps_rounded) if eps_rounded <= target else (sigma, eps_sigma)


def plan_round(
    ledger: PrivacyLedger,
    job_id: str,
    sample_rate: float,
    steps: int,
    rounds_left: int,
    epsilon_per_job: float,
    tolerance: float = PLANNER_TOLERANCE,
) -> RoundPlan:
    """This round's noise multiplier so that, if every round left trains ``steps`` steps
    at ``sample_rate`` with it, the job's epsilon ends at or under ``epsilon_per_job``
    and the ledger's total at or under its budget. Raises ``BudgetExceeded`` when no
    noise can do that (the budget is already spent)."""
    if rounds_left < 1:
        raise ValueError(f"rounds_left must be >= 1, got {rounds_left}")
    if not (math.isfinite(epsilon_per_job) and epsilon_per_job > 0):
        raise ValueError(f"epsilon_per_job must be finite and > 0, got {epsilon_per_job!r}")
    job_history = ledger.history(job_id)
    all_history = ledger.history()
    budget = ledger.total_epsilon_budget
    future_steps = steps * rounds_left

    def projected(sigma: float) -> tuple[float, float]:
        future = (sigma, sample_rate, future_steps)
        return (ledger.epsilon([*job_history, future]),
                ledger.epsilon([*all_history, future]))

    job_entries = [e for e in ledger.entries() if e.job_id == job_id and e.dp_enabled]
    if job_entries:
        previous = job_entries[-1].noise_multiplier
        job_eps, total_eps = projected(previous)
        if job_eps <= epsilon_per_job and total_eps <= budget:
            return RoundPlan(previous, sample_rate, steps, rounds_left, job_eps, total_eps,
                             epsilon_per_job, kept=True)
    try:
        sigma, _ = calibrate_noise(job_history, sample_rate, future_steps, epsilon_per_job,
                                   ledger.epsilon, tolerance)
        job_eps, total_eps = projected(sigma)
        if total_eps > budget:  # the lifetime budget binds before the job's
            sigma, _ = calibrate_noise(all_history, sample_rate, future_steps, budget,
                                       ledger.epsilon, tolerance)
            job_eps, total_eps = projected(sigma)
    except ValueError as exc:
        spent = ledger.spent()
        raise BudgetExceeded(spent, spent, min(epsilon_per_job, budget)) from exc
    return RoundPlan(sigma, sample_rate, steps, rounds_left, job_eps, total_eps,
                     epsilon_per_job, kept=False)
