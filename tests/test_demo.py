"""The README's main job at the tiny preset: city -> catalog -> shards -> labels -> stage 1 -> stage 2."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from placeforge.clustering.labels import latest_version, read_labels
from placeforge.pipelines.cli import demo, main
from placeforge.shards.manifest import read_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_tiny_end_to_end(tmp_path, capfd):  # capfd: the trainer prints from its own process
    out = tmp_path / "demo"
    assert demo(["--out", str(out), "--preset", "tiny", "--num-cpus", "2"]) == 0
    printed = capfd.readouterr().out
    manifest = read_manifest(out / "shards")
    counts = manifest.counts
    assert counts["inputs"] == counts["in_shards"] + counts["rejected"] and counts["in_shards"] > 100
    assert f"{counts['in_shards']} images" in printed  # the read-back saw every image
    catalog = pq.read_table(out / "shards" / "catalog.parquet")
    assert set(catalog.column("source").to_pylist()) == {"atname", "gsv_cities"}
    assert set(catalog.column("utm_zone").to_pylist()) == {10, 55}  # San Francisco and Melbourne
    letters = set(catalog.column("utm_letter").to_pylist())
    assert any(l >= "N" for l in letters) and any(l < "N" for l in letters)
    # v0 from headings, then stage 2 reclustered once with its own model (tiny preset: after epoch 1).
    assert latest_version(out / "labels") == 1
    for version in (0, 1):
        labels = read_labels(out / "labels", version)
        assert sorted(labels.column("image_id").to_pylist()) == sorted(catalog.column("image_id").to_pylist())
    assert "finetune:" in printed and "data wait" in printed
    for stage in ("pretrain", "finetune"):
        assert (out / "train" / stage / "export" / "model_epoch0001.pt").is_file()
    # [7/7] recall of the untrained encoder and of the trained model, before and after re-ranking.
    # stage 2 measured recall on the validation split every epoch and kept the best one
    validation = json.loads((out / "train" / "finetune" / "export" / "validation.json").read_text())
    assert [r["epoch"] for r in validation["history"]] == [0, 1] and "validation Recall@1" in printed
    assert "Recall@N on the TEST split: 24 queries, 32 database images" in printed
    untrained = json.loads((out / "eval" / "untrained" / "report.json").read_text())
    trained = json.loads((out / "eval" / "trained" / "report.json").read_text())
    assert untrained["recall"]["reranked"] is None  # a bare encoder has no pair classifier
    assert trained["recall"]["reranked"] is not None and trained["checkpoint"].endswith("best_model.pt")
    assert trained["baseline"]["recall"]["1"] >= 0 and "raw pixels (16x16 thumbnails)" in printed
    for title, recall in (("untrained encoder", untrained["recall"]["global"]),
                          ("trained, re-ranked", trained["recall"]["reranked"])):
        assert f"{title}  {100 * recall['1']:6.1f}" in printed
    assert (out / "eval" / "trained" / "report.html").is_file()

    assert demo(["--out", str(out), "--preset", "tiny", "--num-cpus", "2"]) == 0  # a re-run reuses everything
    rerun = capfd.readouterr().out
    assert "nothing to do" in rerun and rerun.count("already trained") == 2
    assert latest_version(out / "labels") == 1


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    assert main([]) == 0
    assert "build-shards" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_demo_recipes_change_stage_two_only_and_the_tiny_city_keeps_its_sizes():
    from placeforge.config import from_mapping, load_file
    from placeforge.pipelines.cli import RECIPES, training_overrides
    from placeforge.trainer.train_config import TrainConfig

    assert training_overrides("default", "demo", 0) == ({}, {})
    stage1, stage2 = training_overrides("default", "long", 3)
    assert stage1 == {"seed": 3}  # stage 1 is shared: the long recipe reuses the demo's
    assert stage2 == {**RECIPES["long"], "seed": 3}
    recipe = from_mapping(TrainConfig, load_file("configs/demo_finetune.yaml"))
    assert stage2["epochs"] > recipe.epochs  # longer than the demo's own stage 2
    assert training_overrides("tiny", "long", 0)[1]["epochs"] == 2  # tests stay quick whatever the recipe
    with pytest.raises(SystemExit):
        demo(["--out", "x", "--recipe", "longer"])


def test_city_seed_renders_another_city_of_the_same_sizes():
    from placeforge.pipelines.cli import city_config

    default, other = city_config("default"), city_config("default", city_seed=7)
    assert other.seed == 7 and default.seed != 7
    assert {**vars(other), "seed": default.seed} == vars(default)  # only the seed differs
    assert city_config("tiny", 3).queries == city_config("tiny").queries
