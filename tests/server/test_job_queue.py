"""The job queue's pieces without a network: job files are checked like the server's
config (unknown key, wrong type, out of range, no model type: one clear error), the
store keeps queued jobs in submission order and finds the running one, and a version 1
database (before the queue) is migrated in place with its jobs intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fl_server.config import ConfigError, ServerConfig
from fl_server.jobs import job_config, job_info, parse_job_file
from fl_server.store import Store


def test_a_job_file_gives_the_jobs_settings_over_the_defaults_not_the_servers() -> None:
    base = ServerConfig(port=7000, rounds=9, strategy="fedprox", max_workers=64)
    values = parse_job_file('model_type = "ecg"\nrounds = 3\nepsilon_per_hospital = 2\n'
                            'secure_aggregation = true\njob_id = "ecg-1"\n'
                            '[strategy_params]\n')
    cfg = job_config(base, {k: v for k, v in values.items() if k != "job_id"})
    assert (cfg.model_type, cfg.rounds, cfg.epsilon_per_hospital) == ("ecg", 3, 2.0)
    assert cfg.secure_aggregation and cfg.strategy == "fedavg"  # the default, not the flag's
    assert (cfg.port, cfg.max_workers) == (7000, 64)  # how this process serves stays its own
    assert values["job_id"] == "ecg-1"


@pytest.mark.parametrize(("text", "why"), [
    ('rounds = 3\n', "must name its model_type"),
    ('model_type = "ecg"\nroundz = 3\n', "unknown keys: roundz"),
    ('model_type = "ecg"\nrounds = "3"\n', "rounds must be a whole number"),
    ('model_type = "ecg"\nrounds = 3.5\n', "rounds must be a whole number"),
    ('model_type = "ecg"\nhost = "0.0.0.0"\n', "unknown keys: host"),
    ('model_type = "ecg"\nrounds = 3\nrounds = 4\n', "not valid TOML"),
])
def test_a_bad_job_file_is_one_clear_error(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_job_file(text)


def test_out_of_range_values_are_refused_by_the_config_check() -> None:
    values = parse_job_file('model_type = "ecg"\nquorum = 1.5\n')
    with pytest.raises(ConfigError, match="quorum must be in"):
        job_config(ServerConfig(), values)


def test_the_store_queues_in_order_and_finds_the_running_job(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_job("a", "ecg", "fedavg", {}, 2, state="queued", job_sha256="1" * 64)
        store.create_job("b", "symptom", "fedavg", {}, 2, state="queued")
        assert store.running_job() is None
        assert store.next_queued().job_id == "a"  # type: ignore[union-attr]
        store.set_job_state("a", "running")
        assert store.running_job().job_id == "a"  # type: ignore[union-attr]
        assert [j.job_id for j in store.jobs(("queued",))] == ["b"]
        store.set_job_state("b", "aborted")
        assert store.next_queued() is None
        assert store.get_job("a").job_sha256 == "1" * 64  # type: ignore[union-attr]


def test_a_version_1_database_is_migrated_with_its_jobs(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_job("old", "breast_cancer", "fedavg", {"rounds": 3}, 3)
    db = sqlite3.connect(tmp_path / "server.db")
    db.execute("CREATE TABLE jobs_v1 AS SELECT job_id, model_type, strategy, config_json,"
               " total_rounds, state, created, initial_sha256, initial_checkpoint FROM jobs")
    db.execute("DROP TABLE jobs")
    db.execute("ALTER TABLE jobs_v1 RENAME TO jobs")
    db.execute("UPDATE schema_version SET version=1")
    db.commit()
    db.close()
    with Store(tmp_path) as store:
        job = store.running_job()
        assert job is not None and (job.job_id, job.total_rounds, job.job_sha256) == \
            ("old", 3, "")
        store.create_job("new", "ecg", "fedavg", {}, 1, state="queued", job_sha256="f" * 64)
        assert store.next_queued().job_sha256 == "f" * 64  # type: ignore[union-attr]


def test_a_job_that_left_the_queue_between_two_reads_is_listed_not_an_error(
        tmp_path: Path) -> None:
    """The admin calls read the queue and a job one after the other while the job manager
    runs: a job seen as queued but started (or queued after the snapshot) in between has no
    position, instead of failing the call (CI saw SubmitJob fail with UNKNOWN)."""
    with Store(tmp_path) as store:
        store.create_job("a", "ecg", "fedavg", {}, 2, state="queued")
        store.create_job("b", "ecg", "fedavg", {}, 2, state="queued")
        queued = store.jobs(("queued",))
        seen_as_queued = store.get_job("b")
        assert seen_as_queued is not None
        assert job_info(store, seen_as_queued, queued).queue_position == 2
        assert job_info(store, seen_as_queued, queued[:1]).queue_position == 0
        store.set_job_state("b", "running")
        now = store.get_job("b")
        assert now is not None and job_info(store, now, queued).state == "running"
