"""Training end to end: real DeepSpeed (CPU, gloo) on a tiny shard set, each run in a subprocess
so DeepSpeed's process group never leaks into pytest.

Shard sets are written with the real shard writer (as tests/test_data.py) from textured
JPEGs (conftest.jpeg_bytes): flat colours would make MAE's per-patch-normalised target noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from placeforge.clustering.labels import label_table, write_label_set
from placeforge.fileio import output_lock
from placeforge.models.encoders import EncoderConfig
from placeforge.raysession import free_port
from placeforge.trainer.engine import build_optimizer, grow_cosface
from placeforge.trainer.sections import BatchGeometry, OptimizerConfig
from placeforge.trainer.train_config import TrainConfig, deepspeed_config
from tests.conftest import REPO, jpeg_bytes
from tests.shardsets import write_shard_set

pytestmark = pytest.mark.slow

TINY = ["--encoder.name", "vit_tiny_test", "--decoder", "dec64d2b", "--encoder.image-size", "56",
        "--encoder.descriptor-dim", "32", "--num-workers", "0", "--optimizer.warmup-epochs", "0",
        "--optimizer.lr-scaling", "none", "--optimizer.base-lr", "1e-3", "--optimizer.layer-decay", "1.0",
        "--optimizer.weight-decay", "0.0", "--optimizer.weight-decay-end", "0.0", "--optimizer.clip-grad", "1.0"]


def write_shards(root: Path, layout: list[list[tuple[int, int]]]) -> list[int]:
    """layout[shard] = [(place, images), ...]; returns every image id written."""

    def image(place: int, sample_index: int, i: int) -> tuple[int, bytes]:
        return place * 1000 + i, jpeg_bytes(place * 1000 + i, size=(64, 64))

    return write_shard_set(root, layout, image, short_side=64)


def write_v0_labels(root: Path, image_ids: list[int]) -> int:
    """Two view classes per place (image parity); returns next_class_id."""
    ids = np.array(sorted(image_ids), dtype=np.int64)
    n = len(ids)
    classes = (ids // 1000) * 2 + ids % 2
    next_class_id = int(classes.max()) + 1
    table = label_table(ids, ids // 1000, np.array([f"p{i // 1000}" for i in ids], dtype=object), np.zeros(n),
                        np.zeros(n), classes, None, 0)
    write_label_set(root, table, k=2, seed=0, cell_size_m=15.0, previous_version=None, retired_class_ids=[],
                    next_class_id=next_class_id, images_changed_class=None, images_new=n)
    return next_class_id


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ids = write_shards(root / "shards", [[(s * 6 + p, 4) for p in range(6)] for s in range(4)])  # 24 places x 4
    classes = write_v0_labels(root / "labels", ids)
    return {"root": root, "shards": root / "shards", "labels": root / "labels", "classes": classes}


def launch(args: list[str], rank: int = 0, world_size: int = 1, port: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "placeforge.trainer.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_two_ranks(args: list[str], timeout: float = 180) -> list[str]:
    """Both ranks of a 2-process gloo run to completion; their stdout."""
    port = free_port()
    processes = [launch(args, rank, 2, port) for rank in (0, 1)]
    outputs = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise AssertionError("2-rank run hung")
        assert process.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs


def train(args: list[str], expect_rc: int = 0, timeout: float = 180) -> subprocess.CompletedProcess:
    process = launch(args)
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == expect_rc, stderr[-3000:]
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps_of(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "step" in m]


def pretrain_args(data, out: Path, *extra: str) -> list[str]:
    return ["--stage", "pretrain", "--shards", str(data["shards"]), "--out", str(out), "--batch.pairs-per-batch", "4",
            *TINY, *extra]


def test_pretrain_loss_goes_down_and_outputs_are_written(data, tmp_path):
    out = tmp_path / "pre"
    train(pretrain_args(data, out, "--epochs", "3", "--max-steps-per-epoch", "6", "--optimizer.base-lr", "2e-3",
                        "--keep-checkpoints", "2"))
    rows = steps_of(out)
    assert len(rows) == 18 and [r["step"] for r in rows] == list(range(1, 19))
    for key in ("step", "epoch", "loss", "mim", "lr", "images_per_s", "data_wait_s"):
        assert all(key in r for r in rows), key
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
    assert json.loads((out / "train_config.json").read_text())["stage"] == "pretrain"
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4 and "optimizer" not in ds and ds["bf16"]["enabled"] is False
    from placeforge.models.checkpoint import load_model_checkpoint

    model, cfg = load_model_checkpoint(out / "export" / "model_epoch0002.pt")
    assert cfg.descriptor_dim == 32 and model(torch.zeros(1, 3, 56, 56)).shape == (1, 32)
    assert (out / "export" / "mim_epoch0002.pt").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch0003-step0"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["epoch0002-step0",
                                                                                   "epoch0003-step0"]
    assert [m["tags"] for m in metrics(out) if m.get("event") == "checkpoints_pruned"] == [["epoch0001-step0"]]


def test_finetune_from_stage1_loss_goes_down(data, tmp_path):
    pre = tmp_path / "pre"
    train(pretrain_args(data, pre, "--epochs", "1", "--max-steps-per-epoch", "2"))
    out = tmp_path / "fine"
    train(["--stage", "finetune", "--shards", str(data["shards"]), "--labels", str(data["labels"]), "--out", str(out),
           "--batch.places-per-batch", "4", "--batch.images-per-place", "4", "--init-from", str(pre / "export/mim_epoch0000.pt"),
           "--trainable-last-blocks", "2", "--epochs", "4", *TINY, "--optimizer.base-lr", "1e-3"])
    rows = steps_of(out)
    for key in ("loss", "ms", "pair_bce", "cosface", "lr", "images_per_s", "data_wait_s", "label_version"):
        assert all(key in r for r in rows), key
    assert all(r["label_version"] == 0 for r in rows) and len(rows) >= 8
    losses = [r["loss"] for r in rows]
    k = max(2, len(losses) // 4)
    assert np.mean(losses[-k:]) < 0.9 * np.mean(losses[:k]), losses
    state = json.loads((out / "checkpoints" / "epoch0004-step0" / "train_state.json").read_text())
    assert state["num_classes"] == data["classes"] and state["label_version"] == 0


def test_resume_mid_epoch_and_at_an_epoch_boundary_matches_a_straight_run(data, tmp_path):
    common = ("--epochs", "2", "--max-steps-per-epoch", "4")
    straight = tmp_path / "straight"
    train(pretrain_args(data, straight, *common))
    resumed = tmp_path / "resumed"
    train(pretrain_args(data, resumed, *common, "--stop-after-steps", "2"))  # mid-epoch 0
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "epoch0000-step2"
    train(pretrain_args(data, resumed, *common, "--resume", "--stop-after-steps", "4"))  # to the boundary
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "epoch0001-step0"
    train(pretrain_args(data, resumed, *common, "--resume"))
    a, b = steps_of(straight), steps_of(resumed)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact, CPU fp32
    assert [r["lr"] for r in a] == [r["lr"] for r in b]


def test_a_misspelled_key_fails_with_the_closest_name(data, tmp_path, capsys):
    from placeforge.trainer.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("mask_ratoi: 0.75\n")
    assert main(["--config", str(bad), "--shards", str(data["shards"])]) == 2
    assert "did you mean 'mask_ratio'" in capsys.readouterr().err


def test_a_diverging_run_stops_with_a_message_and_a_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    result = train(pretrain_args(data, out, "--epochs", "1", "--max-steps-per-epoch", "6",
                                 "--optimizer.base-lr", "1e30", "--optimizer.clip-grad", "0"), expect_rc=3)
    assert "loss is not finite" in result.stderr
    diverged = list((out / "checkpoints").glob("diverged-*/train_state.json"))
    assert len(diverged) == 1
    assert not (out / "checkpoints" / "latest").exists()  # nothing good was ever saved


def test_deepspeed_config_follows_the_train_config():
    cfg = TrainConfig(stage="finetune", batch=BatchGeometry(places_per_batch=10, images_per_place=4), zero_stage=2,
                      optimizer=OptimizerConfig(clip_grad=1.5))
    ds = deepspeed_config(cfg, world_size=8, device_type="cuda")
    assert ds["train_micro_batch_size_per_gpu"] == 40 and ds["train_batch_size"] == 320
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.5 and ds["bf16"]["enabled"]
    assert not deepspeed_config(cfg, 1, "cpu")["bf16"]["enabled"]


def test_growing_cosface_keeps_rows_and_adam_moments():
    from placeforge.trainer.train_models import build_finetune_model

    cfg = TrainConfig(stage="finetune", labels="x", encoder=EncoderConfig(image_size=28, descriptor_dim=8),
                      trainable_last_blocks=1)
    model = build_finetune_model(cfg, num_classes=3)
    optimizer = build_optimizer(model, cfg)
    model.cosface.weight.sum().backward()
    optimizer.step()
    old_rows = model.cosface.weight.detach().clone()
    old_moment = optimizer.state[model.cosface.weight]["exp_avg"].clone()
    new = grow_cosface(model, optimizer, cfg, 5)
    weight = model.cosface.weight
    assert weight.shape == (5, 8) and torch.equal(weight[:3], old_rows)
    assert torch.equal(new.state[weight]["exp_avg"][:3], old_moment) and not new.state[weight]["exp_avg"][3:].any()
    assert any(weight is p for g in new.param_groups for p in g["params"])


def test_two_ranks_on_uneven_shards_finish_with_identical_weights(tmp_path):
    sizes = [1, 2, 7, 3, 9, 2]  # places per shard, deliberately uneven
    layout, place = [], 0
    for n in sizes:
        layout.append([(place + j, 2 + j % 3) for j in range(n)])
        place += n
    shards = tmp_path / "uneven"
    write_shards(shards, layout)
    args = ["--stage", "pretrain", "--shards", str(shards), "--out", str(tmp_path / "ddp"), "--batch.pairs-per-batch", "2",
            "--epochs", "2", *TINY, "--num-workers", "1", "--weights-digest"]
    outputs = run_two_ranks(args, timeout=150)
    digests = [[line.split()[-1] for line in out.splitlines() if "final weights sha256" in line] for out in outputs]
    assert len(digests[0]) == 1 and digests[0] == digests[1]
    assert len(steps_of(tmp_path / "ddp")) > 0


def test_follow_latest_labels_switches_at_the_next_epoch_boundary(data, tmp_path):
    """An external relabel.py writes v1 while stage 2 runs on v0: the next epoch uses v1."""
    labels = tmp_path / "labels"
    import shutil

    shutil.copytree(data["labels"], labels)
    out = tmp_path / "fine"
    args = ["--stage", "finetune", "--shards", str(data["shards"]), "--labels", str(labels), "--out", str(out),
            "--batch.places-per-batch", "4", "--batch.images-per-place", "4", "--epochs", "2", "--max-steps-per-epoch", "2",
            "--follow-latest-labels", "true", *TINY]
    train([*args, "--stop-after-steps", "1"])  # mid epoch 0, on v0
    ids = np.array(sorted(i for i in range(24 * 1000) if i % 1000 < 4), dtype=np.int64)
    classes = (ids // 1000) * 2 + ids % 2 + 100  # new ids: CosFace must grow to 148 rows
    table = label_table(ids, ids // 1000, np.array([f"p{i // 1000}" for i in ids], dtype=object),
                        np.zeros(len(ids)), np.zeros(len(ids)), classes, None, 1)
    write_label_set(labels, table, k=2, seed=0, cell_size_m=15.0, previous_version=0, retired_class_ids=[],
                    next_class_id=int(classes.max()) + 1, images_changed_class=None, images_new=0)
    train([*args, "--resume"])
    rows = steps_of(out)
    assert [r["label_version"] for r in rows] == [0, 0, 1, 1]
    assert [m["label_version"] for m in metrics(out) if m.get("event") == "labels_followed"] == [1]
    state = json.loads((out / "checkpoints" / "epoch0002-step0" / "train_state.json").read_text())
    assert state["label_version"] == 1 and state["num_classes"] == int(classes.max()) + 1


def test_resume_with_another_recipe_is_refused_and_the_run_folder_kept(data, tmp_path):
    out = tmp_path / "pre"
    args = pretrain_args(data, out, "--epochs", "2", "--max-steps-per-epoch", "2")
    train([*args, "--stop-after-steps", "1"])
    saved = (out / "train_config.json").read_text()
    refused = train([*args, "--resume", "--optimizer.base-lr", "5e-3", "--num-workers", "1"], expect_rc=2)
    assert "was written with another config (optimizer.base_lr: 0.001 -> 0.005)" in refused.stderr
    assert (out / "train_config.json").read_text() == saved  # the run's record is not overwritten
    train([*args, "--resume", "--num-workers", "1"])  # loader workers may change on resume
    assert (out / "export" / "model_epoch0001.pt").is_file()


def test_a_second_run_into_the_same_out_is_refused_before_start_up(data, tmp_path, capsys):
    from placeforge.trainer.train import main

    out = tmp_path / "busy"
    with output_lock(out, "train"):
        assert main(["--config", str(REPO / "configs" / "demo_pretrain.yaml"), "--shards", str(data["shards"]),
                     "--out", str(out)]) == 2
    assert "is being written by train (host" in capsys.readouterr().err
    assert not (out / "train_config.json").exists()  # refused before anything was written


def test_cpu_threads_leave_room_for_the_loader_workers():
    from placeforge.trainer.train import cpu_threads

    assert cpu_threads(cores=2, ranks_on_node=1, loader_workers=1) == 1
    assert cpu_threads(cores=16, ranks_on_node=2, loader_workers=2) == 6
    assert cpu_threads(cores=2, ranks_on_node=2, loader_workers=2) == 1  # never 0


def test_latest_must_name_a_checkpoint_tag_inside_checkpoints(tmp_path):
    from placeforge.trainer.train_state import TrainState, read_latest, write_state

    write_state(tmp_path, "epoch0001-step0", TrainState(epoch=1), mark_latest=True)
    assert read_latest(tmp_path)[0] == "epoch0001-step0"
    for bad in ("../../shared/evil", "/etc", "epoch0001-step0/../../x", "diverged-epoch0001-step3"):
        (tmp_path / "latest").write_text(bad + "\n")
        with pytest.raises(ValueError, match="not a checkpoint tag"):
            read_latest(tmp_path)
