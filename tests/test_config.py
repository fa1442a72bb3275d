"""Typed config: defaults, override files, flags, unknown keys, bad types."""

import argparse
import json

import pytest

from placeforge.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    from_mapping,
    save_config,
)
from placeforge.shards.build import BuildConfig


def parse(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser, BuildConfig)
    return config_from_args(BuildConfig, parser.parse_args(argv))


def test_flags_override_defaults_and_are_typed():
    cfg = parse(["--cell-size-m", "10", "--min-shards", "3"])
    assert cfg.cell_size_m == 10.0 and isinstance(cfg.cell_size_m, float)
    assert cfg.min_shards == 3 and cfg.short_side == BuildConfig().short_side


def test_file_then_flags(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("short_side: 128\nseed: 7\n")
    cfg = parse(["--config", str(path), "--seed", "9"])
    assert (cfg.short_side, cfg.seed) == (128, 9)


def test_unknown_key_in_file_names_the_closest_key(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"cell_size": 10}))
    with pytest.raises(ConfigError, match="did you mean 'cell_size_m'"):
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
