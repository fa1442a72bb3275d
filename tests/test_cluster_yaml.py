"""cluster.yaml is valid for Ray's own cluster-launcher schema (offline: no cloud is contacted)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # fills the provider's defaults as `ray up` does, then the schema
    types = config["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] > 0 and "GPU" not in types["cpu_workers"]["resources"]
    assert config["head_node_type"] in types
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_schema_check_really_rejects_a_broken_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["cpu_workers"]["min_workers"] = "several"
    with pytest.raises(Exception, match="several"):
        validate_config(prepare_config(config))
