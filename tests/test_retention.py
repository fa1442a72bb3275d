"""Checkpoint retention: which folders of OUT/checkpoints go, decided on names and real folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from placeforge.config import flat_dict, from_mapping, migrate, to_dict
from placeforge.models.encoders import EncoderConfig
from placeforge.trainer.augment import AugmentConfig
from placeforge.trainer.pairs import PairRule
from placeforge.trainer.sections import BatchGeometry, OptimizerConfig, ValidationConfig
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_state import (
    LATEST_FILE,
    STATE_FILE,
    TrainState,
    config_changes,
    prune_checkpoints,
    tag_order,
    tags_to_prune,
    write_state,
)


def checkpoint(root: Path, tag: str, complete: bool = True) -> None:
    """A checkpoint folder as the trainer leaves it: DeepSpeed's files, then train_state.json."""
    (root / tag).mkdir(parents=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        epoch, step = tag_order(tag)
        write_state(root, tag, TrainState(epoch=epoch, step_in_epoch=step), mark_latest=False)


def mark_latest(root: Path, tag: str) -> None:
    (root / LATEST_FILE).write_text(tag + "\n")


def test_tags_order_by_epoch_then_step_not_as_strings():
    assert tag_order("epoch0010-step0") > tag_order("epoch0009-step12")
    assert tag_order("epoch10000-step0") > tag_order("epoch9999-step0")
    assert tag_order("epoch0003-step10") > tag_order("epoch0003-step9")
    for name in ("diverged-epoch0003-step2", "epoch0003-step2.old", "epoch3-step2", "latest", "notes"):
        assert tag_order(name) is None


def test_the_newest_complete_checkpoints_stay():
    folders = {"epoch0009-step0": True, "epoch0010-step0": True, "epoch0008-step4": True, "epoch0010-step2": True}
    assert tags_to_prune(folders, keep_last=2, latest="epoch0010-step2") == ["epoch0008-step4", "epoch0009-step0"]
    assert tags_to_prune(folders, keep_last=0, latest="epoch0010-step2") == []  # 0 keeps all
    assert tags_to_prune(folders, keep_last=2, latest=None) == []  # nothing marked complete: nothing goes
    assert tags_to_prune(folders, keep_last=1, latest="epoch0010-step2", keep=["epoch0009-step0"]) == [
        "epoch0008-step4", "epoch0010-step0"]


def test_latest_stays_even_when_older_than_the_last_n():
    # A crash between train_state.json and `latest` leaves newer complete folders than `latest`.
    folders = {"epoch0001-step0": True, "epoch0002-step0": True, "epoch0003-step0": True, "epoch0004-step0": True}
    assert tags_to_prune(folders, keep_last=2, latest="epoch0001-step0") == ["epoch0002-step0"]


def test_an_incomplete_checkpoint_goes_only_when_older_than_latest():
    folders = {"epoch0001-step3": False, "epoch0002-step0": True, "epoch0003-step0": True, "epoch0003-step2": False}
    assert tags_to_prune(folders, keep_last=5, latest="epoch0003-step0") == ["epoch0001-step3"]


def test_pruning_real_folders_spares_diverged_foreign_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for epoch in range(1, 12):  # epoch0001 .. epoch0011: string order and number order differ from 0010 on
        checkpoint(root, f"epoch{epoch:04d}-step0")
    checkpoint(root, "epoch0011-step3", complete=False)  # a save that died half-way, newer than latest
    checkpoint(root, "epoch0002-step5", complete=False)  # one older than latest
    (root / "diverged-epoch0004-step2").mkdir()
    (root / "diverged-epoch0004-step2" / STATE_FILE).write_text("{}")
    (root / "epoch0003-step0-copy").mkdir()  # not a tag: someone else's
    (root / "notes").mkdir()
    mark_latest(root, "epoch0011-step0")

    removed = prune_checkpoints(root, keep_last=3, keep=["epoch0005-step0"])
    assert removed == ["epoch0001-step0", "epoch0002-step0", "epoch0002-step5", "epoch0003-step0", "epoch0004-step0",
                       "epoch0006-step0", "epoch0007-step0", "epoch0008-step0"]
    left = sorted(p.name for p in root.iterdir())
    assert left == ["diverged-epoch0004-step2", "epoch0003-step0-copy", "epoch0005-step0", "epoch0009-step0",
                    "epoch0010-step0", "epoch0011-step0", "epoch0011-step3", "latest", "notes"]

    mark_latest(root, "epoch0005-step0")  # `latest` rolled back by hand: it stays, however old
    assert prune_checkpoints(root, keep_last=1) == ["epoch0009-step0", "epoch0010-step0"]
    assert (root / "epoch0005-step0" / STATE_FILE).is_file() and (root / "epoch0011-step0").is_dir()


def test_pruning_keeps_everything_with_zero_or_without_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for epoch in range(5):
        checkpoint(root, f"epoch{epoch:04d}-step0")
    assert prune_checkpoints(root, keep_last=1) == []  # no `latest` yet: nothing is known complete
    mark_latest(root, "epoch0004-step0")
    assert prune_checkpoints(root, keep_last=0) == []
    assert len([p for p in root.iterdir() if p.is_dir()]) == 5


def test_keep_checkpoints_is_checked_and_may_change_on_resume():
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        TrainConfig(keep_checkpoints=-1).validate()
    TrainConfig(keep_checkpoints=0).validate()
    saved = {"keep_checkpoints": 3, "epochs": 4}
    assert config_changes(saved, {"keep_checkpoints": 1, "epochs": 4}) == []
    assert config_changes({"epochs": 4}, {"keep_checkpoints": 3, "epochs": 4}) == []  # a run from before the field
    # a field added later, at the default that keeps the old behaviour: resumable; another value: not
    defaults = {"pair_negative_min_distance_m": 0.0, "epochs": 1}
    assert config_changes({"epochs": 4}, {"pair_negative_min_distance_m": 0.0, "epochs": 4}, defaults) == []
    assert config_changes({"epochs": 4}, {"pair_negative_min_distance_m": 25.0, "epochs": 4}, defaults) == [
        "pair_negative_min_distance_m: 0.0 -> 25.0"]


def test_a_run_saved_with_flat_keys_resumes_under_the_nested_config():
    # train_config.json / TrainState.config of a run from before the augment section
    current = TrainConfig(stage="finetune", labels="l", augment=AugmentConfig(scale=(0.5, 1.0), hue=0.5))
    old_record = {k: v for k, v in to_dict(current).items() if k != "augment"}
    old_record.update(finetune_augment="crop_jitter", finetune_crop_scale_min=0.5, finetune_color_jitter=0.4,
                      finetune_hue=0.5)
    saved = migrate(TrainConfig, old_record)[0]
    assert config_changes(saved, to_dict(current), to_dict(TrainConfig())) == []
    other = TrainConfig(stage="finetune", labels="l", augment=AugmentConfig(scale=(0.5, 1.0), hue=0.25))
    assert config_changes(saved, to_dict(other), to_dict(TrainConfig())) == ["augment.hue: 0.5 -> 0.25"]


def test_every_setting_that_moved_into_a_section_reads_back_from_its_old_flat_name():
    current = TrainConfig(stage="finetune", labels="l", encoder=EncoderConfig(image_size=56, descriptor_dim=32),
                          batch=BatchGeometry(places_per_batch=4), pairs=PairRule(one_per_place=True),
                          optimizer=OptimizerConfig(base_lr=1e-3, adam_betas=(0.9, 0.99)),
                          validation=ValidationConfig(database="atname:db", queries="atname:q"))
    old_name = {m.paths[0]: old for old, m in TrainConfig.MOVED.items() if len(m.paths) == 1 and m.convert is None}
    old_record = {old_name.get(path, path): value for path, value in flat_dict(to_dict(current)).items()
                  if not path.startswith("augment.")}  # augment's keys: the test above
    assert not [key for key in old_record if "." in key]  # every moved setting had a flat name
    assert from_mapping(TrainConfig, old_record, old_keys="quiet") == current
    saved = migrate(TrainConfig, old_record)[0]
    assert config_changes(saved, to_dict(current), to_dict(TrainConfig())) == []
