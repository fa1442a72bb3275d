"""build_shards.py submitted with `ray job submit` to a Ray head the test starts on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from placeforge.shards.manifest import read_manifest
from tests.raycluster import RAY, local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """A head node as its own processes, dashboard (the job API) on 127.0.0.1 only.

    tests/raycluster.py gives it free ports, its own short --temp-dir, and token auth (Ray
    2.60 enables it whenever ~/.ray/auth_token exists, and the job client must then send the
    token); teardown kills only its processes, never `ray stop`, which stops every Ray here.
    """
    if not RAY.exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable}")
    with local_cluster(head_cpus=2, dashboard=True) as cluster:
        yield cluster.env, cluster.dashboard_url


def test_ray_job_submit_builds_the_same_shards_as_a_local_run(ray_head, at_dataset, tmp_path):
    env, address = ray_head
    out = tmp_path / "submitted"
    args = ["--source", f"atname:{at_dataset['root']}", "--out", str(out), "--min-shards", "2", "--short-side", "48"]
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "pipelines/build_shards.py", *args,
    ]  # fmt: skip
    result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"inputs {at_dataset['inputs']} = in shards {at_dataset['good']}" in result.stdout

    submitted = read_manifest(out)
    from placeforge.pipelines.build_shards import main

    assert main([*args[:2], "--out", str(tmp_path / "local"), *args[4:]]) == 0
    local = read_manifest(tmp_path / "local")
    assert [s.sha256 for s in submitted.shards] == [s.sha256 for s in local.shards]
    assert submitted.counts == local.counts


def test_ray_job_submit_writes_a_label_version(ray_head, at_dataset, tmp_path):
    env, address = ray_head
    from placeforge.pipelines.build_shards import main as build_main

    shards = tmp_path / "shards"
    assert build_main(["--source", f"atname:{at_dataset['root']}", "--out", str(shards), "--min-shards", "2"]) == 0
    labels = tmp_path / "labels"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "pipelines/recluster.py", "--shards", str(shards), "--labels", str(labels),
    ]  # fmt: skip
    result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from placeforge.clustering.labels import latest_version, read_labels

    assert latest_version(labels) == 0
    catalog_ids = sorted(pq.read_table(shards / "catalog.parquet").column("image_id").to_pylist())
    assert sorted(read_labels(labels).column("image_id").to_pylist()) == catalog_ids
