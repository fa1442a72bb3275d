"""Version 0 of the view classes, the two ways MutualVPR starts: a random split of every cell
(`--initial random`, its official code) or K-means with the model training starts from
(`--untrained-model RECIPE`, the paper's DINOv2-based initialisation).

The pure rules first; then the untrained model against the one trainer/train.py builds; then
both commands on the tiny synthetic city's shards with a real local Ray (test_recluster's).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from placeforge.clustering.initial import INITIAL_SPLITS, initial_classes, random_classes
from placeforge.clustering.job import ReclusterConfig
from placeforge.clustering.labels import latest_version, read_labels, read_manifest
from placeforge.config import ConfigError, config_from_args, from_mapping
from placeforge.fileio import file_sha256
from placeforge.models.checkpoint import load_model_checkpoint
from placeforge.models.encoders import encoder_spec
from placeforge.pipelines.recluster import UNTRAINED_SUBDIR, build_parser, write_untrained_model
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model, global_model_of
from tests.conftest import fill_like_trained
from tests.test_recluster import run, shard_dir, shard_image_ids  # noqa: F401 - shard_dir: the module's shards

# --- the rules, no Ray ---------------------------------------------------------------------


def cells_with_headings() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell 1: 10 images facing two opposite ways; cell 2: 7 images, one heading unknown; cell 3: 2 images."""
    image_ids = np.arange(500, 519, dtype=np.int64)
    cells = np.repeat(np.array([1, 2, 3], np.int64), [10, 7, 2])
    headings = np.concatenate([np.tile([10.0, 190.0], 5), [0, 40, 80, np.nan, 160, 200, 240], [90, 270]])
    return image_ids, cells, headings


def test_random_ignores_headings_and_splits_every_cell_near_equally():
    image_ids, cells, headings = cells_with_headings()
    classes = initial_classes(image_ids, cells, headings, k=3, seed=4, rule="random")
    assert np.array_equal(classes, initial_classes(image_ids, cells, None, k=3, seed=4, rule="random"))
    assert np.array_equal(classes, random_classes(image_ids, cells, 3, seed=4))
    assert sorted(np.bincount(classes[:10]).tolist()) == [3, 3, 4]  # not 2 classes of 5 by heading
    assert sorted(np.bincount(classes[10:17]).tolist()) == [2, 2, 3]
    assert sorted(classes[17:].tolist()) == [0, 1]  # K' = min(k, n): two images, two classes
    assert np.array_equal(initial_classes(image_ids, cells, headings, k=3, seed=4, rule="random"), classes)
    perm = np.random.default_rng(0).permutation(len(cells))
    assert np.array_equal(initial_classes(image_ids[perm], cells[perm], headings[perm], k=3, seed=4, rule="random"),
                          classes[perm])
    other_seed = initial_classes(image_ids, cells, headings, k=3, seed=5, rule="random")
    assert not np.array_equal(other_seed, classes)


def test_heading_stays_the_default_rule():
    image_ids, cells, headings = cells_with_headings()
    default = initial_classes(image_ids, cells, headings, k=3, seed=4)
    assert np.array_equal(default, initial_classes(image_ids, cells, headings, k=3, seed=4, rule="heading"))
    # cell 1 by heading: the two directions are two classes of 5, never mixed
    assert sorted(np.bincount(default[:10]).tolist()) == [5, 5]
    assert len(set(default[:10][headings[:10] == 10.0].tolist())) == 1
    # cell 2 has an unknown heading: the same random split as rule "random"
    assert np.array_equal(default[10:17], random_classes(image_ids, cells, 3, seed=4)[10:17])


def test_the_initial_setting_is_checked_and_recorded_by_name():
    assert ReclusterConfig().initial == "heading" and set(INITIAL_SPLITS) == {"heading", "random"}
    with pytest.raises(ValueError, match="initial must be one of heading, random, got 'sideways'"):
        ReclusterConfig(initial="sideways").validate()
    with pytest.raises(ValueError, match="initial must be one of heading, random"):
        from_mapping(ReclusterConfig, {"initial": "Random"})
    with pytest.raises(ValueError, match="unknown initial split 'kmeans'; valid: heading, random"):
        initial_classes(np.arange(3), np.zeros(3, np.int64), None, rule="kmeans")
    args = build_parser().parse_args(["--shards", "s", "--labels", "l", "--initial", "random", "--k", "6"])
    assert config_from_args(ReclusterConfig, args) == ReclusterConfig(k=6, initial="random")


# --- the untrained model, no Ray -----------------------------------------------------------

