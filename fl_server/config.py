"""Server configuration: one dataclass filled from defaults, a TOML file, then flags.

Flags win over the file so an operator can keep a site config and still override
one value for a run. Every value is checked here, before any socket opens or any
state is touched: right type (a TOML `rounds = true` or `1.99` is an error, never
coerced), finite, and in range.

A *job* is settled once: when it is created, the job's fields (JOB_FIELDS) are
resolved against the task's defaults and stored; a restart restores them whole
before anything is built from them. An option the operator gives that differs
from the running job's stored value refuses the start (unless `--new_job`), so DP
settings, the strategy or the round count can never change in the middle of a job.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fl_core import constants as fc
from fl_core.constants import DEFAULT_EPSILON_PER_HOSPITAL, DEFAULT_PORT, UPDATE_NORM_FACTOR


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    keys_dir: Path = Path("keys")
    state_dir: Path = Path("server_state")
    model_type: str = "breast_cancer"
    rounds: int = 5
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = field(default_factory=dict)
    fraction: float = 1.0
    min_clients: int = 2
    quorum: float = 0.5
    round_deadline_s: float = 300.0
    wait_for_clients_s: float = 600.0
    max_round_attempts: int = 3
    update_norm_factor: float = UPDATE_NORM_FACTOR
    local_epochs: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    no_dp: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    max_grad_norm: float = 0.0
    # Each hospital's epsilon for the whole job (it plans its noise over the rounds);
    # 0: DEFAULT_EPSILON_PER_HOSPITAL unless a noise multiplier or an epsilon per round
    # was asked for instead.
    epsilon_per_hospital: float = 0.0
    eval_data: Path | None = None
    fed_eval: bool = True
    eval_deadline_s: float = 120.0
    seed: int = 0
    max_workers: int = 512
    torch_threads: int = 1
    job_id: str = ""
    # Secure aggregation (SecAgg+, issue 12): the server sees only the sum of updates.
    secure_aggregation: bool = False
    secagg_threshold: float = fc.SECAGG_DEFAULT_THRESHOLD
    secagg_bits: int = fc.SECAGG_DEFAULT_BITS
    secagg_clip: float = fc.SECAGG_DEFAULT_CLIP
    secagg_stage_timeout_s: float = fc.SECAGG_STAGE_TIMEOUT_S

    def validate(self) -> None:
        problems = [p for name, value in _values(self) if (p := _check(name, value))]
        problems += self._secagg_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _secagg_problems(self) -> list[str]:
        """What secure aggregation cannot run with (the strategy, too few hospitals)."""
        if not self.secure_aggregation:
            return []
        from fl_server.secagg_round import strategy_refusal

        refusal = strategy_refusal(self.strategy)
        problems = [refusal] if refusal else []
        if self.min_clients < 2:
            problems.append("secure aggregation needs min_clients >= 2")
        return problems

    def as_json_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        return out

    def job_dict(self) -> dict[str, Any]:
        """The job's own settings, as stored with the job (JSON-ready)."""
        every = self.as_json_dict()
        return {name: every[name] for name in JOB_FIELDS}


# What defines a job (stored with it, frozen for its life) as opposed to how this
# process serves it (address, keys, threads), which may change across restarts.
JOB_FIELDS = (
    "model_type", "rounds", "strategy", "strategy_params", "fraction", "min_clients",
    "quorum", "round_deadline_s", "wait_for_clients_s", "max_round_attempts",
    "local_epochs", "batch_size", "learning_rate", "no_dp", "noise_multiplier",
    "target_epsilon", "delta", "max_grad_norm", "epsilon_per_hospital", "fed_eval",
    "eval_deadline_s", "seed", "update_norm_factor",
    "secure_aggregation", "secagg_threshold", "secagg_bits", "secagg_clip",
)

_FIELD_TYPES = {f.name: f.type for f in fields(ServerConfig)}
_DEFAULTS = ServerConfig()

