"""MutualVPR's training pieces (configs/mutualvpr_vitb.yaml): CosPlace groups, one CosFace classifier
per group trained round-robin, the frozen encoder with MulConv adapters, the classifiers' own LR, no
pair classifier, hue jitter; and one short DeepSpeed CPU run of a tiny version (marked slow).

MutualVPR's facts are from Gucci233/MutualVPR at bd373c6 (datasets/train_dataset.py, train.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from placeforge.clustering.cells import assign_cells, group_of_cell
from placeforge.clustering.labels import label_table, write_label_set
from placeforge.models.encoders import EncoderConfig
from placeforge.models.heads import CosFaceGroups
from placeforge.raysession import free_port
from placeforge.shards.reader import PlaceSample
from placeforge.trainer.augment import AugmentConfig, crop_jitter, hue_jitter
from placeforge.trainer.batches import GroupBatch
from placeforge.trainer.cosface_groups import (
    cosface_group_of_epoch,
    group_class_ids,
    group_image_ids,
    index_of_images,
    keep_images,
)
from placeforge.trainer.data import BatchGeometry, make_loader
from placeforge.trainer.engine import activate_cosface_group, build_optimizer, finetune_step, regroup_cosface
from placeforge.trainer.schedules import set_optimizer_values
from placeforge.trainer.sections import OptimizerConfig
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model
from tests.conftest import REPO, jpeg_bytes
from tests.shardsets import write_shard_set


def mutualvpr_tiny(**overrides) -> TrainConfig:
    """configs/mutualvpr_vitb.yaml's training rules on the tiny DINOv2-shaped test encoder."""
    values = dict(stage="finetune", labels="x", encoder_init="random", trainable_last_blocks=0, pair_classifier=False,
                  encoder=EncoderConfig("vit_tiny_dinov2_test", 28, 16, "gem", adapter="mulconv"),
                  ms_weight=0.0, pair_bce_weight=0.0, cosface_scale=60.0, cosface_margin=0.5, cosface_groups=3,
                  batch=BatchGeometry(places_per_batch=4, images_per_place=1),
                  optimizer=OptimizerConfig(base_lr=1e-5, classifier_lr=1e-2, lr_scaling="none", layer_decay=1.0,
                                            weight_decay=0.0, weight_decay_end=0.0))
    cfg = TrainConfig(**{**values, **overrides})
    cfg.validate()
    return cfg


# ---- groups: the mod-N rule and the round-robin order ----


