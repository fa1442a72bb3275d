"""The feature store keeps float32 descriptors and float16 tokens, and never reuses a store of
another format (format 1 kept float16 descriptors): it is rebuilt, and arrays whose dtypes
disagree with their store.json are refused."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from placeforge.evaluation.dense_store import DONE, STORE_FORMAT, FeatureStore, StoreKey, bytes_per_image

KEY = StoreKey("sha-a", "images-1", 56, 4, (16, 8))


def write_format_1_store(folder, rows: int) -> None:
    """A complete store as format 1 wrote it: float16 descriptors and tokens, no dtype fields."""
    folder.mkdir(parents=True)
    np.save(folder / "descriptors.npy", np.full((rows, 4), 0.25, np.float16))
    np.save(folder / "tokens.npy", np.full((rows, 16, 8), 0.5, np.float16))
    np.save(folder / "done.npy", np.full(rows, DONE, np.uint8))
    (folder / "store.json").write_text(json.dumps({
        "checkpoint_sha256": "sha-a", "images_sha256": "images-1", "image_size": 56, "descriptor_dim": 4,
        "tokens_shape": [16, 8], "format": 1, "resize": "crop", "input_hw": None}))


def test_a_new_store_holds_float32_descriptors_bit_for_bit_and_float16_tokens(tmp_path):
    store = FeatureStore.open(tmp_path / "db", KEY, rows=3)
    descriptors = np.array([[1 / 3, 2 / 3, 0.1, 1e-5]] * 2, dtype=np.float32)  # not representable in float16
    store.write(np.array([2, 0]), descriptors, np.ones((2, 16, 8), np.float32), np.array([True, True]))
    store.commit()
    again = FeatureStore.open(tmp_path / "db", KEY, rows=3)
    assert again.descriptors.dtype == np.float32 and again.tokens.dtype == np.float16
    assert np.array_equal(again.descriptors[[0, 2]], descriptors)
    assert json.loads((tmp_path / "db" / "store.json").read_text())["descriptor_dtype"] == "float32"
    assert (tmp_path / "db" / "descriptors.npy").stat().st_size - 128 == 3 * 4 * 4  # .npy header + rows x D x 4 B


def test_a_format_1_store_is_rebuilt_not_reused(tmp_path, caplog):
    write_format_1_store(tmp_path / "db", rows=6)
    with caplog.at_level(logging.WARNING, logger="placeforge.evaluation.dense_store"):
        store = FeatureStore.open(tmp_path / "db", KEY, rows=6)
    assert store.pending().tolist() == list(range(6))  # every row is computed again ...
    assert store.descriptors.dtype == np.float32 and not store.descriptors.any()  # ... none of the old values kept
    assert f"format 1 (now {STORE_FORMAT})" in caplog.text and "descriptor_dtype float16 (now float32)" in caplog.text
    assert json.loads((tmp_path / "db" / "store.json").read_text())["format"] == STORE_FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no temporary folder left


def test_arrays_that_disagree_with_store_json_are_refused(tmp_path):
    FeatureStore.open(tmp_path / "db", KEY, rows=2)
    np.save(tmp_path / "db" / "descriptors.npy", np.zeros((2, 4), np.float16))  # e.g. copied from an old store
    with pytest.raises(ValueError, match="descriptors.npy holds float16, store.json says float32"):
        FeatureStore.open(tmp_path / "db", KEY, rows=2)


def test_descriptors_rounded_before_the_store_are_reported(tmp_path, caplog):
    store = FeatureStore.open(tmp_path / "db", KEY, rows=2)
    with caplog.at_level(logging.WARNING, logger="placeforge.evaluation.dense_store"):
        store.write(np.array([0]), np.ones((1, 4), np.float32), np.ones((1, 16, 8)), np.array([True]))
        assert caplog.text == ""
        store.write(np.array([1]), np.ones((1, 4), np.float16), np.ones((1, 16, 8)), np.array([True]))
    assert "descriptors arrive as float16" in caplog.text


def test_bytes_per_image_counts_float32_descriptors_and_float16_tokens():
    vit_b = StoreKey("sha", "images", 322, 512, (23 * 23, 768))
    assert bytes_per_image(vit_b) == 2 * 529 * 768 + 4 * 512 + 1 == 814_593  # 0.78 MiB
    assert bytes_per_image(StoreKey("sha", "images", 322, 512, None)) == 4 * 512 + 1
