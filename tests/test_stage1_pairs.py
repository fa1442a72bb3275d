"""Stage-1 pairs: heading limits, panorama focal points, one pair per place per epoch.

Pure geometry and choice on plain values first; then shard sets planned by the real planner
(`shards.plan.plan_shards`, which splits big places into several samples) and written by the
real shard writer, read back through the real reader and the training loader.  No Ray: the
build's Ray stage only runs `write_shard` once per shard, as `build_shard_set` does here.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from placeforge.catalog import catalog_table
from placeforge.shards.index import index_table, read_index, write_index
from placeforge.shards.layout import INDEX_FILE, SHARD_SUBDIR
from placeforge.shards.manifest import Manifest, write_manifest
from placeforge.shards.plan import plan_shards
from placeforge.shards.reader import PlaceSample, ShardSet, place_sample_pipeline
from placeforge.shards.writer import write_shard
from placeforge.trainer.data import BatchGeometry, make_loader
from placeforge.trainer.data_plan import one_sample_per_place
from placeforge.trainer.pairs import (
    PANORAMA_VIEW_FOV_DEG,
    PairKind,
    PairRule,
    PanoramaView,
    bearing_deg,
    crop_strip,
    focal_pair,
    heading_diff_deg,
    pick_heading_pair,
    stage1_pairs,
    view_columns,
    view_image,
)

# ---- heading-limited perspective pairs (pure) ----


def test_heading_difference_wraps_around_north():
    assert heading_diff_deg(350.0, 10.0) == pytest.approx(20.0)
    assert heading_diff_deg(-90.0, 90.0) == pytest.approx(180.0)
    assert heading_diff_deg(725.0, 0.0) == pytest.approx(5.0)  # headings are stored as written


def test_heading_pairs_stay_within_the_limit_else_the_closest_pair_is_taken_and_named():
    rng = random.Random(0)
    headings = [0.0, 100.0, 355.0, 200.0, 110.0]
    for _ in range(200):
        a, b, kind = pick_heading_pair(headings, 30.0, rng)
        assert a != b and kind == PairKind.WITHIN_HEADING
        assert heading_diff_deg(headings[a], headings[b]) <= 30.0
    a, b, kind = pick_heading_pair([0.0, 120.0, 250.0], 30.0, rng)
    assert kind == PairKind.CLOSEST_HEADING and {a, b} == {0, 2}  # 110 deg apart across north: the closest
    _, _, kind = pick_heading_pair([None, 40.0, None], 30.0, rng)
    assert kind == PairKind.NO_HEADING


def test_no_limit_draws_exactly_as_before():
    """Limit 0 is today's pair: the same `rng.sample` call, so old runs replay identically."""
    ours, before = random.Random(4), random.Random(4)
    for n in (2, 5, 9):
        a, b, kind = pick_heading_pair([10.0] * n, 0.0, ours)
        assert (a, b) == tuple(before.sample(range(n), 2)) and kind == PairKind.RANDOM


# ---- panorama focal points (pure) ----


def column_of(bearing: float, heading: float, width: int) -> float:
    """The strip column looking at compass `bearing` (centre column = heading), written out again."""
    return ((bearing - heading) / 360.0 + 0.5) * width % width


@pytest.mark.parametrize("seed", range(40))
def test_focal_point_is_10_to_20_m_out_and_both_crops_look_at_it(seed):
    rng = np.random.default_rng(seed)
    positions = 551_000.0 + rng.uniform(0, 15, size=(6, 2))  # six panoramas in one 15 m cell
    headings = rng.uniform(-180, 540, size=6)
    found = focal_pair(positions, np.random.default_rng(seed))
    assert found.first != found.second
    centroid = positions.mean(axis=0)
    assert 10.0 <= math.dist(found.focal_en, centroid) <= 20.0
    assert found.within and 3.0 <= found.view_diff_deg <= 50.0  # six spread panoramas always find a pair
    width = 3328
    for which, bearing in zip((found.first, found.second), found.bearings_deg):
        assert bearing == pytest.approx(bearing_deg(positions[which], found.focal_en))
        start, span = view_columns(headings[which], bearing, width)
        assert span == 512  # Pair-VPR's crop: 512 of 3328 columns (55.4 degrees)
        offset = (column_of(bearing, headings[which], width) - start) % width
        assert abs(offset - span / 2) <= 1  # the focal direction is the crop's centre column


