"""Typed config: defaults, override files, flags, unknown keys, bad types."""

import argparse
import dataclasses
import json
from typing import ClassVar

import pytest

from placeforge.config import (
    ConfigError,
    Moved,
    add_config_arguments,
    config_from_args,
    flat_dict,
    from_mapping,
    migrate,
    moved,
    save_config,
)
from placeforge.shards.build import BuildConfig


def parse(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser, BuildConfig)
    return config_from_args(BuildConfig, parser.parse_args(argv))


def test_flags_override_defaults_and_are_typed():
    cfg = parse(["--places.cell-size-m", "10", "--min-shards", "3"])
    assert cfg.places.cell_size_m == 10.0 and isinstance(cfg.places.cell_size_m, float)
    assert cfg.min_shards == 3 and cfg.short_side == BuildConfig().short_side


def test_file_then_flags(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("short_side: 128\nseed: 7\n")
    cfg = parse(["--config", str(path), "--seed", "9"])
    assert (cfg.short_side, cfg.seed) == (128, 9)


def test_unknown_key_in_file_names_the_closest_key(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"cell_size": 10}))
    with pytest.raises(ConfigError, match="did you mean 'places.cell_size_m'"):
        parse(["--config", str(path)])


@pytest.mark.parametrize("flag", ["--cell-size", "--cel-size-m"])
def test_abbreviated_or_misspelled_flag_is_rejected(flag):
    with pytest.raises(SystemExit):
        parse([flag, "10"])


@pytest.mark.parametrize("key,value", [("min_shards", "many"), ("min_shards", 2.5), ("seed", True)])
def test_bad_types_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        from_mapping(BuildConfig, {key: value})


def test_validate_runs_on_resolved_config():
    with pytest.raises(ValueError, match="jpeg_quality"):
        from_mapping(BuildConfig, {"jpeg_quality": 0})


def test_save_config_round_trip(tmp_path):
    cfg = from_mapping(BuildConfig, {"seed": 3})
    save_config(cfg, tmp_path / "cfg.json")
    assert from_mapping(BuildConfig, json.loads((tmp_path / "cfg.json").read_text())) == cfg


def test_parse_resources():
    from placeforge.raysession import parse_resources

    assert parse_resources(None) is None and parse_resources("") is None
    assert parse_resources("placeforge_cpu_node=0.01, decode=2") == {"placeforge_cpu_node": 0.01, "decode": 2.0}
    for bad in ("decode", "decode=", "=1", "decode=-1", "decode=x"):
        with pytest.raises(ValueError, match="expected NAME=AMOUNT"):
            parse_resources(bad)


def test_a_ray_address_that_does_not_answer_fails_before_ray_init():
    import socket

    from placeforge.raysession import RayAddressError, check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")  # something answers: no error
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # free again once closed: nothing listens there
    with pytest.raises(RayAddressError, match=rf"127\.0\.0\.1:{closed_port} does not answer"):
        check_reachable(f"127.0.0.1:{closed_port}")  # refused at once, not retried for minutes by ray.init
    with pytest.raises(RayAddressError, match="expected HOST:PORT"):
        check_reachable("my-head-node")
    check_reachable("auto")  # left to Ray


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = dataclasses.field(default=3, metadata={"help": "a size"})
    names: tuple[str, ...] = ("a",)

    def validate(self):
        if self.size < 1:
            raise ValueError("inner.size must be >= 1")


@dataclasses.dataclass(frozen=True)
class Outer:
    MOVED: ClassVar[dict[str, Moved]] = {"inner_size": moved("inner.size"), "both": moved("seed", "inner.size")}
    seed: int = 0
    inner: Inner = dataclasses.field(default_factory=Inner, metadata={"help": "the inner section"})


def parse_outer(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser, Outer)
    return config_from_args(Outer, parser.parse_args(argv)), parser


def test_a_section_takes_a_mapping_or_dotted_flags_and_keeps_what_it_is_not_given(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("inner:\n  names: [x, y]\n")
    cfg, parser = parse_outer(["--config", str(path), "--inner.size", "5"])
    assert cfg == Outer(inner=Inner(size=5, names=("x", "y")))
    assert "--inner.size" in parser.format_help() and "the inner section" in parser.format_help()
    assert "--inner-size" not in parser.format_help()  # an old name's flag works but is not offered
    save_config(cfg, tmp_path / "saved.json")
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved == {"seed": 0, "inner": {"size": 5, "names": ["x", "y"]}}
    assert from_mapping(Outer, saved) == cfg  # the record reads back
    assert flat_dict(saved) == {"seed": 0, "inner.size": 5, "inner.names": ["x", "y"]}


def test_a_section_checks_its_keys_types_and_ranges_naming_the_path():
    with pytest.raises(ConfigError, match="unknown key 'inner.sise'; did you mean 'inner.size'"):
        from_mapping(Outer, {"inner": {"sise": 2}})
    with pytest.raises(ConfigError, match="did you mean 'inner.size'"):
        from_mapping(Outer, {"size": 2})  # a section's key at the top level
    with pytest.raises(ConfigError, match="inner.size: 'big' is not a valid int"):
        from_mapping(Outer, {"inner.size": "big"})
    with pytest.raises(ConfigError, match="inner is a section"):
        from_mapping(Outer, {"inner": 4})
    with pytest.raises(ValueError, match="inner.size must be >= 1"):
        from_mapping(Outer, {"inner": {"size": 0}})


def test_old_flat_keys_and_flags_are_read_at_their_new_place_with_a_warning(caplog):
    cfg, _ = parse_outer(["--inner-size", "7"])
    assert cfg.inner.size == 7
    assert "command line: 'inner_size' is now 'inner.size'" in caplog.text
    assert from_mapping(Outer, {"both": 2}) == Outer(seed=2, inner=Inner(size=2))
    caplog.clear()
    assert from_mapping(Outer, {"inner_size": 2}, old_keys="quiet").inner.size == 2  # a saved record
    assert caplog.text == ""
    nested, notes = migrate(Outer, {"inner_size": 2, "seed": 1})
    assert nested == {"inner": {"size": 2}, "seed": 1} and notes == ["'inner_size' is now 'inner.size'"]
    with pytest.raises(ConfigError, match="given twice"):
        from_mapping(Outer, {"inner_size": 2, "inner": {"size": 3}})
