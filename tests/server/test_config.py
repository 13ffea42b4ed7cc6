"""The server's configuration: defaults, TOML, flags; strict types; a frozen job."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fl_core.constants import DEFAULT_EPSILON_PER_HOSPITAL
from fl_models.registry import get_task
from fl_server.config import (
    JOB_FIELDS,
    ConfigError,
    ServerConfig,
    build_config,
    collect_values,
    config_from,
    restore_job,
    settle_job,
)
from fl_server.server import _explicit, build_parser, train_config


def parse(argv: list[str]) -> ServerConfig:
    args = build_parser().parse_args(argv)
    args.strategy_params = {}
    return build_config(args, _explicit(argv))


def values_of(argv: list[str]) -> dict[str, object]:
    args = build_parser().parse_args(argv)
    args.strategy_params = {}
    return collect_values(args, _explicit(argv))


def test_flags_win_over_the_file_which_wins_over_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('rounds = 7\nquorum = 0.75\nround_deadline_s = 30\nstate_dir = "st"\n')
    cfg = parse(["--config", str(toml), "--rounds", "9"])
    assert (cfg.rounds, cfg.quorum, cfg.state_dir) == (9, 0.75, Path("st"))
    # a TOML integer is a fine float setting (300 means 300.0), and stays a float
    assert cfg.round_deadline_s == 30.0 and isinstance(cfg.round_deadline_s, float)
    assert cfg.min_clients == ServerConfig().min_clients
    # only what the operator gave is "given" (it decides what a resumed job compares)
    assert set(values_of(["--config", str(toml), "--seed", "3"])) == {
        "rounds", "quorum", "round_deadline_s", "state_dir", "seed"}


@pytest.mark.parametrize("toml, message", [
    ("rounds = true\n", "rounds must be a whole number (got True)"),
    ("rounds = 1.99\n", "rounds must be a whole number (got 1.99)"),
    ('quorum = "0.5"\n', "quorum must be a number (got '0.5')"),
    ('no_dp = 1\n', "no_dp must be true or false"),
    ("model_type = 3\n", "model_type must be text"),
    ("strategy_params = 3\n", "strategy_params must be a table of numbers"),
    ("bogus = 1\n", "unknown keys: bogus"),
    ("rounds = \n", "not valid TOML"),
])
def test_toml_values_are_never_coerced(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match="config file") as err:
        parse(["--config", str(path)])
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--round_deadline_s", "inf"], "round_deadline_s must be a finite number"),
    (["--round_deadline_s", "nan"], "round_deadline_s must be a finite number"),
    (["--round_deadline_s", "1e300"], "round_deadline_s must be in (0, 2.592e+06]"),
    (["--eval_deadline_s", "inf"], "eval_deadline_s must be a finite number"),
    (["--wait_for_clients_s", "nan"], "wait_for_clients_s must be a finite number"),
    (["--max_round_attempts", "0"], "max_round_attempts must be in [1, 1000]"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number"),
    (["--delta", "nan"], "delta must be a finite number"),
    (["--delta", "0.5"], "delta must be in [0, 0.1]"),
    (["--noise_multiplier", "-1"], "noise_multiplier must be in [0, 10000]"),
    (["--fraction", "0"], "fraction must be in (0, 1]"),
    (["--quorum", "1.5"], "quorum must be in (0, 1]"),
    (["--rounds", "0"], "rounds must be in [1, 1e+06]"),
    (["--port", "70000"], "port must be in [0, 65535]"),
    (["--max_workers", "2"], "max_workers must be in [8, 100000]"),
])
def test_every_number_is_finite_and_in_range(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(argv)
    assert message in str(err.value)


def test_all_problems_are_named_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse(["--rounds", "0", "--quorum", "2"])
    assert "rounds must" in str(err.value) and "quorum must" in str(err.value)


def test_a_job_is_settled_against_its_task_once() -> None:
    cfg = ServerConfig(model_type="breast_cancer")
    hp = get_task("breast_cancer").hyperparams
    settle_job(cfg, hp)
    assert (cfg.local_epochs, cfg.batch_size) == (hp.local_epochs, hp.batch_size)
    assert (cfg.learning_rate, cfg.delta, cfg.max_grad_norm) == (
        hp.learning_rate, hp.delta, hp.max_grad_norm)
    # by default a budget for the whole job drives the noise (each hospital plans it)
    assert (cfg.epsilon_per_hospital, cfg.noise_multiplier) == (DEFAULT_EPSILON_PER_HOSPITAL,
                                                                0.0)
    # an epsilon per round or a noise multiplier asked for fixes the noise instead
    by_epsilon = ServerConfig(target_epsilon=2.0)
    settle_job(by_epsilon, hp)
    assert (by_epsilon.noise_multiplier, by_epsilon.epsilon_per_hospital) == (0.0, 0.0)
    by_noise = ServerConfig(noise_multiplier=1.5)
    settle_job(by_noise, hp)
    assert (by_noise.noise_multiplier, by_noise.epsilon_per_hospital) == (1.5, 0.0)
    no_dp = ServerConfig(no_dp=True)
    settle_job(no_dp, hp)
    assert no_dp.epsilon_per_hospital == 0.0
    budget = ServerConfig(epsilon_per_hospital=1.0, rounds=4)
    settle_job(budget, hp)
    privacy = train_config(budget, get_task("breast_cancer"), {}).privacy
    assert (privacy.epsilon_per_job, privacy.total_rounds, privacy.noise_multiplier) == (
        1.0, 4, 0.0)
    assert set(cfg.job_dict()) == set(JOB_FIELDS)
    assert "keys_dir" not in cfg.job_dict() and "port" not in cfg.job_dict()


def test_a_resumed_job_restores_everything_and_refuses_a_change() -> None:
    stored = ServerConfig(rounds=8, strategy="fedprox", strategy_params={"mu": 0.1},
                          noise_multiplier=1.3, local_epochs=2, seed=5).job_dict()
    cfg = config_from({"port": 0})  # the operator gave only a port
    restore_job(cfg, stored, {"port"}, "job-1")
    assert (cfg.rounds, cfg.strategy, cfg.strategy_params) == (8, "fedprox", {"mu": 0.1})
    assert (cfg.noise_multiplier, cfg.local_epochs, cfg.seed) == (1.3, 2, 5)
    same = config_from({"rounds": 8, "strategy": "fedprox"})
    restore_job(same, stored, {"rounds", "strategy"}, "job-1")  # equal values pass
    changed = config_from({"rounds": 9, "noise_multiplier": 2.0, "local_epochs": 0})
    with pytest.raises(ConfigError) as err:
        restore_job(changed, stored, {"rounds", "noise_multiplier", "local_epochs"}, "job-1")
    text = str(err.value)
    assert "job job-1 is running with other settings" in text and "--new_job" in text
    assert "rounds=9 (the job has 8)" in text and "noise_multiplier=2 (the job has 1.3)" in text
    assert "local_epochs" not in text  # 0 means "the task's default": not a change


def test_a_stored_job_with_a_bad_value_is_an_error_not_a_coercion() -> None:
    stored = ServerConfig().job_dict()
    stored["rounds"] = 2.5
    with pytest.raises(ConfigError, match="job job-9: rounds must be a whole number"):
        restore_job(ServerConfig(), stored, set(), "job-9")
    stored = ServerConfig().job_dict()
    stored["quorum"] = math.inf
    with pytest.raises(ConfigError, match="quorum must be a finite number"):
        restore_job(ServerConfig(), stored, set(), "job-9")


def test_dp_fedavg_accounts_at_the_rate_hospitals_are_sampled() -> None:
    """The central epsilon composes a mechanism on a sample of hospitals: without an
    explicit sample_rate, the job's --fraction is that rate (and the strategy uses it)."""
    from fl_server.strategies import make_strategy

    hp = get_task("breast_cancer").hyperparams
    sampled = ServerConfig(strategy="dp_fedavg", fraction=0.25)
    settle_job(sampled, hp)
    assert sampled.strategy_params["sample_rate"] == 0.25
    strategy = make_strategy(sampled.strategy, **sampled.strategy_params)
    assert strategy.sample_rate == 0.25  # type: ignore[attr-defined]
    stated = ServerConfig(strategy="dp_fedavg", fraction=0.25,
                          strategy_params={"sample_rate": 0.5})
    settle_job(stated, hp)
    assert stated.strategy_params["sample_rate"] == 0.5
    other = ServerConfig(strategy="fedavg", fraction=0.25)
    settle_job(other, hp)
    assert "sample_rate" not in other.strategy_params