def official_group(east_m: float, north_m: float, cell_size_m: int = 10, cells_apart: int = 5) -> tuple[int, int]:
    """MutualVPR's TrainDataset.get__class_id__group_id, written out: (east mod M N) // M, same for north."""
    rounded_east, rounded_north = int(east_m // cell_size_m * cell_size_m), int(north_m // cell_size_m * cell_size_m)
    span = cell_size_m * cells_apart
    return rounded_east % span // cell_size_m, rounded_north % span // cell_size_m


def test_cells_five_apart_share_a_group_and_neighbours_never_do():
    col = np.array([0, 5, 0, 5, -5, 10, 1, 0, 4])
    row = np.array([0, 0, 5, 5, 10, -15, 0, 1, 4])
    groups = group_of_cell(col, row)
    assert groups[:6].tolist() == [0] * 6  # 5 cells (50 m) apart in east, north or both, negative ones too
    assert groups[6] == 5 and groups[7] == 1 and groups[8] == 24  # (col mod 5) * 5 + (row mod 5)
    block = np.array(np.meshgrid(np.arange(5), np.arange(5))).reshape(2, -1)  # a 5 x 5 block of cells
    assert sorted(group_of_cell(block[0], block[1]).tolist()) == list(range(25))  # all 25 groups, once each


def test_groups_of_utm_images_follow_mutualvpr_rule():
    rng = np.random.default_rng(0)
    east, north = rng.uniform(540_000, 541_000, 200), rng.uniform(4_180_000, 4_181_000, 200)
    cells = assign_cells(np.full(200, 10), np.ones(200, bool), east, north, np.zeros(200), np.full(200, ""),
                         cell_size_m=10.0, cells_apart=5)
    expected = [a * 5 + b for a, b in (official_group(e, n) for e, n in zip(east, north))]
    assert cells.group_id.tolist() == expected
    assert len(set(expected)) == 25


def test_epochs_train_the_groups_round_robin():
    # train.py: current_group_num = epoch_num % groups_num, groups_num 8
    assert [cosface_group_of_epoch(e, 8) for e in range(18)] == [*range(8), *range(8), 0, 1]
    with pytest.raises(ValueError):
        cosface_group_of_epoch(0, 0)


def test_group_class_ids_are_each_groups_classes_sorted():
    group = np.array([0, 1, 0, 2, 1, 0, 9])
    class_id = np.array([7, 3, 2, 5, 3, 7, 11])
    rows = group_class_ids(group, class_id, groups_used=3)
    assert [r.tolist() for r in rows] == [[2, 7], [3], [5]]  # group 9 is not used: its class is in none
    assert group_image_ids(np.array([40, 10, 30, 20]), np.array([1, 0, 1, 1]), 1).tolist() == [20, 30, 40]


def test_keep_images_leaves_a_groups_images_and_drops_emptied_samples():
    def sample(place: int, ids: tuple[int, ...]) -> PlaceSample:
        return PlaceSample(f"k{place}", place, f"p{place}", ids, tuple(b"%d" % i for i in ids),
                           tuple({"image_id": i} for i in ids))

    samples = [sample(1, (10, 11, 12)), sample(2, (20, 21)), sample(3, (30,))]
    kept = list(keep_images(samples, np.array([11, 12, 30])))
    assert [(s.place_id, s.image_ids, s.jpegs) for s in kept] == [(1, (11, 12), (b"11", b"12")), (3, (30,), (b"30",))]
    assert [m["image_id"] for m in kept[0].meta] == [11, 12] and kept[1] is samples[2]  # untouched when all kept
    index = pa.table({"image_id": [10, 11, 12, 20, 21, 30], "shard_index": [0, 0, 0, 1, 1, 1]})
    assert index_of_images(index, np.array([11, 12, 30])).column("image_id").to_pylist() == [11, 12, 30]


# ---- per-group classifiers ----


def test_only_the_active_groups_classifier_scores_and_gets_a_gradient():
    heads = CosFaceGroups(4, [[2, 7], [3, 5, 9], []], scale=60.0, margin=0.5)
    heads.active = 1
    descriptors = torch.randn(5, 4, requires_grad=True)
    class_ids = torch.tensor([3, 7, 9, -1, 5])
    logits, targets = heads(descriptors, class_ids)
    assert targets.tolist() == [0, 2, 1] and logits.shape == (3, 3)  # classes 3, 9, 5 are rows 0, 2, 1 of group 1
    torch.nn.functional.cross_entropy(logits, targets).backward()
    assert [h.weight.grad is not None for h in heads.classifiers] == [False, True, False]
    assert heads.classifiers[2].num_classes == 1  # an empty group keeps one row, never a target


def test_regroup_keeps_the_rows_of_kept_classes():
    heads = CosFaceGroups(4, [[2, 7], [3, 5]])
    before = [h.weight.detach().clone() for h in heads.classifiers]
    sources = heads.regroup([[2, 7, 12], [5, 13]])  # group 0 gains 12; group 1 loses 3, gains 13
    assert [s.tolist() for s in sources] == [[0, 1, -1], [1, -1]]
    assert torch.equal(heads.classifiers[0].weight[:2], before[0])
    assert torch.equal(heads.classifiers[1].weight[0], before[1][1])  # class 5 moved from row 1 to row 0
    assert heads.class_ids_of(1).tolist() == [5, 13]


# ---- the model, its trained parameters and its optimizer ----


def test_adapters_train_and_no_dinov2_weight_does():
    model = build_finetune_model(mutualvpr_tiny(), 1, group_class_ids=[[0], [1], [2]])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = {n for n in trained if n.startswith("global_model.encoder.")}
    assert encoder and all(".mlp.adapter." in n for n in encoder)
    assert len({n.split(".")[3] for n in encoder}) == 2  # every block of the tiny encoder has its adapter
    assert {n for n in trained if n not in encoder} == {"global_model.gem.p", "global_model.head.weight",
                                                        "global_model.head.bias",
                                                        *(f"cosface_groups.classifiers.{g}.weight" for g in range(3))}
    assert model.pair is None and not any(n.startswith("pair.") for n, _ in model.named_parameters())


def test_without_adapters_the_last_blocks_still_train():
    cfg = TrainConfig(stage="finetune", labels="x", encoder=EncoderConfig(image_size=28, descriptor_dim=8),
                      trainable_last_blocks=1)
    model = build_finetune_model(cfg, num_classes=3)
    blocks = {n.split(".")[3] for n, p in model.named_parameters()
              if p.requires_grad and n.startswith("global_model.encoder.blocks.")}
    assert blocks == {"3"} and model.pair is not None and model.cosface_groups is None


def test_adapters_refuse_trained_blocks_and_no_pair_classifier_refuses_its_loss():
    with pytest.raises(ValueError, match="trainable_last_blocks 0"):
        mutualvpr_tiny(trainable_last_blocks=6)
    with pytest.raises(ValueError, match="pair_bce_weight 0"):
        mutualvpr_tiny(pair_bce_weight=2.0, batch=BatchGeometry(places_per_batch=4, images_per_place=2))
    with pytest.raises(ValueError, match="images_per_place"):
        mutualvpr_tiny(ms_weight=1.0)  # one image per place: MS would have no positive
    with pytest.raises(ValueError, match="zero_stage 0"):
        mutualvpr_tiny(zero_stage=2)


def test_classifier_lr_follows_the_schedule_at_its_own_peak_and_only_the_active_group_moves():
    cfg = mutualvpr_tiny()
    model = build_finetune_model(cfg, 1, group_class_ids=[[0, 1], [2], [3, 4]])
    optimizer = build_optimizer(model, cfg)
    activate_cosface_group(model, optimizer, 2)
    for factor in (1.0, 0.3):  # any point of the schedule: the two peaks keep their ratio
        set_optimizer_values(optimizer, lr=cfg.optimizer.base_lr * factor, weight_decay=0.0)
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        heads = model.cosface_groups.classifiers
        assert lrs[id(heads[2].weight)] == pytest.approx(1e-2 * factor)
        assert lrs[id(heads[0].weight)] == lrs[id(heads[1].weight)] == 0.0
        assert lrs[id(model.global_model.head.weight)] == pytest.approx(1e-5 * factor)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = GroupBatch(torch.randint(0, 255, (4, 3, 28, 28), dtype=torch.uint8), torch.arange(4), torch.arange(4),
                       torch.tensor([3, 4, 0, 2]))  # two images of group 2, one each of groups 0 and 1
    terms = finetune_step(model, batch, cfg, torch.device("cpu"))
    assert terms["ms"] == 0 and terms["pair_bce"] == 0 and terms["cosface"] > 0
    terms["loss"].backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "cosface_groups.classifiers.2.weight" in changed
    assert not changed & {"cosface_groups.classifiers.0.weight", "cosface_groups.classifiers.1.weight"}
    assert not any(n.startswith("global_model.encoder.") and ".adapter." not in n for n in changed)


def test_regroup_keeps_adam_moments_of_kept_rows_and_the_active_group():
    cfg = mutualvpr_tiny()
    model = build_finetune_model(cfg, 1, group_class_ids=[[0, 1], [2], [3, 4]])
    optimizer = build_optimizer(model, cfg)
    activate_cosface_group(model, optimizer, 0)
    batch = GroupBatch(torch.randint(0, 255, (4, 3, 28, 28), dtype=torch.uint8), torch.arange(4), torch.arange(4),
                       torch.tensor([0, 1, 0, 1]))
    finetune_step(model, batch, cfg, torch.device("cpu"))["loss"].backward()
    optimizer.step()
    old = optimizer.state[model.cosface_groups.classifiers[0].weight]["exp_avg"].clone()  # [2, D]
    new_optimizer = regroup_cosface(model, optimizer, cfg, [[1, 5], [2], [3, 4]])  # class 0 retired, 5 new
    head = model.cosface_groups.classifiers[0]
    state = new_optimizer.state[head.weight]
    assert torch.equal(state["exp_avg"][0], old[1]) and not state["exp_avg"][1].any()
    assert model.cosface_groups.active == 0 and head.weight.requires_grad
    assert not model.cosface_groups.classifiers[1].weight.requires_grad


# ---- augmentation ----


def test_hue_jitter_turns_colours_and_leaves_grey_alone():
    colour = torch.zeros(2, 3, 4, 4)
    colour[:, 0] = 1.0  # pure red
    grey = torch.full((2, 3, 4, 4), 0.5)
    shifted = hue_jitter(colour, np.random.default_rng(0), 0.5)
    assert not torch.allclose(shifted, colour)
    assert torch.allclose(hue_jitter(grey, np.random.default_rng(0), 0.5), grey, atol=1e-6)
    again = hue_jitter(colour, np.random.default_rng(0), 0.5)
    assert torch.equal(shifted, again)  # the worker's generator alone decides
    jpeg = [jpeg_bytes(3, size=(64, 64))]
    plain = crop_jitter(jpeg, 28, np.random.default_rng(1), AugmentConfig(hue=0.0))
    with_hue = crop_jitter(jpeg, 28, np.random.default_rng(1), AugmentConfig(hue=0.5))
    assert plain.shape == with_hue.shape == (1, 3, 28, 28) and not torch.equal(plain, with_hue)


# ---- a tiny MutualVPR run: real shards, labels, DeepSpeed on CPU ----


def write_grouped_data(root: Path) -> dict:
    """4 shards x 6 places x 2 images; a place's images are in CosPlace group place mod 2, two view
    classes per place (image parity)."""
    layout = [[(s * 6 + p, 2) for p in range(6)] for s in range(4)]
    ids = write_shard_set(root / "shards", layout, lambda place, sample, i: (place * 1000 + i,
                                                                           jpeg_bytes(place * 1000 + i, (64, 64))),
                          short_side=64)
    ids = np.array(sorted(ids), dtype=np.int64)
    place = ids // 1000
    table = label_table(ids, place, np.array([f"p{p}" for p in place], dtype=object), place % 2, ids % 2,
                        place * 2 + ids % 2, None, 0)
    write_label_set(root / "labels", table, k=2, seed=0, cell_size_m=10.0, previous_version=None,
                    retired_class_ids=[], next_class_id=int(place.max()) * 2 + 2, images_changed_class=None,
                    images_new=len(ids))
    return {"shards": root / "shards", "labels": root / "labels", "image_ids": ids, "group": place % 2}


def model_states(out: Path, tag: str) -> dict[str, torch.Tensor]:
    path = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def test_the_loader_reads_only_the_epochs_group_for_the_same_steps_on_every_rank(tmp_path):
    data = write_grouped_data(tmp_path)
    geometry = BatchGeometry(places_per_batch=2, images_per_place=1)
    seen, steps = [], []
    for rank in (0, 1):
        loader, count = make_loader(data["shards"], "groups", rank=rank, world_size=2, num_workers=0,
                                    geometry=geometry, image_size=28, epoch=0, seed=0, labels_dir=data["labels"],
                                    cosface_group=1)
        batches = list(loader)
        assert len(batches) == count
        steps.append(count)
        seen += [int(i) for b in batches for i in b.image_ids]
    group_of = dict(zip(data["image_ids"].tolist(), data["group"].tolist()))
    assert steps[0] == steps[1] >= 2 and {group_of[i] for i in seen} == {1}
    _, all_steps = make_loader(data["shards"], "groups", rank=0, world_size=2, num_workers=0, geometry=geometry,
                               image_size=28, epoch=0, seed=0, labels_dir=data["labels"])
    assert all_steps > steps[0]  # the other group's places no longer count
    with pytest.raises(ValueError, match="cosface_group"):
        make_loader(data["shards"], "pairs", rank=0, world_size=1, num_workers=0, geometry=geometry, image_size=28,
                    epoch=0, seed=0, cosface_group=0)


def run_train(args: list[str]) -> str:
    """One single-process `trainer.train` run (DeepSpeed on CPU, gloo) to completion; its stdout."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "placeforge.trainer.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def steps_of(out: Path) -> list[dict]:
    return [s for s in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in s]


def digest_of(stdout: str) -> str:
    return [line.split()[-1] for line in stdout.splitlines() if "final weights sha256" in line][0]


def tiny_run_args(data: dict) -> list[str]:
    """A 3-epoch MutualVPR-style run (2 groups, 2 steps an epoch) on `write_grouped_data`, no --out."""
    return ["--stage", "finetune", "--shards", str(data["shards"]), "--labels", str(data["labels"]),
            "--encoder.name", "vit_tiny_dinov2_test", "--encoder-init", "random", "--encoder.image-size", "56",
            "--encoder.descriptor-dim", "32", "--encoder.pooling", "gem", "--encoder.adapter", "mulconv",
            "--trainable-last-blocks", "0",
            "--pair-classifier", "false", "--ms-weight", "0", "--pair-bce-weight", "0", "--cosface-scale", "60",
            "--cosface-margin", "0.5", "--cosface-groups", "2", "--batch.places-per-batch", "4", "--batch.images-per-place", "1",
            "--optimizer.base-lr", "1e-3", "--optimizer.classifier-lr", "1e-1", "--optimizer.lr-scaling", "none",
            "--optimizer.layer-decay", "1.0", "--optimizer.warmup-epochs", "0", "--optimizer.weight-decay", "0",
            "--optimizer.weight-decay-end", "0", "--optimizer.clip-grad", "0", "--augment.scale", "0.5,1.0",
            "--augment.brightness", "0.7", "--augment.contrast", "0.7", "--augment.saturation", "0.7",
            "--augment.hue", "0.5",
            "--epochs", "3", "--max-steps-per-epoch", "2", "--num-workers", "0", "--weights-digest"]


@pytest.mark.slow
def test_a_tiny_mutualvpr_run_trains_each_epochs_group_and_only_it(tmp_path):
    data = write_grouped_data(tmp_path)
    out = tmp_path / "run"
    common = tiny_run_args(data)
    straight = digest_of(run_train([*common, "--out", str(out)]))
    steps = steps_of(out)
    assert len(steps) == 6 and all(s["ms"] == 0 and s["pair_bce"] == 0 and s["cosface"] > 0 for s in steps)
    after = [model_states(out, f"epoch{e:04d}-step0") for e in (1, 2, 3)]  # after epochs 0 (group 0), 1, 2 (group 0)
    heads = [f"cosface_groups.classifiers.{g}.weight" for g in (0, 1)]
    for (before, later), trained in (((0, 1), 1), ((1, 2), 0)):  # epoch 1 trains group 1, epoch 2 group 0
        assert not torch.equal(after[before][heads[trained]], after[later][heads[trained]])
        assert torch.equal(after[before][heads[1 - trained]], after[later][heads[1 - trained]])
    frozen = [n for n in after[0] if n.startswith("global_model.encoder.") and ".adapter." not in n
              and "running_" not in n and "num_batches" not in n]
    assert frozen and all(torch.equal(after[0][n], after[2][n]) for n in frozen)  # DINOv2 weights never move
    adapters = [n for n in after[0] if ".adapter." in n and n.endswith("up.weight")]
    assert adapters and any(not torch.equal(after[0][n], after[2][n]) for n in adapters)
    assert not any(n.startswith("pair.") for n in after[0])  # no decoder trained or saved

    # Stopped in epoch 1 (group 1) and resumed: the groups' classifiers and their optimizer state come back.
    resumed = tmp_path / "resumed"
    run_train([*common, "--out", str(resumed), "--stop-after-steps", "3"])
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "epoch0001-step1"
    assert digest_of(run_train([*common, "--out", str(resumed), "--resume"])) == straight
    assert [r["loss"] for r in steps_of(resumed)] == [r["loss"] for r in steps]  # exact, CPU fp32
