"""recluster: the stages on plain dicts, then the whole job on a real local Ray and real shards.

The shard set is the tiny synthetic city, built once per module; label versions are
written by `pipelines/recluster.py`'s `main`, as a user would run it.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from placeforge.clustering.descriptors import read_descriptors, reusable
from placeforge.clustering.kmeans import cluster_cells
from placeforge.clustering.labels import latest_version, read_labels, read_manifest
from placeforge.clustering.matching import PreviousLabels, relabel
from placeforge.clustering.plots import pick_plot_cells, project_2d
from placeforge.clustering.stages import UNKNOWN_CELL, CellLookup, add_cells, cluster_partition, images_of_shard
from placeforge.fileio import LOCK_FILE, file_sha256, output_lock
from placeforge.models.checkpoint import save_model_checkpoint
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.shards.index import read_index
from placeforge.shards.reader import ShardSet

# --- stages and helpers, no Ray ----------------------------------------------------------


def unit_rows(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_cell_lookup_and_partitions():
    lookup = CellLookup(np.array([3, 7, 9], np.int64), np.array([100, 101, 100], np.int64))
    out = add_cells({"image_id": np.array([9, 4, 3])}, lookup, partitions=4)
    assert out["cell_id"].tolist() == [100, UNKNOWN_CELL, 100]
    assert out["partition"].tolist() == [0, 0, 0] and add_cells({"image_id": np.array([7])}, lookup, 4)[
        "partition"].tolist() == [101 % 4]


def test_cluster_partition_is_independent_of_partitioning_and_marks_bad_rows():
    rng = np.random.default_rng(0)
    cell_id = np.repeat(np.arange(6, dtype=np.int64) * 7919, 9)  # 6 cells x 9 images
    descriptors = unit_rows(rng, len(cell_id))
    image_id = np.arange(len(cell_id), dtype=np.int64) + 1000
    whole = cluster_cells(cell_id, descriptors, k=3, seed=1)
    by_image = {}
    for part in range(2):  # the job's groupby: cells split by cell_id mod P
        rows = np.flatnonzero(cell_id % 2 == part)
        out = cluster_partition({"image_id": image_id[rows], "cell_id": cell_id[rows], "descriptor": descriptors[rows]},
                                k=3, seed=1, n_init=10, niter=20, spherical=False, plot_cells=np.array([0]))
        by_image.update(zip(out["image_id"].tolist(), out["class_in_cell"].tolist()))
        assert np.array_equal(np.isfinite(out["projection_x"]), out["cell_id"] == 0)  # only the plotted cell
    assert [by_image[i] for i in image_id.tolist()] == whole.class_in_cell.tolist()

    descriptors[4, 2] = np.nan
    cell_id[5] = UNKNOWN_CELL
    out = cluster_partition({"image_id": image_id, "cell_id": cell_id, "descriptor": descriptors}, k=3, seed=1,
                            n_init=10, niter=20, spherical=False, plot_cells=np.array([], np.int64))
    assert out["finite"].tolist() == [i != 4 for i in range(len(image_id))]
    assert out["class_in_cell"][[4, 5]].tolist() == [-1, -1] and (out["class_in_cell"][6:] >= 0).all()


def test_pick_plot_cells_prefers_cells_with_several_classes_and_is_seeded():
    cell_id = np.array([1, 1, 1, 2, 3, 3, 3, 4, 4])
    classes = np.array([0, 1, 0, 0, 0, 0, 0, 0, 1])
    assert pick_plot_cells(cell_id, 2, seed=0, class_in_cell=classes).tolist() == [1, 4]
    assert pick_plot_cells(cell_id, 2, seed=5, min_images=3).tolist() == [1, 3]  # by size
    assert len(pick_plot_cells(cell_id, 10, seed=0)) == 4
    assert pick_plot_cells(cell_id, 3, seed=7).tolist() == pick_plot_cells(cell_id, 3, seed=7).tolist()


def test_project_2d_keeps_the_main_direction():
    rng = np.random.default_rng(0)
    x = np.outer(np.linspace(-1, 1, 20), np.ones(16)) + 0.01 * rng.standard_normal((20, 16))
    projection = project_2d(x)
    assert projection.shape == (20, 2) and projection.dtype == np.float32
    assert abs(np.corrcoef(projection[:, 0], np.linspace(-1, 1, 20))[0, 1]) > 0.99
    assert project_2d(x[:1]).tolist() == [[0.0, 0.0]]


def test_matching_a_split_in_a_cell_with_fewer_clusters_than_another():
    # Regression: cell 2 splits into 2 clusters while cell 1 has 3 (k_new < k_max, not one-to-one).
    image_id, cell_id = np.arange(7), np.array([1, 1, 1, 2, 2, 2, 2])
    first = relabel(image_id, cell_id, np.array([0, 1, 2, 0, 0, 0, 0]), None)
    previous = PreviousLabels(image_id, cell_id, first.class_in_cell, first.class_id, first.next_class_id)
    second = relabel(image_id, cell_id, np.array([0, 1, 2, 0, 0, 1, 1]), previous)
    assert second.class_id.tolist() == [0, 1, 2, 3, 3, 4, 4] and second.next_class_id == 5


# --- the job on a local Ray ----------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_dir(local_ray, tmp_path_factory) -> Path:
    from placeforge.shards.build import BuildConfig, build
    from synthcity import generate
    from synthcity.synth_config import SynthConfig

    root = tmp_path_factory.mktemp("recluster")
    generate(root / "city", SynthConfig.tiny())
    sources = [("atname", root / "city" / "atname" / "train"), ("gsv_cities", root / "city" / "gsv_cities")]
    build(sources, root / "shards", BuildConfig(images_per_shard=40, min_shards=3, short_side=64))
    return root / "shards"


def run(*args: str | Path) -> int:
    from placeforge.pipelines.recluster import main

    return main([str(a) for a in args])


def shard_image_ids(shard_dir: Path) -> np.ndarray:
    return np.sort([i for url in ShardSet.open(shard_dir).urls for i, _ in images_of_shard(url)])


def tiny_checkpoint(path: Path, nan: bool = False) -> Path:
    torch.manual_seed(0)
    cfg = EncoderConfig(descriptor_dim=32)
    model = build_model(cfg)
    if nan:
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))  # what a diverged run leaves behind
    return save_model_checkpoint(model, cfg, path)


def assert_plots(folder: Path, count: int) -> None:
    plots = sorted((folder / "plots").glob("cell-*.png"))
    assert len(plots) == count
    for plot in plots:
        with Image.open(plot) as image:
            assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.ray
def test_v0_then_a_kmeans_round_then_a_diverged_checkpoint(shard_dir, tmp_path, capsys):
    labels = tmp_path / "labels"
    in_shards = shard_image_ids(shard_dir)
    assert len(in_shards) > 50

    assert run("--shards", shard_dir, "--labels", labels, "--plots-cells", "4") == 0
    v0 = read_labels(labels, 0, verify=True)
    assert np.array_equal(v0.column("image_id").to_numpy(), in_shards)  # every image once
    assert read_manifest(labels, 0).method == "initial" and read_manifest(labels, 0).encoder_checkpoint is None
    assert_plots(labels / "v0000", 4)

    checkpoint = tiny_checkpoint(tmp_path / "models" / "round1.pt")
    assert run("--shards", shard_dir, "--labels", labels, "--checkpoint", checkpoint, "--keep-descriptors",
               "--batch-size", "32", "--plots-cells", "3", "--num-cpus", "2") == 0
    out = capsys.readouterr().out
    assert "label version v0001 (kmeans)" in out and "changed class since v0000" in out
    assert latest_version(labels) == 1
    v1 = read_labels(labels, 1, verify=True)
    assert np.array_equal(v1.column("image_id").to_numpy(), in_shards)
    assert np.isfinite(v1.column("distance").to_numpy()).all()
    manifest = read_manifest(labels, 1)
    assert manifest.previous_version == 0 and manifest.method == "kmeans"
    assert manifest.encoder_checkpoint == str(checkpoint.resolve())
    assert manifest.encoder_sha256 == file_sha256(checkpoint)
    assert manifest.params["encoder_config"]["name"] == "vit_tiny_test"
    assert_plots(labels / "v0001", 3)
    kept = list((labels / "descriptors").iterdir())
    assert len(kept) == 1 and reusable(kept[0], manifest.encoder_sha256, ShardSet.open(shard_dir).manifest.fingerprint)
    kept_ids, descriptors = read_descriptors(kept[0])
    assert np.array_equal(np.sort(kept_ids), in_shards) and descriptors.shape == (len(in_shards), 32)
    assert np.allclose(np.linalg.norm(descriptors.astype(np.float32), axis=1), 1.0, atol=1e-2)

    diverged = tiny_checkpoint(tmp_path / "models" / "diverged.pt", nan=True)
    assert run("--shards", shard_dir, "--labels", labels, "--checkpoint", diverged, "--num-cpus", "2") == 2
    err = capsys.readouterr().err
    assert "diverged.pt" in err and "NaN or Inf descriptors" in err and "v0001 stays the latest" in err
    assert latest_version(labels) == 1
    assert sorted(p.name for p in labels.iterdir() if p.name != LOCK_FILE) == ["descriptors", "v0000", "v0001"]


@pytest.mark.ray
def test_bad_inputs_fail_before_any_version_is_written(shard_dir, tmp_path, capsys):
    labels = tmp_path / "labels"
    assert run("--shards", shard_dir, "--labels", labels, "--plots-cells", "0") == 0

    assert run("--shards", shard_dir, "--labels", labels) == 2  # v0 is written once
    assert "already holds label versions" in capsys.readouterr().err
    assert run("--shards", shard_dir, "--labels", labels, "--force", "--plots-cells", "0") == 0
    assert read_manifest(labels).version == 1 and read_manifest(labels).previous_version == 0
    assert read_manifest(labels).counts.images_changed_class == 0  # the same seed gives the same split

    content = torch.load(tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True)
    content["encoder_config"]["descriptor_dim"] = 64  # the weights are 32-d
    torch.save(content, tmp_path / "other_arch.pt")
    assert run("--shards", shard_dir, "--labels", labels, "--checkpoint", tmp_path / "other_arch.pt") == 2
    err = capsys.readouterr().err
    assert "other_arch.pt" in err and "head.weight" in err

    labels_file = labels / "v0001" / "labels.parquet"
    labels_file.write_bytes(labels_file.read_bytes()[:100])
    assert run("--shards", shard_dir, "--labels", labels, "--checkpoint", tmp_path / "ok.pt") == 2
    assert "v0001/labels.parquet" in capsys.readouterr().err
    assert sorted(p.name for p in labels.iterdir() if p.name != LOCK_FILE) == ["v0000", "v0001"]


@pytest.mark.ray
def test_an_image_missing_from_its_shard_fails_naming_the_shard(shard_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(shard_dir, damaged)
    index = read_index(damaged / "index.parquet").to_pylist()
    victim = index[0]
    tar_path = damaged / "shards" / f"shard-{victim['shard_index']:06d}.tar"
    dropped = f"{victim['sample_key']}.{victim['member']}"
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name != dropped]
    with tarfile.open(tar_path, "w") as dst:
        for member, data in members:
            dst.addfile(member, io.BytesIO(data))
    assert run("--shards", damaged, "--labels", tmp_path / "labels", "--checkpoint", tiny_checkpoint(tmp_path / "m.pt"),
               "--num-cpus", "2", "--plots-cells", "0") == 2
    err = capsys.readouterr().err
    assert "1 image(s) listed in" in err and f"shard-{victim['shard_index']:06d}.tar:{dropped}" in err
    assert not (tmp_path / "labels").exists() or latest_version(tmp_path / "labels") is None


def test_a_second_recluster_into_the_same_labels_is_refused(shard_dir, tmp_path, capsys):
    labels = tmp_path / "labels"
    with output_lock(labels, "recluster"):
        assert run("--shards", shard_dir, "--labels", labels) == 2
    assert "is being written by recluster (host" in capsys.readouterr().err
    assert not list(labels.glob("v*"))
    assert run("--shards", shard_dir, "--labels", labels) == 0  # free again once the holder is done
