"""Server configuration: one dataclass filled from defaults, a TOML file, then flags.

Flags win over the file so an operator can keep a site config and still override
one value for a run; every value is validated here, before any socket opens.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fl_core.constants import DEFAULT_PORT


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
    local_epochs: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    no_dp: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    max_grad_norm: float = 0.0
    eval_data: Path | None = None
    fed_eval: bool = True
    eval_deadline_s: float = 120.0
    seed: int = 0
    max_workers: int = 512
    torch_threads: int = 1
    job_id: str = ""

    def validate(self) -> None:
        problems: list[str] = []
        if not 0 <= self.port < 65536:
            problems.append(f"port {self.port} is not in 0..65535 (0 picks a free port)")
        if self.rounds < 1:
            problems.append(f"rounds must be at least 1 (got {self.rounds})")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1] (got {self.fraction})")
        if self.min_clients < 1:
            problems.append(f"min_clients must be at least 1 (got {self.min_clients})")
        if not 0 < self.quorum <= 1:
            problems.append(f"quorum must be in (0, 1] (got {self.quorum})")
        for name in ("round_deadline_s", "wait_for_clients_s", "eval_deadline_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("noise_multiplier", "target_epsilon", "delta", "max_grad_norm",
                     "learning_rate"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.delta >= 1:
            problems.append(f"delta must be below 1 (got {self.delta})")
        if self.max_workers < 8:
            problems.append("max_workers must be at least 8")
        if self.torch_threads < 1:
            problems.append("torch_threads must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems))

    def as_json_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        return out


_FIELD_TYPES = {f.name: f.type for f in fields(ServerConfig)}


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


def build_config(args: argparse.Namespace, explicit: set[str]) -> ServerConfig:
    """Defaults, then the TOML file (if any), then the flags the operator typed."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(Path(args.config)))
    for name in _FIELD_TYPES:
        if name in explicit:
            values[name] = getattr(args, name)
    cfg = ServerConfig()
    for name, value in values.items():
        current = getattr(cfg, name)
        try:
            if isinstance(current, Path) or name == "eval_data":
                value = Path(value) if value not in (None, "") else None
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(current, int):
                value = int(value)
            elif isinstance(current, float):
                value = float(value)
            elif isinstance(current, dict):
                value = {str(k): float(v) for k, v in dict(value).items()}
            elif isinstance(current, str):
                value = str(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: {value!r} is not a valid {type(current).__name__}") from exc
        setattr(cfg, name, value)
    cfg.validate()
    return cfg


def parse_strategy_params(items: list[str]) -> dict[str, float]:
    """`--strategy_param beta=0.9` pairs into a dict, with a clear error on a bad pair."""
    params: dict[str, float] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--strategy_param {item!r}: expected NAME=NUMBER")
        try:
            params[key.strip()] = float(raw)
        except ValueError as exc:
            raise ConfigError(f"--strategy_param {item!r}: {raw!r} is not a number") from exc
    return params
