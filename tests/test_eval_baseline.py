"""evaluation.baseline: 16 x 16 thumbnail descriptors and the raw-pixel ranking, on tiny real images.

No Ray, no model: known pixel patterns written as PNG / JPEG to a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from placeforge.evaluation.baseline import (
    DESCRIPTOR_DIM,
    describe_files,
    rank_by_thumbnails,
    read_thumbnail,
    thumbnail_descriptors,
    thumbnail_pixels,
)

BANDS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def pattern(seed: int, offset: int = 0, size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """[H, W, 3] uint8 (size is H, W): a smooth, dark random pattern in 10..80, plus `offset`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(10, 80, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return (pixels.astype(np.int16) + offset).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> str:
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return str(path)


def test_descriptor_of_a_half_black_half_white_image():
    pixels = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    pixels[0, :, 8:] = 255  # right half white: mean 127.5, every value +-127.5 from it
    row = thumbnail_descriptors(pixels)[0]
    assert row.shape == (DESCRIPTOR_DIM,) == (768,) and row.dtype == np.float32
    expected = np.where(pixels[0].reshape(-1) > 0, 1.0, -1.0) / np.sqrt(768)  # H, W, C order
    np.testing.assert_allclose(row, expected, atol=1e-6)
    # A flat image has no pattern: zeros, not NaN.
    assert not np.any(thumbnail_descriptors(np.full((1, 16, 16, 3), 77, np.uint8)))


def test_thumbnail_squashes_without_cropping():
    wide = np.zeros((16, 64, 3), dtype=np.uint8)  # four 16-pixel bands, left to right
    for band, colour in enumerate(BANDS):
        wide[:, 16 * band:16 * (band + 1)] = colour
    thumb = thumbnail_pixels(Image.fromarray(wide))
    assert thumb.shape == (16, 16, 3) and thumb.dtype == np.uint8
    for band, colour in enumerate(BANDS):  # every band kept, 4 columns wide: a centre crop would lose two
        centre = thumb[8, 4 * band + 1:4 * band + 3].astype(int)
        assert np.abs(centre - colour).max() <= 2, (band, centre)


def test_large_jpeg_is_read_at_reduced_scale_and_matches_a_small_png(tmp_path):
    pixels = pattern(3, size=(16, 16))
    big = np.asarray(Image.fromarray(pixels).resize((512, 384), Image.Resampling.NEAREST))
    jpeg = read_thumbnail(save(tmp_path / "big.jpg", big, "JPEG"))
    png = read_thumbnail(save(tmp_path / "small.png", pixels))
    assert jpeg is not None and png is not None and jpeg.shape == png.shape == (16, 16, 3)
    np.testing.assert_array_equal(png, pixels)  # 16 x 16 in, same pixels out
    similarity = float(thumbnail_descriptors(jpeg[None])[0] @ thumbnail_descriptors(png[None])[0])
    assert similarity > 0.9


def test_identical_images_retrieve_each_other(tmp_path):
    database = [save(tmp_path / f"db{i}.png", pattern(i)) for i in range(6)]
    # The same images at another size (the squash brings them back to 16 x 16), in another order.
    order = [4, 0, 5, 2]
    queries = [save(tmp_path / f"q{j}.png", pattern(i, size=(48, 32))) for j, i in enumerate(order)]
    candidates, unreadable = rank_by_thumbnails(database, queries, k=3, progress=False)
    assert candidates.shape == (4, 3) and unreadable == 0
    assert candidates[:, 0].tolist() == order
    assert all(len(set(row)) == 3 for row in candidates.tolist())  # k distinct images per query


def test_mean_removal_lets_a_brighter_copy_match(tmp_path):
    original = pattern(10)
    brighter = pattern(10, offset=150)  # 160..230: no value clips
    distractor = pattern(11, offset=150)  # another pattern, as bright as the copy
    descriptors = thumbnail_descriptors(np.stack([original, distractor, brighter]))
    assert descriptors[2] @ descriptors[0] == pytest.approx(1.0, abs=1e-5)
    assert descriptors[2] @ descriptors[0] > descriptors[2] @ descriptors[1] + 0.2
    # Without removing the mean, brightness dominates and the distractor would win: the test can fail.
    raw = np.stack([original, distractor, brighter]).reshape(3, -1).astype(np.float64)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert raw[2] @ raw[1] > raw[2] @ raw[0]
    paths = [save(tmp_path / "original.png", original), save(tmp_path / "distractor.png", distractor)]
    candidates, _ = rank_by_thumbnails(paths, [save(tmp_path / "brighter.png", brighter)], k=2, progress=False)
    assert candidates.tolist() == [[0, 1]]


def test_unreadable_files_give_rows_marked_not_ok(tmp_path):
    good = save(tmp_path / "good.png", pattern(1))
    (tmp_path / "text.jpg").write_text("not an image")
    whole = (tmp_path / "whole.jpg")
    save(whole, np.asarray(Image.fromarray(pattern(2)).resize((256, 256))), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(whole.read_bytes()[:300])
    os.mkfifo(tmp_path / "fifo.jpg")  # would block a reader that opens it
    paths = [good, str(tmp_path / "text.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path),
             str(tmp_path / "truncated.jpg"), str(tmp_path / "fifo.jpg"), good]
    descriptors, ok = describe_files(paths, chunk=3, threads=2, progress=False)  # chunks split the list
    assert ok.tolist() == [True, False, False, False, False, False, True]
    assert not descriptors[~ok].any() and descriptors.shape == (7, 768)
    np.testing.assert_array_equal(descriptors[0], descriptors[6])
    assert np.linalg.norm(descriptors[0]) == pytest.approx(1.0, abs=1e-5)


def test_unreadable_query_has_no_candidates_and_unreadable_database_images_are_skipped(tmp_path):
    database = [str(tmp_path / "missing.png"), save(tmp_path / "a.png", pattern(1)),
                save(tmp_path / "b.png", pattern(2))]
    queries = [save(tmp_path / "qb.png", pattern(2)), str(tmp_path / "missing_query.png")]
    candidates, unreadable = rank_by_thumbnails(database, queries, k=3, progress=False)
    assert unreadable == 2
    # Only 2 readable database images: the third column is empty; the unreadable query has none.
    assert candidates.tolist() == [[2, 1, -1], [-1, -1, -1]]
