"""The hospital's task policy (fl_client/task_policy.py): what it refuses, what it
overrides, and which evaluations it answers (issue 11 items 6 and 7)."""

from __future__ import annotations

import math

import pytest
import torch

from fl_client.task_policy import (
    EvaluationPolicy,
    LocalPolicy,
    TaskRefused,
    check_global_model,
    model_id,
    noisy_accuracy,
    round_metrics,
    training_config,
)
from fl_proto import coordinator_pb2 as cpb
from fl_proto import tensors_pb2 as tpb

OWN_DELTA = 1e-5


def task_config(**privacy: float) -> cpb.TrainConfig:
    p = cpb.PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0)
    for key, value in privacy.items():
        setattr(p, key, value)
    return cpb.TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.01, privacy=p)


@pytest.mark.parametrize("field,value", [
    ("max_grad_norm", math.inf), ("max_grad_norm", math.nan), ("max_grad_norm", -1.0),
    ("delta", math.nan), ("delta", 1.0), ("delta", -0.1),
    ("noise_multiplier", math.inf), ("target_epsilon", -3.0),
])
def test_malformed_privacy_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(TaskRefused, match=field):
        training_config(task_config(**{field: value}), LocalPolicy(OWN_DELTA), 1.0)


def test_malformed_training_settings_are_refused() -> None:
    config = task_config()
    config.learning_rate = math.nan
    with pytest.raises(TaskRefused, match="learning_rate"):
        training_config(config, LocalPolicy(OWN_DELTA), 1.0)
    config = task_config()
    config.local_epochs = 10**6
    with pytest.raises(TaskRefused, match="epochs"):
        training_config(config, LocalPolicy(OWN_DELTA), 1.0)


def test_zero_clipping_norm_everywhere_is_refused() -> None:
    with pytest.raises(TaskRefused, match="clipping norm"):
        training_config(task_config(max_grad_norm=0.0), LocalPolicy(OWN_DELTA), 0.0)
    # a task default stands in for a norm the server left at 0
    assert training_config(task_config(max_grad_norm=0.0), LocalPolicy(OWN_DELTA), 1.5)


def test_the_hospitals_own_delta_wins() -> None:
    config = training_config(task_config(delta=0.5), LocalPolicy(OWN_DELTA), 1.0)
    assert config.privacy.delta == OWN_DELTA
    config = training_config(task_config(delta=1e-9), LocalPolicy(OWN_DELTA), 1.0)
    assert config.privacy.delta == OWN_DELTA  # the ledger accounts at its own delta


def test_own_privacy_flags_override_the_server() -> None:
    policy = LocalPolicy(OWN_DELTA, noise_multiplier=2.0, max_grad_norm=0.5)
    config = training_config(task_config(target_epsilon=8.0, max_grad_norm=3.0), policy, 1.0)
    assert config.privacy.noise_multiplier == 2.0
    assert config.privacy.target_epsilon == 0.0
    assert config.privacy.max_grad_norm == 0.5


def test_no_dp_needs_the_hospitals_permission() -> None:
    config = task_config()
    config.privacy.enabled = False
    with pytest.raises(TaskRefused, match="without differential privacy"):
        training_config(config, LocalPolicy(OWN_DELTA), 1.0)
    assert training_config(config, LocalPolicy(OWN_DELTA, allow_no_dp=True), 1.0)


def test_non_finite_global_model_is_refused() -> None:
    good = {"w": torch.zeros(3), "steps": torch.tensor([5])}
    check_global_model(good)
    with pytest.raises(TaskRefused, match="'w'"):
        check_global_model({"w": torch.tensor([0.0, math.nan]), "steps": torch.tensor([5])})


def test_metrics_are_rounded_and_accounting_is_not() -> None:
    out = round_metrics({"accuracy": 0.123456, "train_loss": 1.98765,
                         "epsilon_total": 1.23456789, "dp_enabled": 1.0})
    assert out == {"accuracy": 0.123, "train_loss": 1.988, "epsilon_total": 1.23456789,
                   "dp_enabled": 1.0}


def test_noisy_accuracy_stays_a_probability() -> None:
    gen = torch.Generator().manual_seed(1)
    values = [noisy_accuracy(0.99, 20, 5.0, gen) for _ in range(200)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert len(set(values)) > 100  # noisy, not a constant


def test_only_distributed_models_are_evaluated() -> None:
    policy = EvaluationPolicy(max_per_job=10, min_examples=20)
    with pytest.raises(TaskRefused, match="not one this job has distributed"):
        policy.admit("job", 1, "crafted", 50)  # no TRAIN yet
    assert policy.trained("job", 1, "m0") is None
    policy.admit("job", 1, "m1", 50)  # round 1's new aggregate
    with pytest.raises(TaskRefused, match="not one this job has distributed"):
        policy.admit("job", 1, "probe", 50)  # a second unseen model before the next TRAIN
    policy.admit("job", 1, "m0", 50)  # a model it trained on is fine
    assert policy.trained("job", 2, "m1") is None  # round 2 distributes what was evaluated
    policy.admit("job", 2, "m2", 50)
    # a hospital not selected for round 3 cannot check round 2's aggregate: no alarm
    assert policy.trained("job", 4, "m3") is None


def test_models_named_in_two_digest_algorithms_are_not_compared() -> None:
    """After a server restart into another version mid-job, round r's evaluated model
    and round r+1's TRAIN model come named in different algorithms: the same model
    would look like another one, so the policy cannot judge, as for a hospital not
    selected; within one algorithm a different model still stops evaluations."""
    policy = EvaluationPolicy(max_per_job=10, min_examples=20)
    sha = tpb.TensorManifest(sha256=b"\x01" * 32)
    fast = tpb.TensorManifest(sha256=b"\x02" * 32, digest=tpb.BLAKE3)
    assert model_id(sha) == "SHA-256:" + "01" * 32 and model_id(fast).startswith("BLAKE3:")
    policy.trained("job", 1, model_id(sha))
    policy.admit("job", 1, "SHA-256:" + "aa" * 32, 50)  # round 1's new aggregate
    assert policy.trained("job", 2, model_id(fast)) is None
    policy.admit("job", 2, model_id(fast), 50)
    policy.admit("job", 2, "BLAKE3:" + "bb" * 32, 50)  # round 2's new aggregate
    assert policy.trained("job", 3, "BLAKE3:" + "cc" * 32)  # same algorithm: distrust


def test_a_server_that_evaluates_what_it_never_distributes_loses_evaluations() -> None:
    policy = EvaluationPolicy(max_per_job=10, min_examples=20)
    policy.trained("job", 1, "m0")
    policy.admit("job", 1, "threshold-model", 50)
    warning = policy.trained("job", 2, "m1")
    assert warning and "threshold-model"[:16] in warning
    with pytest.raises(TaskRefused, match="no more evaluations"):
        policy.admit("job", 2, "m1", 50)
    policy.trained("other-job", 1, "x")
    policy.admit("other-job", 1, "x", 50)  # another job is judged on its own


def test_evaluation_cap_and_small_test_split() -> None:
    policy = EvaluationPolicy(max_per_job=2, min_examples=20)
    policy.trained("job", 1, "m0")
    with pytest.raises(TaskRefused, match="withheld"):
        policy.admit("job", 1, "m0", 19)
    policy.admit("job", 1, "m0", 20)
    policy.admit("job", 1, "m0", 20)
    with pytest.raises(TaskRefused, match="at most 2"):
        policy.admit("job", 1, "m0", 20)