DAY_S = 86_400.0
# name -> (low, high, low inclusive); every number must also be finite.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "port": (0, 65535, True),
    "rounds": (1, 1_000_000, True),
    "fraction": (0.0, 1.0, False),
    "min_clients": (1, 100_000, True),
    "quorum": (0.0, 1.0, False),
    "round_deadline_s": (0.0, 30 * DAY_S, False),
    "wait_for_clients_s": (0.0, 365 * DAY_S, False),
    "eval_deadline_s": (0.0, 30 * DAY_S, False),
    "max_round_attempts": (1, 1000, True),
    "update_norm_factor": (0.0, 1e12, True),
    "local_epochs": (0, 10_000, True),
    "batch_size": (0, 10_000_000, True),
    "learning_rate": (0.0, 100.0, True),
    "noise_multiplier": (0.0, 1e4, True),
    "target_epsilon": (0.0, 1e4, True),
    "delta": (0.0, 0.1, True),
    "max_grad_norm": (0.0, 1e6, True),
    "epsilon_per_hospital": (0.0, 1e4, True),
    "seed": (0, 2**63 - 1, True),
    "max_workers": (8, 100_000, True),
    "torch_threads": (1, 1024, True),
    # hospitals refuse a threshold that lets fewer than half of a secret's holders rebuild it
    "secagg_threshold": (0.5, 0.99, True),
    "secagg_bits": (fc.SECAGG_MIN_BITS, fc.SECAGG_MAX_BITS, True),
    "secagg_clip": (0.0, 1e6, False),
    "secagg_stage_timeout_s": (0.0, DAY_S, False),
}


def _values(cfg: ServerConfig) -> list[tuple[str, Any]]:
    return [(f.name, getattr(cfg, f.name)) for f in fields(cfg)]


def _check(name: str, value: Any) -> str | None:
    """The problem with one value, or None. Types first, then finiteness and range."""
    default = getattr(_DEFAULTS, name)
    if name == "eval_data":
        return None if value is None or isinstance(value, Path) else f"{name} must be a path"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{name} must be true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be a whole number (got {value!r})"
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} must be a number (got {value!r})"
        if not math.isfinite(value):
            return f"{name} must be a finite number (got {value!r})"
    elif isinstance(default, dict):
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, int | float) \
                    or not math.isfinite(item):
                return f"{name}: {key} must be a finite number (got {item!r})"
        return None
    elif isinstance(default, Path):
        return None if isinstance(value, Path) else f"{name} must be a path"
    elif isinstance(default, str):
        return None if isinstance(value, str) else f"{name} must be text"
    if name in _RANGES:
        low, high, low_inclusive = _RANGES[name]
        ok = (low <= value if low_inclusive else low < value) and value <= high
        if not ok:
            bracket = "[" if low_inclusive else "("
            return f"{name} must be in {bracket}{low:g}, {high:g}] (got {value!r})"
    return None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config; unknown keys are an error, not silently ignored."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    return data