def test_bearings_are_compass_degrees():
    assert bearing_deg((0, 0), (0, 10)) == pytest.approx(0.0)
    assert bearing_deg((0, 0), (10, 0)) == pytest.approx(90.0)
    assert bearing_deg((0, 0), (-10, -10)) == pytest.approx(225.0)


def test_panoramas_at_one_spot_cannot_see_a_focal_point_apart_and_say_so():
    positions = np.array([[500_000.0, 4_000_000.0], [500_000.0, 4_000_000.0]])
    found = focal_pair(positions, np.random.default_rng(0))
    assert not found.within and found.view_diff_deg == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="two panoramas"):
        focal_pair(positions[:1], np.random.default_rng(0))


def test_a_view_across_the_strip_seam_wraps_to_column_zero():
    width = 720
    start, span = view_columns(heading_deg=0.0, bearing_deg_=180.0, strip_width_px=width)  # looks backwards
    assert span == round(width * PANORAMA_VIEW_FOV_DEG / 360) and start + span > width  # crosses the seam
    strip = np.arange(width, dtype=np.int64).reshape(1, width, 1)  # [1, W, 1], value = column
    crop = crop_strip(strip, start, span)
    expected = [(start + i) % width for i in range(span)]
    assert crop.shape == (1, span, 1) and crop[0, :, 0].tolist() == expected
    assert crop[0, span // 2, 0] in (0, width - 1)  # the centre of the view is the seam (bearing 180)


def test_view_image_cuts_the_columns_that_face_the_focal_point():
    width, height = 720, 40
    red = (np.arange(width) * 255 // (width - 1)).astype(np.uint8)  # [W] red grows left to right
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 0] = red
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    view = np.asarray(Image.open(io.BytesIO(view_image(out.getvalue(), PanoramaView(90.0, 120.0)))))
    start, span = view_columns(90.0, 120.0, width)
    assert view.shape == (height, span, 3)
    assert np.abs(view[height // 2, :, 0].astype(int) - red[start:start + span].astype(int)).max() <= 8


# ---- shard sets from the real planner and writer ----


def image_bytes(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)  # distinct bytes for every image
    out = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(out, format="JPEG", quality=90)
    return out.getvalue()


def build_shard_set(root, images: list[dict], max_images_per_sample: int, min_shards: int):
    """images: {"place": int, "heading": float | None, "east": float, "north": float, "size": (w, h)}.

    Returns the image id -> image dict.  Short side 20 px: every test image keeps its size.
    """
    (root / "src").mkdir(parents=True)
    (root / SHARD_SUBDIR).mkdir()
    by_id, columns = {}, {k: [] for k in ("image_id", "source", "dataset", "path", "relpath", "place_id",
                                          "place_key", "utm_east", "utm_north", "utm_zone", "heading_deg")}
    for i, image in enumerate(images):
        path = root / "src" / f"{i}.jpg"
        path.write_bytes(image_bytes(i, image.get("size", (30, 20))))
        image_id = 1000 + i
        by_id[image_id] = image
        for key, value in (("image_id", image_id), ("source", "test"), ("dataset", "test"), ("path", str(path)),
                           ("relpath", path.name), ("place_id", image["place"]), ("place_key", f"p{image['place']}"),
                           ("utm_east", image.get("east", 0.0)), ("utm_north", image.get("north", 0.0)),
                           ("utm_zone", 10), ("heading_deg", image.get("heading"))):
            columns[key].append(value)
    plan = plan_shards(catalog_table(columns), max_images_per_sample, images_per_shard=30, min_shards=min_shards,
                       seed=0)
    records, index_rows = [], []
    for shard in range(pc.max(plan.column("shard_index")).as_py() + 1):
        rows = plan.filter(pc.equal(plan.column("shard_index"), shard))
        result = write_shard(root / SHARD_SUBDIR, shard, rows, short_side=20, jpeg_quality=90)
        records.append(result.record)
        index_rows += result.index_rows
    write_index(index_table(index_rows), root / INDEX_FILE)
    write_manifest(Manifest(config={}, sources=[], counts={}, shards=records), root)
    return by_id


HEADING_PLACES = {
    0: [0.0, 12.0, 180.0, 190.0, 95.0, 350.0],  # pairs within 30 degrees exist
    1: [0.0, 120.0, 240.0],  # none within 30: the closest pair, counted
    2: [None, None, None],  # no heading: any two, counted
    3: [40.0, None, 60.0, None],  # two with a heading, within 30
}


@pytest.fixture
def heading_set(tmp_path):
    images = [{"place": p, "heading": h} for p, hs in HEADING_PLACES.items() for h in hs]
    return tmp_path / "set", build_shard_set(tmp_path / "set", images, max_images_per_sample=16, min_shards=2)


def test_pairs_read_from_real_shards_respect_the_heading_limit(heading_set):
    root, by_id = heading_set
    samples: list[PlaceSample] = list(place_sample_pipeline(ShardSet.open(root).urls, shuffle_buffer=1))
    assert sorted(s.place_id for s in samples) == [0, 1, 2, 3]
    kinds = Counter()
    rng = random.Random(0)
    for _ in range(50):
        for pair in stage1_pairs(samples, PairRule(max_heading_diff_deg=30.0), rng):
            a, b = (by_id[i] for i in pair.image_ids)
            assert a["place"] == b["place"] == pair.place_id and pair.image_ids[0] != pair.image_ids[1]
            if pair.kind == PairKind.WITHIN_HEADING:
                assert heading_diff_deg(a["heading"], b["heading"]) <= 30.0
            kinds[pair.place_id, pair.kind] += 1
    assert kinds == {(0, PairKind.WITHIN_HEADING): 50, (1, PairKind.CLOSEST_HEADING): 50,
                     (2, PairKind.NO_HEADING): 50, (3, PairKind.WITHIN_HEADING): 50}


def test_the_loader_counts_each_kind_of_pair_and_logs_it(heading_set, caplog):
    root, _ = heading_set
    caplog.set_level(logging.INFO, logger="placeforge.trainer.data")
    loader, steps = make_loader(root, "pairs", rank=0, world_size=1, num_workers=0, image_size=16, epoch=0, seed=0,
                                geometry=BatchGeometry(pairs_per_batch=1), pairing=PairRule(max_heading_diff_deg=30.0))
    batches = list(loader)
    assert steps == len(batches) == 4
    kinds = {int(b.place_ids[0]): PairKind(int(b.pair_kinds[0])) for b in batches}
    assert kinds == {0: PairKind.WITHIN_HEADING, 1: PairKind.CLOSEST_HEADING, 2: PairKind.NO_HEADING,
                     3: PairKind.WITHIN_HEADING}
    lines = [r.getMessage() for r in caplog.records if "stage-1 pairs by kind" in r.getMessage()]
    assert lines == ["epoch 0 rank 0 worker 0: stage-1 pairs by kind "
                     "{'within_heading': 2, 'closest_heading': 1, 'no_heading': 1}"]


def test_the_loader_trains_panoramas_on_their_focal_views(tmp_path):
    rng = np.random.default_rng(1)
    images = [{"place": p, "heading": float(rng.uniform(0, 360)), "east": 100.0 * p + rng.uniform(0, 15),
               "north": rng.uniform(0, 15), "size": (130, 20)} for p in range(4) for _ in range(5)]
    root = tmp_path / "panos"
    build_shard_set(root, images, max_images_per_sample=16, min_shards=2)
    loader, steps = make_loader(root, "pairs", rank=0, world_size=1, num_workers=0, image_size=16, epoch=0, seed=0,
                                geometry=BatchGeometry(pairs_per_batch=2), pairing=PairRule(panorama_views=True))
    batches = list(loader)
    assert steps == len(batches) == 2
    for batch in batches:
        assert batch.img_a.shape == batch.img_b.shape == (2, 3, 16, 16)
        assert set(batch.pair_kinds.tolist()) <= {PairKind.PANORAMA_FOCAL, PairKind.PANORAMA_RELAXED}
    loader, _ = make_loader(root, "pairs", rank=0, world_size=1, num_workers=0, image_size=16, epoch=0, seed=0,
                            geometry=BatchGeometry(pairs_per_batch=2))
    assert {int(k) for b in loader for k in b.pair_kinds} == {PairKind.RANDOM}  # off: whole strips, as before


# ---- one pair per place per epoch ----


def test_one_sample_per_place_keeps_exactly_one_and_rotates_over_epochs():
    place = np.array([7, 7, 7, 3, 9, 9, 3, 5])
    chosen = set()
    for epoch in range(30):
        keep = one_sample_per_place(place, epoch, seed=1)
        assert sorted(place[keep].tolist()) == [3, 5, 7, 9]
        assert np.array_equal(keep, one_sample_per_place(place, epoch, seed=1))  # every rank alike
        chosen.add(tuple(np.flatnonzero(keep & (place == 7))))
    assert chosen == {(0,), (1,), (2,)}  # each part of place 7 takes its turn


@pytest.fixture
def uneven_places(tmp_path):
    """One place of 40 images (split into 5 samples of 8) and ten places of 3."""
    images = [{"place": 0, "heading": None}] * 40 + [{"place": p, "heading": None} for p in range(1, 11)
                                                      for _ in range(3)]
    root = tmp_path / "uneven"
    build_shard_set(root, images, max_images_per_sample=8, min_shards=2)
    return root


def draws_per_place(root, epoch: int, one_pair_per_place: bool) -> Counter:
    loader, steps = make_loader(root, "pairs", rank=0, world_size=1, num_workers=0, image_size=8, epoch=epoch, seed=0,
                                geometry=BatchGeometry(pairs_per_batch=1),
                                pairing=PairRule(one_per_place=one_pair_per_place))
    batches = list(loader)
    assert len(batches) == steps
    return Counter(int(b.place_ids[0]) for b in batches)


def test_a_big_place_split_over_samples_is_drawn_once_an_epoch_like_a_small_one(uneven_places):
    index = read_index(uneven_places / INDEX_FILE)
    samples_of_big = len(set(index.filter(pc.equal(index.column("place_id"), 0)).column("sample_key").to_pylist()))
    assert samples_of_big == 5
    # Measured: one pair per sample draws the big place once per sample, 5 times an epoch.
    before = draws_per_place(uneven_places, 0, one_pair_per_place=False)
    assert before[0] == 5 and all(before[p] == 1 for p in range(1, 11))
    for epoch in (0, 1):
        after = draws_per_place(uneven_places, epoch, one_pair_per_place=True)
        assert after == Counter({p: 1 for p in range(11)})


def test_two_ranks_x_two_workers_draw_no_place_twice_and_take_equal_steps(tmp_path):
    images = [{"place": 0, "heading": None}] * 40 + [{"place": p, "heading": None} for p in range(1, 21)
                                                      for _ in range(3)]
    root = tmp_path / "four"
    build_shard_set(root, images, max_images_per_sample=8, min_shards=4)
    draws, steps_of = Counter(), []
    for rank in (0, 1):
        loader, steps = make_loader(root, "pairs", rank=rank, world_size=2, num_workers=2, image_size=8, epoch=3,
                                    seed=0, geometry=BatchGeometry(pairs_per_batch=1),
                                    pairing=PairRule(one_per_place=True))
        batches = list(loader)
        assert len(batches) == steps
        steps_of.append(steps)
        draws.update(int(b.place_ids[0]) for b in batches)
    assert steps_of[0] == steps_of[1] > 0 and max(draws.values()) == 1