TINY_MUTUALVPR = dict(  # configs/mutualvpr_vitb.yaml's model on the tiny DINOv2-shaped encoder
    stage="finetune", trainable_last_blocks=0, pair_classifier=False, ms_weight=0.0, pair_bce_weight=0.0,
    cosface_scale=60.0, cosface_margin=0.5, cosface_groups=3, seed=7,
    batch=dict(images_per_place=1, places_per_batch=4),
    encoder=dict(name="vit_tiny_dinov2_test", image_size=28, descriptor_dim=16, pooling="gem", adapter="mulconv",
                 resize="squash"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A recipe file and the encoder weights file it names (timm layout, values far from any init)."""
    folder = tmp_path_factory.mktemp("recipe")
    encoder = encoder_spec(TINY_MUTUALVPR["encoder"]["name"]).build(TINY_MUTUALVPR["encoder"]["image_size"])
    fill_like_trained(encoder, 3, lambda name, p: p.ndim == 1 and ("norm" in name or "gamma" in name))
    torch.save(encoder.state_dict(), folder / "weights.pth")
    path = folder / "mutualvpr_tiny.yaml"
    with_weights = {**TINY_MUTUALVPR["encoder"], "weights": str(folder / "weights.pth")}
    path.write_text(yaml.safe_dump({**TINY_MUTUALVPR, "encoder": with_weights}))
    return path


def test_the_untrained_model_is_the_one_training_starts_from(recipe, tmp_path):
    path = write_untrained_model(recipe, tmp_path / UNTRAINED_SUBDIR)
    assert path.name == f"model-{file_sha256(path)[:12]}.pt" and path.parent == tmp_path / UNTRAINED_SUBDIR
    model, encoder_cfg = load_model_checkpoint(path)
    cfg = from_mapping(TrainConfig, yaml.safe_load(recipe.read_text()))
    assert encoder_cfg == dataclasses.replace(cfg.encoder, weights=None)
    assert json.loads(path.with_suffix(".json").read_text())["encoder"]["weights"] == cfg.encoder.weights

    torch.manual_seed(cfg.seed)  # as trainer/train.py: seed, then the model with the label version's rows
    trainer_start = global_model_of(build_finetune_model(cfg, 40, group_class_ids=[[0, 1], [2], [3, 4]]), cfg)
    expected = trainer_start.state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in got)
    weights = torch.load(Path(cfg.encoder.weights), weights_only=True)
    assert all(torch.equal(got[f"encoder.{name}"], tensor) for name, tensor in weights.items())  # DINOv2's
    adapter_up = [name for name in got if ".adapter." in name and name.endswith("weight") and got[name].ndim == 2]
    assert adapter_up and any(not got[name].any() for name in adapter_up)  # a new adapter adds nothing yet

    with pytest.raises(ConfigError, match="give a stage-2 \\(finetune\\) config"):
        pretrain = tmp_path / "pretrain.yaml"
        pretrain.write_text(yaml.safe_dump({"stage": "pretrain"}))
        write_untrained_model(pretrain, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# --- both commands on a local Ray ----------------------------------------------------------


@pytest.mark.ray
def test_untrained_model_writes_a_kmeans_v0_once(shard_dir, recipe, tmp_path, capsys):  # noqa: F811
    labels = tmp_path / "labels"
    assert run("--shards", shard_dir, "--labels", labels, "--k", "3", "--untrained-model", recipe,
               "--batch-size", "32", "--plots-cells", "0", "--num-cpus", "2") == 0
    assert "label version v0000 (kmeans)" in capsys.readouterr().out
    manifest = read_manifest(labels, 0)
    models = sorted((labels / UNTRAINED_SUBDIR).glob("*.pt"))
    assert len(models) == 1 and manifest.method == "kmeans" and manifest.previous_version is None
    assert manifest.encoder_checkpoint == str(models[0].resolve()) and manifest.encoder_sha256 == file_sha256(models[0])
    assert manifest.params["encoder_config"]["adapter"] == "mulconv" and manifest.params["config"]["k"] == 3
    v0 = read_labels(labels, 0, verify=True)
    assert np.array_equal(v0.column("image_id").to_numpy(), shard_image_ids(shard_dir))
    assert np.isfinite(v0.column("distance").to_numpy()).all()  # K-means distances: not an initial split

    assert run("--shards", shard_dir, "--labels", labels, "--untrained-model", recipe) == 2
    assert "already holds label versions (latest v0000)" in capsys.readouterr().err
    assert latest_version(labels) == 0 and len(list((labels / UNTRAINED_SUBDIR).glob("*.pt"))) == 1
    assert run("--shards", shard_dir, "--labels", labels, "--untrained-model", recipe, "--checkpoint", models[0]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.ray
def test_initial_random_is_recorded_and_splits_cells_near_equally(shard_dir, tmp_path):  # noqa: F811
    labels = tmp_path / "labels"
    assert run("--shards", shard_dir, "--labels", labels, "--k", "4", "--initial", "random", "--plots-cells", "0") == 0
    manifest = read_manifest(labels, 0)
    assert manifest.method == "initial" and manifest.params["config"]["initial"] == "random"
    table = read_labels(labels, 0, verify=True)
    cells, classes = table.column("cell_id").to_numpy(), table.column("class_in_cell").to_numpy()
    for cell in np.unique(cells):
        sizes = np.bincount(classes[cells == cell])
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1 and len(sizes) == min(4, int((cells == cell).sum()))
    assert run("--shards", shard_dir, "--labels", tmp_path / "by_heading", "--k", "4", "--plots-cells", "0") == 0
    assert read_manifest(tmp_path / "by_heading", 0).params["config"]["initial"] == "heading"
