"""The client daemon's options from a TOML file, then flags (flags win).

A hospital keeps its site settings in one file (`fl-client --config site.toml`, as the
server takes `--config server.toml`) and may still override one value for a run on the
command line. Keys are the flags' names without the dashes (`client_id`, `server_url`,
`epsilon_budget`, ...); a key that is no flag, or a value of the wrong type, is an
error naming the file and the key, never silently ignored: a mistyped
`epsilon_budegt = 2` must not leave the default budget in force. The one key that is
no flag is `[studies.<model_type>]`: the studies a hospital serves, each with its data
and job policy (fl_client/studies.py).

The flags themselves stay defined in one place (the daemon's argparse parser): this
module reads their names, types and choices from it, so a new flag is a valid TOML key
without an edit here.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_client.studies import StudyConfigError, parse_studies

__all__ = ["ConfigError", "add_config_flag", "load_toml", "parse_args"]

# `[studies.<model_type>]` tables: the studies a daemon serves (fl_client/studies.py)
STUDIES_KEY = "studies"


class ConfigError(ValueError):
    """The config file is missing, not TOML, or holds an unknown key or a bad value."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file with any of these options, named without the dashes"
                             " (flags typed here win)")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in ("help", "config")}


def _convert(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """`value` as the flag would have produced it, or ConfigError."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} is not {expected}")

    if action.nargs == 0:  # store_true / store_false: the key is the value's name (dest)
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    kind = action.type
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    if isinstance(value, bool):
        raise bad("a number or text" if kind in (int, float) else "text")
    if kind is float:
        if not isinstance(value, int | float):
            raise bad("a number")
        converted: Any = float(value)
    elif kind is int:
        if not isinstance(value, int):
            raise bad("an integer")
        converted = value
    elif kind in (None, str, Path):
        if not isinstance(value, str):
            raise bad("text")
        converted = Path(value) if kind is Path else value
    elif callable(kind):  # a flag's own parser (e.g. a positive byte count)
        try:
            converted = kind(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise bad(f"valid ({exc})") from None
    else:
        raise bad("valid")
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {key} = {value!r} is not one of {choices}")
    return converted


def load_toml(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values, typed as `parser`'s flags would type them."""
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    options = _options(parser)
    unknown = sorted(set(data) - set(options) - {STUDIES_KEY})
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}"
                          f" (known: {', '.join(sorted(options))})")
    values = {key: _convert(key, value, options[key], f"config file {path}")
              for key, value in data.items() if key != STUDIES_KEY}
    if STUDIES_KEY in data:
        try:
            values[STUDIES_KEY] = parse_studies(data[STUDIES_KEY], f"config file {path}")
        except StudyConfigError as exc:
            raise ConfigError(str(exc)) from None
    return values


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
               ) -> argparse.Namespace:
    """Parse `argv` with the TOML file named by `--config` (if any) as the defaults.

    A flag the file provides is no longer required on the command line; one typed
    there still wins. A bad file is reported like a bad flag (usage error, exit 2).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        try:
            values = load_toml(known.config, parser)
        except ConfigError as exc:
            parser.error(str(exc))
        options = _options(parser)
        for key in values:
            if key in options:
                options[key].required = False
        parser.set_defaults(**values)
    return parser.parse_args(argv)
