"""Hostile or mistaken operator input at start: bad flags and config files, missing,
damaged or mismatched key files, and a damaged checkpoint or SQLite file. Each must
end in a clear one-line `fl-server: error: ...` on stderr and a non-zero exit, never
a bare traceback, never a server that starts anyway, and never a state directory
that was reset or rewritten. After the damage is repaired, the same job resumes.

The failing starts are independent, so they run concurrently (a few at a time) in
one module fixture; each case is then its own test."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fl_core.statelock import LOCK_NAME
from fl_demo.launcher import Federation, make_pki
from fl_server.pki import generate_keys
from tests.hostile.kit import (
    ScriptedClient,
    checkpoint_sha,
    env_with_repo,
    read_jobs,
    read_rounds,
    scripted_clients,
    site_identity,
    wait_for,
)

pytestmark = pytest.mark.slow

BASE_FLAGS = ["--rounds", "50", "--min_clients", "1", "--no_fed_eval", "--seed", "5",
              "--round_deadline_s", "20", "--wait_for_clients_s", "600"]


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    args: list[str]
    expect: str                                   # must appear in the error line
    damage: Callable[[Path], None] = lambda d: None
    fresh_state: bool = False                     # start from an empty state dir
    args_of: Callable[[Path], list[str]] | None = None


@dataclass
class Outcome:
    rc: int | None
    stderr: str
    started: bool
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    jobs_before: list[tuple[str, str]] = field(default_factory=list)
    jobs_after: list[tuple[str, str]] = field(default_factory=list)


def latest_checkpoint(d: Path) -> Path:
    ckpts = sorted((d / "server_state" / "checkpoints").glob("*/round_*.safetensors"))
    return ckpts[-1]


def flip_bytes(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write(path: Path, text: str) -> None:
    path.write_text(text)


def replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def other_ca_crl(d: Path) -> None:
    other = d / "other-keys"
    generate_keys(other)
    shutil.copyfile(other / "crl.pem", d / "keys" / "crl.pem")


def other_server_cert(d: Path) -> None:
    other = d / "other-keys"
    generate_keys(other)
    shutil.copyfile(other / "server.crt", d / "keys" / "server.crt")
    shutil.copyfile(other / "server.key", d / "keys" / "server.key")


def swap_checkpoint(d: Path) -> None:
    ckpts = sorted((d / "server_state" / "checkpoints").glob("*/round_*.safetensors"))
    shutil.copyfile(ckpts[-2], ckpts[-1])  # the previous round's file under the latest name


def garbage_db(d: Path) -> None:
    db = d / "server_state" / "server.db"
    data = bytearray(db.read_bytes())
    data[:100] = b"\x00NOT SQLITE" * 9 + b"\x00"
    db.write_bytes(bytes(data))


def truncate_db(d: Path) -> None:
    db = d / "server_state" / "server.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def state_dir_is_a_file(d: Path) -> None:
    shutil.rmtree(d / "server_state")
    (d / "server_state").write_text("not a directory")


def occupied_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


HELD: list[socket.socket] = []


def port_in_use(_: Path) -> list[str]:
    sock, port = occupied_port()
    HELD.append(sock)
    return ["--port", str(port)]


SCENARIOS: dict[str, Scenario] = {
    # flags and config files (an empty state dir, so a wrongly accepted start shows)
    "rounds_zero": Scenario(["--rounds", "0"], "rounds must be in [1, 1e+06] (got 0)",
                            fresh_state=True),
    "port_out_of_range": Scenario(["--port", "70000"], "port must be in [0, 65535] (got 70000)",
                                  fresh_state=True),
    "fraction_above_one": Scenario(["--fraction", "1.5"], "fraction must be in",
                                   fresh_state=True),
    "negative_deadline": Scenario(["--round_deadline_s", "-1"],
                                  "round_deadline_s must be in (0, 2.592e+06] (got -1.0)",
                                  fresh_state=True),
    "rounds_not_a_number": Scenario(["--rounds", "many"], "invalid int value",
                                    fresh_state=True),
    "unknown_strategy": Scenario(["--strategy", "nosuch"], "invalid choice", fresh_state=True),
    "unknown_flag": Scenario(["--rounds_per_day", "3"], "unrecognized arguments",
                             fresh_state=True),
    "strategy_param_not_a_pair": Scenario(["--strategy_param", "beta"], "NAME=NUMBER",
                                          fresh_state=True),
    "strategy_param_unknown": Scenario(["--strategy_param", "beta=0.9"], "no parameter",
                                       fresh_state=True),
    "unknown_model_type": Scenario(["--model_type", "nosuch"], "unknown model type",
                                   fresh_state=True),
    "config_missing": Scenario(["--config", "nope.toml"], "does not exist", fresh_state=True),
    "config_not_toml": Scenario([], "not valid TOML", fresh_state=True,
                                damage=lambda d: write(d / "bad.toml", "rounds = = 3\n["),
                                args_of=lambda d: ["--config", str(d / "bad.toml")]),
    "config_unknown_key": Scenario([], "unknown keys: colour", fresh_state=True,
                                   damage=lambda d: write(d / "c.toml", 'colour = "red"\n'),
                                   args_of=lambda d: ["--config", str(d / "c.toml")]),
    "config_wrong_type": Scenario([], "fraction", fresh_state=True,
                                  damage=lambda d: write(d / "t.toml", 'fraction = "most"\n'),
                                  args_of=lambda d: ["--config", str(d / "t.toml")]),
    "port_in_use": Scenario([], "cannot listen", args_of=port_in_use),
    # key files
    "keys_dir_missing": Scenario([], "does not exist",
                                 damage=lambda d: shutil.rmtree(d / "keys")),
    "server_key_missing": Scenario([], "server private key",
                                   damage=lambda d: (d / "keys" / "server.key").unlink()),
    "server_key_not_pem": Scenario([], "not an unencrypted PEM private key",
                                   damage=lambda d: write(d / "keys" / "server.key", "junk\n")),
    "server_key_unreadable": Scenario([], "cannot read",
                                      damage=lambda d: replace_with_dir(d / "keys" /
                                                                        "server.key")),
    "server_pair_of_another_ca": Scenario([], "was not signed by the CA",
                                          damage=other_server_cert),
    "ca_cert_missing": Scenario([], "CA certificate",
                                damage=lambda d: (d / "keys" / "ca.crt").unlink()),
    "crl_not_pem": Scenario([], "not a PEM certificate revocation list",
                            damage=lambda d: write(d / "keys" / "crl.pem", "junk\n")),
    "crl_of_another_ca": Scenario([], "by the CA", damage=other_ca_crl),
    "jwt_active_missing": Scenario([], "active token key id",
                                   damage=lambda d: (d / "keys" / "jwt" / "active").unlink()),
    "jwt_active_names_nothing": Scenario([], "token key",
                                         damage=lambda d: write(d / "keys" / "jwt" / "active",
                                                                "NoSuchKid\n")),
    # state
    "checkpoint_bytes_flipped": Scenario([], "is not valid: model sha256 ",
                                         damage=lambda d: flip_bytes(latest_checkpoint(d), -9)),
    "checkpoint_truncated": Scenario([], "cannot be read",
                                     damage=lambda d: latest_checkpoint(d).write_bytes(
                                         latest_checkpoint(d).read_bytes()[:200])),
    "checkpoint_missing": Scenario([], "refusing to start the job over",
                                   damage=lambda d: latest_checkpoint(d).unlink()),
    "checkpoint_of_another_round": Scenario([], "is not valid", damage=swap_checkpoint),
    "sqlite_garbage": Scenario([], "not a SQLite database", damage=garbage_db),
    "sqlite_truncated": Scenario([], "corrupt", damage=truncate_db),
    "state_dir_is_a_file": Scenario([], "is not a directory", damage=state_dir_is_a_file),
    "unfinished_job_of_another_model": Scenario(["--model_type", "symptom"],
                                                "pass --new_job"),
}


def files_digest(state: Path) -> dict[str, str]:
    if not state.is_dir():
        return {"<file>": hashlib.sha256(state.read_bytes()).hexdigest()} if state.exists() \
            else {}
    out = {}
    for path in sorted(state.rglob("*")):
        # the lock file holds the pid of whoever last held the folder: not state
        if path.is_file() and not path.name.endswith(("-wal", "-shm")) \
                and "spool" not in path.parts and path.name != LOCK_NAME:
            out[str(path.relative_to(state))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def jobs_of(state: Path) -> list[tuple[str, str]]:
    try:
        return read_jobs(state)
    except Exception as exc:  # a damaged database is part of some scenarios
        return [("<unreadable>", type(exc).__name__)]


def start_expecting_failure(workdir: Path, args: list[str], timeout_s: float = 60
                            ) -> tuple[int | None, str, bool]:
    """Run the server CLI; (exit code, stderr, started). A server that becomes ready
    is a failure of the test, and is stopped at once."""
    ready = workdir / "ready.json"
    err = workdir / "stderr.txt"
    with err.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fl_server.server", "--host", "127.0.0.1",
             "--ready_file", str(ready), *args],
            stdout=subprocess.DEVNULL, stderr=fh, cwd=workdir, env=env_with_repo())
        started = False
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if ready.exists():
                    started = True
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    return (None if started else proc.returncode), err.read_text(errors="replace"), started


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys and a state dir holding an unfinished job with a few completed rounds,
    made by the real server and a scripted hospital, then stopped with SIGTERM."""
    work = tmp_path_factory.mktemp("operator-base")
    make_pki(work, ["hospital_1"])
    fed = Federation(work, [], "breast_cancer")
    try:
        port = fed.start_server(BASE_FLAGS)
        client = ScriptedClient(lambda: port, site_identity(work, "hospital_1"),
                                "hospital_1", 0)
        with scripted_clients([client]):
            wait_for(lambda: len(read_rounds(work / "server_state")) >= 3, 60,
                     "three completed rounds")
    finally:
        fed.stop_all()
    assert fed.server is not None and fed.server.returncode == 0, fed.tail("server.log")
    return work


