"""A label set is checked before training on it: its sha256, and that it labels the shard set trained on.

Shard sets are written with the real shard writer (tests/shardsets.py), label sets with the
real label writer; no DeepSpeed is started (the trainer refuses before its start-up).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from placeforge.clustering.labels import LABELS_FILE, label_table, version_dir, write_label_set
from placeforge.shards.manifest import read_manifest, write_manifest
from placeforge.trainer.label_versions import check_label_set
from tests.conftest import jpeg_bytes
from tests.shardsets import write_shard_set

LAYOUT = [[(0, 4), (1, 4)], [(2, 4), (3, 4)]]  # 2 shards, 4 places of 4 images


def write_shards(root: Path, fingerprint: str, first_place: int = 0) -> list[int]:
    """A shard set whose manifest carries `fingerprint` (as a build writes it); returns its image ids."""

    def image(place: int, sample_index: int, i: int) -> tuple[int, bytes]:
        return (first_place + place) * 1000 + i, jpeg_bytes(place * 10 + i, size=(40, 40))

    ids = write_shard_set(root, LAYOUT, image, short_side=32)
    write_manifest(dataclasses.replace(read_manifest(root), fingerprint=fingerprint), root)
    return ids


def write_labels(root: Path, image_ids: list[int], version: int = 0, shards: Path | None = None,
                 fingerprint: str | None = None) -> None:
    """One view class per place; `shards` / `fingerprint` recorded as clustering.job records them."""
    ids = np.array(sorted(image_ids), dtype=np.int64)
    n = len(ids)
    table = label_table(ids, ids // 1000, np.array([f"p{i // 1000}" for i in ids], dtype=object), np.zeros(n),
                        np.zeros(n), ids // 1000, None, version)
    params = {} if fingerprint is None else {"shards": str(shards), "shards_fingerprint": fingerprint}
    write_label_set(root, table, k=1, seed=0, cell_size_m=15.0, previous_version=version - 1 if version else None,
                    retired_class_ids=[], next_class_id=int(ids.max() // 1000) + 1, images_changed_class=None,
                    images_new=n, params=params)


@pytest.fixture
def sets(tmp_path):
    ids = write_shards(tmp_path / "a", "a" * 64)
    write_shards(tmp_path / "b", "b" * 64)  # the same images built again: another shard set, same image ids
    write_labels(tmp_path / "labels", ids, shards=tmp_path / "a", fingerprint="a" * 64)
    return {"a": tmp_path / "a", "b": tmp_path / "b", "labels": tmp_path / "labels", "ids": ids, "tmp": tmp_path}


def test_labels_of_the_shard_set_pass_without_a_warning(sets):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_label_set(sets["a"], sets["labels"], 0)


def test_a_damaged_labels_file_is_refused_naming_it(sets):
    path = version_dir(sets["labels"], 0) / LABELS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the column data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs") as refused:
        check_label_set(sets["a"], sets["labels"], 0)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_labels_made_for_another_shard_set_are_refused_naming_both(sets):
    with pytest.raises(ValueError, match="labels the shard set") as refused:
        check_label_set(sets["b"], sets["labels"], 0)
    message = str(refused.value)
    assert str(version_dir(sets["labels"], 0) / "manifest.json") in message
    assert str(sets["b"] / "manifest.json") in message and "\n" not in message


def test_a_label_set_without_a_fingerprint_is_matched_by_image_ids(sets):
    other = sets["tmp"] / "other"
    write_labels(other, [i + 50_000 for i in sets["ids"]])  # written by hand, for images these shards lack
    with pytest.raises(ValueError, match="labels none of the 16 images"):
        check_label_set(sets["a"], other, 0)
    partial = sets["tmp"] / "partial"
    write_labels(partial, sets["ids"][:12])
    with pytest.warns(UserWarning, match="no view class for 4 of the 16 images"):
        check_label_set(sets["a"], partial, 0)


def test_the_trainer_refuses_before_start_up(sets, capsys, monkeypatch):
    from placeforge.trainer.train import main

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29999")):
        monkeypatch.setenv(key, value)  # main() fills these in for a bare run; keep them out of this process
    threads = torch.get_num_threads()
    out = sets["tmp"] / "run"
    try:
        code = main(["--stage", "finetune", "--shards", str(sets["b"]), "--labels", str(sets["labels"]),
                     "--out", str(out), "--num-workers", "0"])
    finally:
        torch.set_num_threads(threads)
    assert code == 2
    err = capsys.readouterr().err
    assert "train: error: " in err and "labels the shard set" in err and str(sets["b"] / "manifest.json") in err
    assert not (out / "train_config.json").exists()  # refused before anything was written or started


def test_a_followed_label_version_that_does_not_fit_is_refused_and_the_old_one_kept(sets):
    from placeforge.trainer.run import Run
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_state import DistState

    write_labels(sets["labels"], [i + 50_000 for i in sets["ids"]], version=1)  # v1: another shard set's
    out = sets["tmp"] / "run"
    out.mkdir()
    cfg = TrainConfig(stage="finetune", shards=str(sets["a"]), labels=str(sets["labels"]), out=str(out),
                      follow_latest_labels=True)
    run = Run(cfg, DistState(), torch.device("cpu"), {"bf16": {"enabled": False}}, args=None)
    assert run.newest_labels(epoch=0, label_version=0) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["label_version"]) for e in events] == [("labels_refused", 1)]
    shutil.rmtree(version_dir(sets["labels"], 1))
    write_labels(sets["labels"], sets["ids"], version=1, shards=sets["a"], fingerprint="a" * 64)
    assert run.newest_labels(epoch=1, label_version=0) == 1
