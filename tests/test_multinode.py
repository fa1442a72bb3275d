"""build_shards.py and recluster.py as drivers on a real multi-node Ray (tests/raycluster.py), and a lost node.

One cluster for the module: a head (1 CPU, dashboard for the state API) and one 1-CPU
worker node with the custom resource `decode`, all separate processes on this machine.
The drivers join it through $RAY_ADDRESS, as `placeforge.raysession` does on a real cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import at_name, jpeg_bytes
from tests.raycluster import RAY, local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DRIVER_ENV = {"PYTHONPATH": str(REPO)}


def write_at_dataset(root: Path, places: int, images_per_place: int, size: tuple[int, int]) -> dict:
    """An @-folder of `places` good places and 3 bad inputs (a corrupt JPEG, a 2-image place).

    Returns the root, the number of input files and the number of good images.
    """
    root.mkdir(parents=True)
    for place in range(places):
        for i in range(images_per_place):
            east, north = 551_007.0 + place * 100.0 + i * 0.5, 4_180_007.0 + i * 0.3  # one 15 m cell per place
            (root / at_name(east, north, heading=i * 45)).write_bytes(jpeg_bytes(place * 100 + i, size))
    (root / at_name(551_001.0, 4_180_008.0)).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for i in range(2):  # far from every other place: rejected as too small
        (root / at_name(600_007.0 + i, 4_180_007.0)).write_bytes(jpeg_bytes(90_000 + i, size))
    good = places * images_per_place
    return {"root": root, "inputs": good + 3, "good": good}


def run_driver(cluster, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"pipelines/{script}", *args]
    return subprocess.run(cmd, cwd=REPO, env=cluster.driver_env(DRIVER_ENV), capture_output=True, text=True,
                          timeout=timeout)


def check_shard_set(out: Path, dataset: dict) -> None:
    """Every input is in the shards or the rejects exactly once, and no image id repeats."""
    manifest = json.loads((out / "manifest.json").read_text())
    index_ids = pq.read_table(out / "index.parquet").column("image_id").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet")
    assert len(index_ids) + rejects.num_rows == dataset["inputs"] == manifest["counts"]["inputs"]
    assert len(index_ids) == len(set(index_ids)) == dataset["good"] == manifest["counts"]["in_shards"]
    assert sorted(pq.read_table(out / "catalog.parquet").column("image_id").to_pylist()) == sorted(index_ids)
    reject_ids = [i for i in rejects.column("image_id").to_pylist() if i is not None]
    assert not set(reject_ids) & set(index_ids)
    assert len(manifest["shards"]) == manifest["counts"]["shards"]
    assert not (out / "_work").exists()


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(head_cpus=1, workers=[{"decode": 1}], dashboard=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shard_set(cluster, tmp_path_factory):
    """A shard set built by a build_shards.py driver on the cluster (5 places of 6 images, 4 shards)."""
    tmp = tmp_path_factory.mktemp("multinode")
    dataset = write_at_dataset(tmp / "city_at", places=5, images_per_place=6, size=(96, 72))
    out = tmp / "shards"
    result = run_driver(cluster, "build_shards.py", "--source", f"atname:{dataset['root']}", "--out", str(out),
                        "--min-shards", "4", "--images-per-shard", "8", "--short-side", "48")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {**dataset, "out": out, "stdout": result.stdout}


def nodes_that_ran(cluster, function: str, timeout_s: float = 20) -> dict[str, int]:
    """Finished tasks whose name mentions `function`, counted by node id, from the dashboard's state API.

    Task events reach the GCS about once a second, so the last ones of a finished driver may
    lag: polled until two reads agree.
    """
    cmd = [str(RAY), "list", "tasks", "--address", cluster.dashboard_url, "--detail", "--format", "json",
           "--limit", "10000", "--filter", "state=FINISHED"]
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        result = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        counts = Counter(t["node_id"] for t in json.loads(result.stdout) if function in t["name"])
        if counts == last or time.monotonic() > deadline:
            return counts
        last = counts
        time.sleep(1.5)


def test_build_shards_across_two_nodes_accounts_for_every_input(cluster, shard_set):
    assert f"inputs {shard_set['inputs']} = in shards {shard_set['good']} + rejected 3" in shard_set["stdout"]
    check_shard_set(shard_set["out"], shard_set)
    # The shard tasks ran on both nodes (Ray Data spreads tasks by default, and each node has
    # one CPU); the worker node is the one with the `decode` resource.
    nodes = cluster.wait_for_nodes(2)
    worker_id = next(n["NodeID"] for n in nodes if "decode" in n["Resources"])
    ran = nodes_that_ran(cluster, "build_one_shard")
    assert worker_id in ran and set(ran) == {n["NodeID"] for n in nodes}, ran
    assert sum(ran.values()) >= 4  # one per shard (a task event can lag, never be double-counted as FINISHED)


def test_task_resources_keep_shard_tasks_on_the_nodes_that_offer_them(cluster, shard_set, tmp_path):
    """--task-resources decode=0.01: every shard task runs on the worker node (the only one with
    `decode`), as cluster.yaml's placeforge_cpu_node keeps decoding on CPU nodes."""
    nodes = cluster.wait_for_nodes(2)
    worker_id = next(n["NodeID"] for n in nodes if "decode" in n["Resources"])
    before = nodes_that_ran(cluster, "build_one_shard")
    out = tmp_path / "pinned"
    result = run_driver(cluster, "build_shards.py", "--source", f"atname:{shard_set['root']}", "--out", str(out),
                        "--min-shards", "4", "--images-per-shard", "8", "--short-side", "48",
                        "--task-resources", "decode=0.01")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_shard_set(out, shard_set)
    after = nodes_that_ran(cluster, "build_one_shard")
    new = {node: after[node] - before.get(node, 0) for node in after if after[node] > before.get(node, 0)}
    assert set(new) == {worker_id} and sum(new.values()) >= 4, (before, after)

    bad = run_driver(cluster, "build_shards.py", "--source", f"atname:{shard_set['root']}", "--out",
                     str(tmp_path / "bad"), "--task-resources", "decode")
    assert bad.returncode == 2 and "expected NAME=AMOUNT" in bad.stderr