@pytest.fixture(scope="module")
def outcomes(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        dict[str, Outcome]]:
    """Every scenario's start, each in its own process, forked by start_driver."""
    root = tmp_path_factory.mktemp("operator")
    starts: list[dict[str, object]] = []
    states: dict[str, Path] = {}
    before: dict[str, tuple[dict[str, str], list[tuple[str, str]]]] = {}
    try:
        for name, scenario in SCENARIOS.items():
            d = root / name
            d.mkdir()
            shutil.copytree(base / "keys", d / "keys")
            if not scenario.fresh_state:
                shutil.copytree(base / "server_state", d / "server_state")
            scenario.damage(d)
            state = states[name] = d / "server_state"
            before[name] = (files_digest(state), jobs_of(state))
            argv = ["--host", "127.0.0.1", "--keys_dir", str(d / "keys"),
                    "--state_dir", str(state), "--port", "0", "--ready_file",
                    str(d / "ready.json"), *BASE_FLAGS, *scenario.args,
                    *(scenario.args_of(d) if scenario.args_of else [])]
            starts.append({"argv": argv, "cwd": str(d), "stderr": str(d / "stderr.txt"),
                           "ready": str(d / "ready.json")})
        plan, results = root / "plan.json", root / "results.json"
        plan.write_text(json.dumps({"starts": starts, "parallel": 4, "timeout_s": 60}))
        subprocess.run([sys.executable, "-m", "tests.hostile.start_driver", str(plan),
                        str(results)], check=True, timeout=300, env=env_with_repo(),
                       cwd=str(Path(__file__).resolve().parents[2]))
        out: dict[str, Outcome] = {}
        for (name, state), result in zip(states.items(), json.loads(results.read_text()),
                                         strict=True):
            stderr = (root / name / "stderr.txt").read_text(errors="replace")
            out[name] = Outcome(result.get("rc"), stderr, bool(result.get("started")),
                                *before[name][:1], files_digest(state), before[name][1],
                                jobs_of(state))
        yield out
    finally:
        for sock in HELD:
            sock.close()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bad_start_is_a_clear_error(outcomes: dict[str, Outcome], name: str) -> None:
    out = outcomes[name]
    assert not out.started, f"{name}: the server started anyway"
    assert out.rc is not None and out.rc != 0, (out.rc, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("fl-server: error:")]
    assert len(lines) == 1, out.stderr
    assert SCENARIOS[name].expect in lines[0], lines[0]
    # never a silently reset or rewritten job: the state is byte-for-byte what it was
    if SCENARIOS[name].fresh_state:
        # an empty state dir may be initialised (schema only), but no job is created
        assert not [job for job in out.jobs_after if not job[0].startswith("<")], out
    else:
        assert out.after == out.before, f"{name}: the state dir changed"
        assert out.jobs_after == out.jobs_before


