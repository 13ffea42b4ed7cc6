"""The job's budget planner: each hospital's epsilon after the job's last round is at
or under the job's budget (and its ledger's), and within 5% of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fl_client.budget_planner import calibrate_noise, plan_round
from fl_client.privacy_ledger import BudgetExceeded, PrivacyLedger, compose_epsilon

DELTA = 1e-5


def ledger(tmp_path: Path, budget: float = 100.0, accountant: str = "prv") -> PrivacyLedger:
    return PrivacyLedger(tmp_path, "hospital_1", budget, DELTA, accountant=accountant)


def run_job(book: PrivacyLedger, job: str, sample_rate: float, steps: int, rounds: int,
            epsilon: float, retry_round: int = 0) -> list[float]:
    """Plan and record every round as the trainer does; a retried round trains twice."""
    sigmas = []
    for r in range(1, rounds + 1):
        for _ in range(2 if r == retry_round else 1):
            plan = plan_round(book, job, sample_rate, steps, rounds - r + 1, epsilon)
            book.record(job, r, plan.noise_multiplier, sample_rate, steps)
            sigmas.append(plan.noise_multiplier)
    return sigmas


@pytest.mark.parametrize(("sample_rate", "steps", "rounds", "epsilon"), [
    (1.0, 3, 10, 3.0),   # full-batch hospital, tabular task
    (0.5, 4, 3, 2.0),    # two batches an epoch, two epochs
    (0.1, 20, 2, 8.0),   # a larger hospital, the image tasks' budget
])
def test_job_lands_at_or_under_and_within_5_percent(tmp_path: Path, sample_rate: float,
                                                    steps: int, rounds: int,
                                                    epsilon: float) -> None:
    book = ledger(tmp_path)
    sigmas = run_job(book, "job", sample_rate, steps, rounds, epsilon)
    assert 0.95 * epsilon <= book.spent() <= epsilon
    assert len(set(sigmas)) == 1  # followed plan: one mechanism, cheap to compose


def test_a_retried_round_is_absorbed_by_the_rounds_left(tmp_path: Path) -> None:
    book = ledger(tmp_path)
    sigmas = run_job(book, "job", 1.0, 4, 4, 3.0, retry_round=2)
    assert book.spent() <= 3.0
    assert sigmas[-1] > sigmas[0]  # the extra spend is paid for with more noise later


def test_the_ledger_budget_binds_before_the_job_budget(tmp_path: Path) -> None:
    book = ledger(tmp_path, budget=4.0)
    run_job(book, "first", 1.0, 3, 3, 3.0)
    run_job(book, "second", 1.0, 3, 3, 3.0)
    assert book.epsilon(book.history("second")) <= 3.0
    assert 0.95 * 4.0 <= book.spent() <= 4.0


def test_a_spent_job_is_refused_before_training(tmp_path: Path) -> None:
    book = ledger(tmp_path)
    book.record("job", 1, 0.8, 1.0, 10)  # far over 1.0 already
    with pytest.raises(BudgetExceeded):
        plan_round(book, "job", 1.0, 3, 2, 1.0)


def test_empty_history_agrees_with_opacus_get_noise_multiplier() -> None:
    """With nothing spent, the search is Opacus's get_noise_multiplier (same answer
    to its tolerance): q = 1 keeps Opacus's side cheap."""
    sigma, eps = calibrate_noise([], 1.0, 30, 3.0,
                                 lambda h: compose_epsilon(h, DELTA, "rdp"), tolerance=0.001)
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=1.0,
                                  steps=30, accountant="rdp", epsilon_tolerance=0.003)
    assert sigma == pytest.approx(theirs, rel=0.01)
    assert 0.997 * 3.0 <= eps <= 3.0


@pytest.mark.parametrize("bad", [
    {"rounds_left": 0}, {"epsilon_per_job": 0.0}, {"epsilon_per_job": float("nan")},
    {"sample_rate": 1.5}, {"steps": 0},
])
def test_bad_arguments_are_refused(tmp_path: Path, bad: dict[str, float]) -> None:
    args = {"sample_rate": 0.5, "steps": 4, "rounds_left": 3, "epsilon_per_job": 3.0, **bad}
    with pytest.raises((ValueError, BudgetExceeded)):
        plan_round(ledger(tmp_path), "job", **args)  # type: ignore[arg-type]


def test_the_trainer_plans_and_a_hospitals_larger_noise_wins(tmp_path: Path) -> None:
    """local_training's hook: the plan's noise, or the hospital's own when larger."""
    from fl_client.local_training import RoundSettings, _planned, resolve_settings
    from fl_models.registry import get_task
    from fl_proto import coordinator_pb2 as cpb

    task = get_task("breast_cancer")
    book = ledger(tmp_path)

    def settings(noise: float) -> RoundSettings:
        config = cpb.TrainConfig(privacy=cpb.PrivacyConfig(
            enabled=True, epsilon_per_job=3.0, total_rounds=4, noise_multiplier=noise))
        return resolve_settings(task, config)

    planned = _planned(settings(0.0), book, "job", 1, 1)
    expected = plan_round(book, "job", 1.0, task.hyperparams.local_epochs, 4, 3.0)
    assert planned.noise_multiplier == expected.noise_multiplier
    assert _planned(settings(50.0), book, "job", 1, 1).noise_multiplier == 50.0
    assert _planned(settings(0.5), book, "job", 1, 1).noise_multiplier \
        == expected.noise_multiplier