def test_recluster_across_two_nodes_writes_versions_covering_every_image(cluster, shard_set, tmp_path):
    from placeforge.clustering.labels import latest_version, read_labels
    from placeforge.models.checkpoint import save_model_checkpoint
    from placeforge.models.encoders import EncoderConfig, build_model
    from placeforge.pipelines.recluster import main as recluster_main

    shards, labels = str(shard_set["out"]), str(tmp_path / "labels")
    index_ids = sorted(pq.read_table(shard_set["out"] / "index.parquet").column("image_id").to_pylist())
    # v0 is computed from catalog.parquet on the driver alone (no Ray), so it runs in this process.
    assert recluster_main(["--shards", shards, "--labels", labels]) == 0
    assert latest_version(labels) == 0

    encoder = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    checkpoint = save_model_checkpoint(build_model(encoder), encoder, tmp_path / "untrained.pt")
    result = run_driver(cluster, "recluster.py", "--shards", shards, "--labels", labels, "--checkpoint",
                        str(checkpoint), "--n-init", "2", "--niter", "5", "--plots-cells", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert latest_version(labels) == 1
    table = read_labels(labels, 1, verify=True)
    assert sorted(table.column("image_id").to_pylist()) == index_ids  # every shard image once


def test_relabel_watch_as_a_submitted_ray_job(cluster, shard_set, tmp_path):
    """relabel.py --watch run the way a long-lived relabeler runs: `ray job submit` to the head."""
    import shutil

    from placeforge.clustering.labels import latest_version, read_labels, read_manifest
    from placeforge.fileio import file_sha256
    from placeforge.models.checkpoint import save_model_checkpoint
    from placeforge.models.encoders import EncoderConfig, build_model
    from placeforge.pipelines.recluster import main as recluster_main

    shards, labels = str(shard_set["out"]), tmp_path / "labels"
    assert recluster_main(["--shards", shards, "--labels", str(labels), "--n-init", "2", "--niter", "5",
                           "--plots-cells", "0"]) == 0
    export = tmp_path / "export"
    encoder = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    checkpoint = save_model_checkpoint(build_model(encoder), encoder, export / "model_epoch0000.pt")
    shutil.copy(checkpoint, export / ".model_epoch0001.pt.tmp-7")  # a write in progress: never read
    submit = [str(RAY), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), "--",
              "python", "pipelines/relabel.py", "--shards", shards, "--labels", str(labels), "--watch", str(export),
              "--max-polls", "2", "--interval-s", "1"]
    result = subprocess.run(submit, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The second poll found nothing new: a log line, which `ray job submit` prints on its stdout (Ray
    # writes a job's stdout and stderr into one log).
    assert "INFO placeforge.pipelines.relabel: skip: model_epoch0000.pt" in result.stdout
    assert latest_version(labels) == 1
    assert read_manifest(labels, 1).encoder_sha256 == file_sha256(checkpoint)
    index_ids = sorted(pq.read_table(shard_set["out"] / "index.parquet").column("image_id").to_pylist())
    assert sorted(read_labels(labels, 1, verify=True).column("image_id").to_pylist()) == index_ids


def test_a_lost_worker_node_during_build_shards(cluster, tmp_path):
    """SIGKILL a whole worker node while it runs a shard task; the build must still come out exact.

    Observed on Ray 2.60 (2 cores, 17 shards): the victim's task attempt ends FAILED with
    error NODE_DIED (`ray list tasks`), Ray Data's task retry runs it again (attempt 1) on a
    surviving node, and the first run finishes with exact counts.  The resume branch covers
    a run that fails instead (retries exhausted, a lost object), which must exit non-zero
    with a message and then resume, through the shards it kept, to the same exact result.
    """
    dataset = write_at_dataset(tmp_path / "city_at", places=24, images_per_place=6, size=(640, 480))
    victim = cluster.add_worker(1, {"victim": 1})
    cluster.wait_for_nodes(3)
    out = tmp_path / "shards"
    args = ["--source", f"atname:{dataset['root']}", "--out", str(out), "--min-shards", "16",
            "--images-per-shard", "9", "--short-side", "160"]
    cmd = [sys.executable, "pipelines/build_shards.py", *args]
    driver = subprocess.Popen(cmd, cwd=REPO, env=cluster.driver_env(DRIVER_ENV), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # Kill only once the victim is inside a shard task (Ray titles a busy worker after its task).
        deadline, killed = time.monotonic() + 180, False
        while driver.poll() is None and time.monotonic() < deadline and not killed:
            if any("build_one_shard" in title for title in victim.titles()):
                cluster.kill(victim)
                killed = True
            time.sleep(0.05)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed, f"the victim node never ran a shard task before the build ended:\n{stderr[-2000:]}"
    if driver.returncode == 0:
        print("lost node: Ray retried its tasks, the first run finished")
    else:
        print(f"lost node: the run failed ({driver.returncode}), resuming:\n{stderr[-1500:]}")
        assert any(word in stderr for word in ("build_shards: error", "NodeDied", "died", "Error")), stderr[-3000:]
        rerun = run_driver(cluster, "build_shards.py", *args)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        stdout = rerun.stdout
    assert f"inputs {dataset['inputs']} = in shards {dataset['good']} + rejected 3" in stdout
    check_shard_set(out, dataset)