def _typed(name: str, value: Any, source: str) -> Any:
    """A TOML value in the field's Python type, without coercion: a wrong type is an
    error naming where it came from. (Flags arrive already typed by argparse.)"""
    default = getattr(_DEFAULTS, name)
    if name == "eval_data" or isinstance(default, Path):
        if value in (None, ""):
            return None if name == "eval_data" else default
        if not isinstance(value, str | Path):
            raise ConfigError(f"{source}: {name} must be a path string (got {value!r})")
        return Path(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML's `rounds_deadline_s = 300` is a float setting too
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a table of numbers")
        return {str(k): (float(v) if isinstance(v, int) and not isinstance(v, bool) else v)
                for k, v in value.items()}
    problem = _check(name, value)
    if problem and "must be in" not in problem and "finite" not in problem:
        raise ConfigError(f"{source}: {problem}")
    return value


def typed_value(name: str, value: Any, source: str) -> Any:
    """A job file's value in the field's type (fl_server/jobs.py), checked as in a TOML
    config; out-of-range values are caught by `validate` with the others."""
    return _typed(name, value, source)


def collect_values(args: argparse.Namespace, explicit: set[str]) -> dict[str, Any]:
    """The options the operator gave: the TOML file's, then the typed flags over them."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        for name, value in load_toml(Path(config_path)).items():
            values[name] = _typed(name, value, f"config file {config_path}")
    for name in _FIELD_TYPES:
        if name in explicit:
            values[name] = _typed(name, getattr(args, name), f"--{name}")
    return values


def build_config(args: argparse.Namespace, explicit: set[str]) -> ServerConfig:
    """Defaults, then the TOML file (if any), then the flags the operator typed."""
    return config_from(collect_values(args, explicit))


def config_from(values: dict[str, Any]) -> ServerConfig:
    cfg = ServerConfig()
    for name, value in values.items():
        setattr(cfg, name, value)
    cfg.validate()
    return cfg


def settle_job(cfg: ServerConfig, hyperparams: Any) -> None:
    """Resolve 'task default' zeros against the task once, at job creation, so the
    stored job says exactly what every round uses."""
    hp = hyperparams
    cfg.local_epochs = cfg.local_epochs or hp.local_epochs
    cfg.batch_size = cfg.batch_size or hp.batch_size
    cfg.learning_rate = cfg.learning_rate or hp.learning_rate
    cfg.delta = cfg.delta or hp.delta
    cfg.max_grad_norm = cfg.max_grad_norm or hp.max_grad_norm
    # What drives the noise, in this order: a fixed noise multiplier or an epsilon per
    # round when the operator asked for one; else a budget for the whole job, which each
    # hospital meets by planning its own noise (the default: a privacy budget is how a
    # privacy officer states it, and one that fits every hospital's default budget).
    if not (cfg.noise_multiplier or cfg.target_epsilon) and not cfg.no_dp:
        cfg.epsilon_per_hospital = cfg.epsilon_per_hospital or DEFAULT_EPSILON_PER_HOSPITAL
    if cfg.epsilon_per_hospital:
        cfg.noise_multiplier = cfg.target_epsilon = 0.0
    # dp_fedavg's central epsilon is that of a Gaussian mechanism on a sample of the
    # hospitals: unless the operator states the rate, it is the rate the server samples
    # them at (--fraction), stored with the job like every other setting.
    if cfg.strategy == "dp_fedavg" and "sample_rate" not in cfg.strategy_params:
        cfg.strategy_params = {**cfg.strategy_params, "sample_rate": cfg.fraction}
    cfg.validate()


def restore_job(cfg: ServerConfig, stored: dict[str, Any], given: set[str],
                job_id: str) -> None:
    """Put a running job's stored settings back into `cfg`, refusing any option the
    operator gave that differs from them (one line naming each)."""
    conflicts = []
    for name in JOB_FIELDS:
        if name not in stored:
            continue  # a job stored before this setting existed keeps today's value
        value = _typed(name, stored[name], f"job {job_id}")
        if name in given:
            mine = getattr(cfg, name)
            zero_means_default = name in ("local_epochs", "batch_size", "learning_rate",
                                          "delta", "max_grad_norm", "noise_multiplier",
                                          "epsilon_per_hospital")
            if mine != value and not (zero_means_default and mine == 0):
                conflicts.append(f"{name}={_show(mine)} (the job has {_show(value)})")
        setattr(cfg, name, value)
    if conflicts:
        raise ConfigError(
            f"job {job_id} is running with other settings: {', '.join(conflicts)}; a job's"
            " settings are fixed when it starts: drop the option(s), or pass --new_job to"
            " start a new job")
    cfg.validate()


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_strategy_params(items: list[str]) -> dict[str, float]:
    """`--strategy_param beta=0.9` pairs into a dict, with a clear error on a bad pair."""
    params: dict[str, float] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--strategy_param {item!r}: expected NAME=NUMBER")
        try:
            value = float(raw)
        except ValueError as exc:
            raise ConfigError(f"--strategy_param {item!r}: {raw!r} is not a number") from exc
        if not math.isfinite(value):
            raise ConfigError(f"--strategy_param {item!r}: the value must be finite")
        params[key.strip()] = value
    return params
