"""Typed configuration: a frozen dataclass per stage, override files, `--key value` flags.

Defaults live in code (the dataclass).  A YAML/JSON override file (`--config FILE`)
and then command-line flags replace them; both reject unknown keys (with the
closest valid name) and check types.  `save_config` writes the resolved values
beside every output so a run can be reproduced from its own folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from placeforge.fileio import write_json_atomic

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says what to fix."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check / convert one value to the field type `tp`; raise ConfigError naming the key."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (expected {getattr(base, '__name__', base)})")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if origin is tuple:
            (item_tp, *_rest) = typing.get_args(base)
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(coerce(name, v, item_tp) for v in items if v != "")
        if origin is typing.Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported field type {base!r}")
    raise ConfigError(f"{name}: {value!r} is not a valid {getattr(base, '__name__', base)}")


def _check_keys(cls: type, keys: Sequence[str], where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (valid: {', '.join(names)})")


def from_mapping(cls: type[C], values: dict[str, Any], base: C | None = None, where: str = "config") -> C:
    """A `cls` instance from `base` (or defaults) with `values` replacing fields."""
    _check_keys(cls, list(values), where)
    types_ = _field_types(cls)
    checked = {k: coerce(k, v, types_[k]) for k, v in values.items()}
    start = base if base is not None else cls()  # type: ignore[call-arg]
    cfg = dataclasses.replace(start, **checked)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON override file into a dict of keys to values.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, does not parse (the message gives
            the parser's reason and position on one line), or holds no mapping.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} cannot be read: not UTF-8 text (byte {err.start})") from None
    if str(path).endswith((".yaml", ".yml")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_reason(err)}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err.msg} (line {err.lineno}, "
                              f"column {err.colno})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _yaml_reason(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where (1-based)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written, before a job starts; creates nothing.

    The nearest part of `path` that exists must be a folder this process may write into
    (for a missing `path`, where it would be created).

    Raises:
        ConfigError: naming `flag`, the path and what is in the way.
    """
    target = Path(os.path.abspath(path))
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "it is not a folder" if existing == target else f"{existing} is not a folder"
        raise ConfigError(f"{flag} {target} cannot be written: {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {target} cannot be written: {existing} is not writable by this user")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config FILE` and one `--field-name VALUE` flag per dataclass field."""
    group = parser.add_argument_group(f"{cls.__name__} (override file keys use underscores)")
    group.add_argument("--config", metavar="FILE", help="YAML/JSON file of overrides, applied before flags")
    types_ = _field_types(cls)
    for field in dataclasses.fields(cls):
        base, _ = _unwrap_optional(types_[field.name])
        doc = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=f"cfg__{field.name}",
            metavar=getattr(base, "__name__", "VALUE").upper(),
            default=argparse.SUPPRESS,
            help=f"{doc} (default: {default})",
        )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Resolve defaults <- --config file <- flags into a frozen `cls`."""
    cfg = cls()  # type: ignore[call-arg]
    if getattr(args, "config", None):
        cfg = from_mapping(cls, load_file(args.config), where=str(args.config))
    return from_mapping(cls, config_flags(args), base=cfg, where="command line")


def config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags on the command line (field name -> raw value)."""
    return {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__")}


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically."""
    write_json_atomic(path, to_dict(cfg), sort_keys=True)
