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
import logging
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from placeforge.fileio import write_json_atomic

C = TypeVar("C")
log = logging.getLogger(__name__)


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


def sections(cls: type) -> dict[str, type]:
    """The fields of `cls` that are themselves config dataclasses (name -> class): its sections."""
    return {name: tp for name, tp in _field_types(cls).items() if isinstance(tp, type) and dataclasses.is_dataclass(tp)}


def key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every setting of `cls` as a dotted path (`encoder.image_size`), sections expanded."""
    parts = sections(cls)
    paths: list[str] = []
    for field in dataclasses.fields(cls):
        if field.name in parts:
            paths += key_paths(parts[field.name], f"{prefix}{field.name}.")
        else:
            paths.append(prefix + field.name)
    return paths


@dataclass(frozen=True)
class Moved:
    """Where an older flat key now lives: one or more dotted paths, its value converted on the way."""

    paths: tuple[str, ...]
    convert: Callable[[Any], Any] | None = None

    def apply(self, value: Any) -> dict[str, Any]:
        return {path: self.convert(value) if self.convert else value for path in self.paths}


def moved(*paths: str, convert: Callable[[Any], Any] | None = None) -> Moved:
    """A `MOVED` entry: the old key's value goes to every one of `paths` (through `convert`)."""
    return Moved(paths, convert)


def _set_path(out: dict[str, Any], path: str, value: Any, where: str) -> None:
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {path!r} is given twice (as {part!r} and inside it)")
        node = child
    if leaf in node:
        raise ConfigError(f"{where}: {path!r} is given twice (under its old and its new name?)")
    node[leaf] = value


def migrate(cls: type, values: Mapping[str, Any], where: str = "config",
            prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """`values` with dotted keys nested and `cls.MOVED`'s old flat keys put where they now live.

    Returns the nested mapping and one note per old key ("'image_size' is now 'encoder.image_size'").
    A key that names a section keeps its mapping; given a plain value it is an old key of that name.
    """
    moves: dict[str, Moved] = getattr(cls, "MOVED", {})
    names = sections(cls)
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in values.items():
        if key in names and isinstance(value, Mapping):  # a section, given its own keys
            for sub, sub_value in value.items():
                _set_path(out, f"{key}.{sub}", sub_value, where)
        elif key in moves:  # an older flat key
            for path, new_value in moves[key].apply(value).items():
                _set_path(out, path, new_value, where)
            notes.append(f"{prefix + key!r} is now {' and '.join(repr(prefix + p) for p in moves[key].paths)}")
        else:
            _set_path(out, key, value, where)
    return out, notes


def _check_keys(cls: type, keys: Sequence[str], where: str, prefix: str = "") -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in names:
            # Closest among this level's names, every nested path, and the old names MOVED knows.
            paths = key_paths(cls, prefix)
            candidates = {prefix + p.rsplit(".", 1)[-1]: p for p in reversed(paths)}  # a section's key given here
            candidates.update({p: p for p in paths})
            candidates.update({prefix + n: prefix + n for n in names})
            candidates.update({prefix + old: m.paths[0] for old, m in getattr(cls, "MOVED", {}).items()})
            close = difflib.get_close_matches(prefix + key, list(candidates), n=1)
            hint = f"; did you mean {candidates[close[0]]!r}?" if close else ""
            valid = ", ".join(prefix + n for n in names)
            raise ConfigError(f"{where}: unknown key {prefix + key!r}{hint} (valid: {valid})")


def from_mapping(cls: type[C], values: Mapping[str, Any], base: C | None = None, where: str = "config",
                 old_keys: Literal["warn", "quiet"] = "warn") -> C:
    """A `cls` instance from `base` (or defaults) with `values` replacing fields.

    A section (a field that is a config dataclass) takes a mapping of its own keys, merged into
    the section of `base`; a dotted key (`encoder.image_size`) is the same.  Keys that `cls.MOVED`
    lists are read at their new place, with a warning naming it (`old_keys="quiet"` for a saved
    record, e.g. an older run's train_config.json, that the user does not edit).
    """
    notes: list[str] = []
    cfg = _from_nested(cls, values, base, where, "", notes)
    if old_keys == "warn":
        for note in notes:
            log.warning("%s: %s; read as that (the old name will go: rename it)", where, note)
    return cfg


def _from_nested(cls: type[C], values: Mapping[str, Any], base: C | None, where: str, prefix: str,
                 notes: list[str]) -> C:
    values, level_notes = migrate(cls, values, where, prefix)
    notes += level_notes
    _check_keys(cls, list(values), where, prefix)
    types_ = _field_types(cls)
    start = base if base is not None else cls()  # type: ignore[call-arg]
    parts = sections(cls)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in parts:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {prefix + key} is a section: give a mapping of its keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(parts[key]))}), not {value!r}")
            checked[key] = _from_nested(parts[key], value, getattr(start, key), where, f"{prefix}{key}.", notes)
        else:
            checked[key] = coerce(prefix + key, value, types_[key])
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
    """Add `--config FILE` and one `--field-name VALUE` flag per dataclass field.

    A section's fields get `--section.field-name` (one help group per section); the old flat keys
    `cls.MOVED` lists keep a hidden flag of their old name, read at the new place with a warning.
    """
    group = parser.add_argument_group(f"{cls.__name__} (override file keys use underscores)")
    group.add_argument("--config", metavar="FILE", help="YAML/JSON file of overrides, applied before flags")
    _add_field_flags(parser, group, cls, "")
    for old in getattr(cls, "MOVED", {}):
        group.add_argument("--" + old.replace("_", "-"), dest=f"cfg__{old}", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


def _add_field_flags(parser: argparse.ArgumentParser, group: Any, cls: type, prefix: str) -> None:
    types_ = _field_types(cls)
    parts = sections(cls)
    for field in dataclasses.fields(cls):
        if field.name in parts:
            section = parser.add_argument_group(
                f"{prefix}{field.name}: {field.metadata.get('help', '')} (in a file: a mapping under "
                f"`{prefix}{field.name}:`)")
            _add_field_flags(parser, section, parts[field.name], f"{prefix}{field.name}.")
            continue
        base, _ = _unwrap_optional(types_[field.name])
        doc = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        group.add_argument(
            "--" + prefix + field.name.replace("_", "-"),
            dest=f"cfg__{prefix}{field.name}",
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
    """The config fields given as flags on the command line (field name or dotted path -> raw value)."""
    return {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__")}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON values: sections as nested mappings, tuples as lists."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value
    return plain(dataclasses.asdict(cfg))


def flat_dict(cfg_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping (`to_dict`) as one level of dotted keys: `{"encoder.image_size": 224}`."""
    out: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if isinstance(value, Mapping):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically."""
    write_json_atomic(path, to_dict(cfg), sort_keys=True)