def test_damaged_state_is_never_replaced_by_a_new_job(outcomes: dict[str, Outcome]) -> None:
    for name, scenario in SCENARIOS.items():
        if scenario.fresh_state or "sqlite" in name or name == "state_dir_is_a_file":
            continue
        jobs = outcomes[name].jobs_after
        assert len(jobs) == 1 and jobs[0][1] == "running", (name, jobs)


def test_repaired_checkpoint_resumes_the_same_job(base: Path, tmp_path: Path) -> None:
    """The damage is an operator's to repair (here: restore the file from a backup);
    the server then resumes the same job at the next round, with the model the last
    recorded round left."""
    work = tmp_path / "repaired"
    shutil.copytree(base, work, ignore=shutil.ignore_patterns("logs", "*.ready"))
    state = work / "server_state"
    latest = latest_checkpoint(work)
    backup = latest.read_bytes()
    flip_bytes(latest, -9)
    rc, stderr, started = start_expecting_failure(
        work, ["--keys_dir", str(work / "keys"), "--state_dir", str(state), "--port", "0",
               *BASE_FLAGS])
    job_id, job_state = read_jobs(state)[0]
    rounds = read_rounds(state, job_id)
    last = rounds[-1]
    assert not started and rc == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("fl-server: error:")]
    assert len(errors) == 1, stderr
    assert f"checkpoint {latest} is not valid: model sha256 " in errors[0], errors
    assert f" != recorded {last.model_sha256}" in errors[0], errors
    latest.write_bytes(backup)  # the operator restores the file
    assert checkpoint_sha(state, job_id, last.round) == last.model_sha256
    fed = Federation(work, [], "breast_cancer")
    try:
        port = fed.start_server(BASE_FLAGS)
        status = fed.status()
        assert (status.job_id, status.model_sha256) == (job_id, last.model_sha256)
        client = ScriptedClient(lambda: port, site_identity(work, "hospital_1"),
                                "hospital_1", 0)
        with scripted_clients([client]):
            wait_for(lambda: len(read_rounds(state, job_id)) > len(rounds), 60,
                     "the next round")
    finally:
        fed.stop_all()
    after = read_rounds(state, job_id)
    assert [r.round for r in after] == list(range(1, len(after) + 1))  # each round once
    assert after[len(rounds)].state == "completed"
    assert read_jobs(state) == [(job_id, "running")]
