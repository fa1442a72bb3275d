"""A build's fixed start-up cost: what a shard task imports, and joining a Ray that already runs.

`import webdataset` imports torch (seconds in every Ray worker of a build that never uses it),
so the shard task writes its tars with tarfile (shards/writer.py); these tests fail if torch
comes back into a shard task.  `ray_session` joins a Ray started with `ray start --head` on this
machine instead of starting a second one; a stale record of a stopped Ray is ignored.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from placeforge.raysession import free_port, running_local_ray

REPO = Path(__file__).resolve().parents[1]


def shard_task_modules(row: dict, out_dir: str) -> dict:
    """Build one shard exactly as a build's Ray Data task does, then report what the worker imported."""
    from placeforge.shards.build import build_one_shard

    result = build_one_shard(row, out_dir, 48, 90)
    loaded = {name.split(".")[0] for name in sys.modules}
    return {"images": result["images"], "torch": "torch" in loaded, "webdataset": "webdataset" in loaded}


@pytest.mark.ray
def test_a_shard_task_in_a_ray_worker_does_not_import_torch(local_ray, at_dataset, tmp_path):
    from placeforge.shards.build import BuildConfig, build

    out = tmp_path / "shards"
    cfg = BuildConfig(min_shards=2, images_per_shard=8, short_side=48)
    build([("atname", at_dataset["root"])], out, cfg, plan_only=True)  # writes _work/plan.parquet, starts no Ray
    # A runtime env of its own gives the tasks fresh worker processes: nothing another test ran is loaded there.
    fresh = {"env_vars": {"PYTHONPATH": str(REPO), "PLACEFORGE_TEST_FRESH_WORKER": uuid.uuid4().hex}}
    import ray.data

    ds = ray.data.from_items([{"shard_index": 0}, {"shard_index": 1}], override_num_blocks=2)
    rows = list(ds.map(shard_task_modules, fn_kwargs={"out_dir": str(out)}, num_cpus=1, runtime_env=fresh).iter_rows())
    assert len(rows) == 2 and sum(r["images"] for r in rows) > 0  # the tasks really wrote shards
    assert [(r["torch"], r["webdataset"]) for r in rows] == [(False, False), (False, False)]


def test_no_record_or_a_stale_record_means_no_running_ray(tmp_path):
    assert running_local_ray(tmp_path) is None
    (tmp_path / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")  # a Ray that has stopped
    assert running_local_ray(tmp_path) is None


@pytest.mark.ray
@pytest.mark.slow
def test_ray_session_joins_the_ray_already_running_here():
    """A head started with `ray start --head` (1 CPU): a job's ray_session(None, num_cpus=2) joins it
    (the cluster it sees has 1 CPU, not 2) and leaves it running when the job ends."""
    from tests.raycluster import local_cluster

    with local_cluster(head_cpus=1) as cluster:
        head = cluster.nodes[0]
        address = running_local_ray(head.temp_dir)  # where `ray start` recorded it
        assert address is not None and address.endswith(f":{cluster.gcs_port}")
        # The job looks where `ray start` without --temp-dir records a head (/tmp/ray), which this test
        # must not touch; it is pointed at this head's record instead.
        code = (
            "import functools, ray\n"
            "from placeforge import raysession\n"
            f"raysession.running_local_ray = functools.partial(raysession.running_local_ray, {str(head.temp_dir)!r})\n"
            "with raysession.ray_session(None, 2):\n"
            "    print('cpus', ray.cluster_resources().get('CPU'))\n"
        )
        env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env | {"PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "cpus 1.0" in run.stdout, run.stdout + run.stderr[-2000:]
        assert "--num-cpus 2 does not apply to it" in run.stderr
        assert head.process.poll() is None and running_local_ray(head.temp_dir) == address  # still up


def test_clustering_and_version_0_modules_do_not_import_torch():
    """Every Ray Data worker of a clustering round imports clustering.stages (and through it the
    shard reader); the driver of version 0 imports clustering.job and pipelines.recluster. None of
    them may pull in torch, webdataset, timm or matplotlib at import (seconds in every worker,
    docs/benchmarks.md "Start-up of recluster.py and evaluate.py")."""
    code = (
        "import sys\n"
        "import placeforge.clustering.stages, placeforge.clustering.job, placeforge.pipelines.recluster\n"
        "import placeforge.shards.reader\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'webdataset', 'timm', 'matplotlib'}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
