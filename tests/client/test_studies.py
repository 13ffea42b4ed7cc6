"""A hospital's job policy (fl_client/studies.py): each rule refuses with its reason,
a task that passes them all is let through, and a malformed [studies.X] table is a
clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_client.client import build_parser
from fl_client.config import ConfigError, load_toml
from fl_client.privacy_ledger import compose_epsilon
from fl_client.studies import JobPolicy, StudyConfigError, check_job, job_epsilon, parse_studies
from fl_client.task_policy import TaskRefused
from fl_proto import coordinator_pb2 as cpb


def epsilon_of(history: list[tuple[float, float, int]]) -> float:
    return compose_epsilon(history, 1e-5, "prv")


def task(strategy: str = "fedavg", secure: bool = False, epsilon: float = 3.0,
         job_id: str = "job-1", sha: str = "ab" * 32, rounds: int = 5,
         kind: cpb.TaskKind = cpb.TRAIN) -> tuple[cpb.Task, cpb.TrainConfig]:
    config = cpb.TrainConfig(strategy=strategy, job_sha256=sha, job_rounds=rounds,
                             secure_aggregation=secure, local_epochs=1, batch_size=64,
                             privacy=cpb.PrivacyConfig(enabled=True, epsilon_per_job=epsilon,
                                                       total_rounds=rounds, delta=1e-5))
    return cpb.Task(task_id="t", kind=kind, job_id=job_id, round=1, config=config), config


def check(policy: JobPolicy, spent: float = 0.0, **kw: object) -> None:
    t, config = task(**kw)  # type: ignore[arg-type]
    check_job(t, config, policy, spent, 500, epsilon_of)


def test_a_job_within_every_rule_passes() -> None:
    check(JobPolicy(("fedavg",), 3.0, True, ("job-1",)), secure=True)
    check(JobPolicy())  # no policy: any job (the total budget is the ledger's)


@pytest.mark.parametrize(("policy", "kw", "why"), [
    (JobPolicy(accept_strategies=("fedavg", "fedprox")), {"strategy": "krum"},
     "aggregates with krum; this hospital accepts fedavg, fedprox"),
    (JobPolicy(max_epsilon_per_job=2.0), {"epsilon": 3.0},
     "would cost epsilon 3, over this hospital's limit of 2 per job"),
    (JobPolicy(require_secure_aggregation=True), {"secure": False},
     "requires secure aggregation"),
    (JobPolicy(allowed_jobs=("job-2", "cd" * 32)), {"job_id": "job-1"},
     "is not in this hospital's allowed_jobs"),
])
def test_each_rule_refuses_with_its_reason(policy: JobPolicy, kw: dict[str, object],
                                           why: str) -> None:
    with pytest.raises(TaskRefused, match=why):
        check(policy, **kw)


def test_the_allow_list_takes_a_job_file_hash_as_well_as_an_id() -> None:
    check(JobPolicy(allowed_jobs=("ef" * 32,)), job_id="job-9", sha="ef" * 32)


def test_the_per_job_limit_counts_what_the_job_already_cost() -> None:
    with pytest.raises(TaskRefused, match="has spent epsilon 2.5 on job job-1"):
        check(JobPolicy(max_epsilon_per_job=2.5), spent=2.5, epsilon=2.0)


def test_a_fixed_noise_job_is_costed_by_the_accountant_over_its_rounds() -> None:
    _, config = task(epsilon=0.0, rounds=10)
    config.privacy.noise_multiplier = 1.0
    config.privacy.total_rounds = 0
    one_round = epsilon_of([(1.0, 64 / 500, round(500 / 64))])
    whole = job_epsilon(config, 500, epsilon_of)
    assert whole is not None and whole > one_round
    assert whole == pytest.approx(epsilon_of([(1.0, 64 / 500, round(500 / 64) * 10)]))
    config.privacy.noise_multiplier = 0.0
    config.job_rounds = 0
    assert job_epsilon(config, 500, epsilon_of) is None  # says nothing: refused under a limit


def test_studies_tables_are_read_from_the_site_config(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('client_id = "h1"\n[studies.ecg]\ndata_path = "/d/ecg"\n'
                    'accept_strategies = ["fedavg"]\nmax_epsilon_per_job = 2\n'
                    '[studies.symptom]\ndata_path = "/d/sy"\nrequire_secure_aggregation = true\n')
    values = load_toml(site, build_parser())
    studies = values["studies"]
    assert studies["ecg"] == (Path("/d/ecg"), JobPolicy(("fedavg",), 2.0, False, ()))
    assert studies["symptom"][1].require_secure_aggregation


@pytest.mark.parametrize(("body", "why"), [
    ({"ecg": {}}, "needs data_path"),
    ({"ecg": {"data_path": "/d", "max_epsilon_per_jobb": 2}}, "unknown keys: max_epsilon"),
    ({"ecg": {"data_path": "/d", "max_epsilon_per_job": -1}}, "must be a number >= 0"),
    ({"ecg": {"data_path": "/d", "accept_strategies": "fedavg"}}, "must be a list"),
    ({"ecg": {"data_path": "/d", "require_secure_aggregation": "yes"}}, "true or false"),
])
def test_a_malformed_study_names_the_key(body: dict[str, object], why: str) -> None:
    with pytest.raises(StudyConfigError, match=why):
        parse_studies(body, "site.toml")


def test_a_bad_study_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[studies.ecg]\nmax_epsilon_per_job = 2\n')
    with pytest.raises(ConfigError, match="needs data_path"):
        load_toml(site, build_parser())
