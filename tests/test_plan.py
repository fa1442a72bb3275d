"""Shard planning: sample splits, balance, determinism, every image exactly once."""

import numpy as np
import pyarrow as pa
import pytest

from placeforge.shards.plan import balance_samples, choose_num_shards, plan_shards, split_sizes


@pytest.mark.parametrize("n,cap,expected", [(23, 16, [12, 11]), (16, 16, [16]), (33, 16, [11, 11, 11]), (1, 4, [1]), (0, 4, [])])
def test_split_sizes_near_equal(n, cap, expected):
    assert split_sizes(n, cap) == expected


def test_choose_num_shards_bounds():
    assert choose_num_shards(100, 30, 1000, 8) == 8
    assert choose_num_shards(10_000, 3000, 1000, 8) == 10
    assert choose_num_shards(100, 5, 10, 8) == 5  # never more shards than samples


def test_balance_samples_is_balanced_and_seeded():
    sizes = np.random.default_rng(0).integers(4, 17, size=1000)
    shards = balance_samples(sizes, 7, seed=1)
    loads = np.bincount(shards, weights=sizes, minlength=7)
    assert loads.max() - loads.min() <= sizes.max()
    assert np.array_equal(shards, balance_samples(sizes, 7, seed=1))
    assert not np.array_equal(shards, balance_samples(sizes, 7, seed=2))


def _catalog(place_sizes):
    place = np.repeat(np.arange(len(place_sizes)) * 1000 + 5, place_sizes)
    return pa.table({"image_id": np.arange(len(place)) * 3 + 1, "place_id": place})


def test_plan_puts_every_image_once_and_keeps_places_together():
    catalog = _catalog([4, 5, 40, 6, 4, 17, 8])
    plan = plan_shards(catalog, max_images_per_sample=16, images_per_shard=20, min_shards=2, seed=0)
    assert sorted(plan.column("image_id").to_pylist()) == sorted(catalog.column("image_id").to_pylist())
    df = plan.to_pandas() if False else plan.to_pylist()
    by_sample = {}
    for row in df:
        by_sample.setdefault(row["sample_key"], []).append(row)
    for rows in by_sample.values():
        assert len({r["place_id"] for r in rows}) == 1  # one place per sample
        assert len({r["shard_index"] for r in rows}) == 1  # a sample is never cut
        assert sorted(r["member"] for r in rows) == [f"{i:03d}.jpg" for i in range(len(rows))]
        assert len(rows) <= 16
    parts_40 = [rows for rows in by_sample.values() if rows[0]["place_id"] == 2005]
    assert sorted(len(r) for r in parts_40) == [13, 13, 14]
    assert {r[0]["parts"] for r in parts_40} == {3}
    shard_col = plan.column("shard_index").to_numpy()
    assert np.all(np.diff(shard_col) >= 0)  # sorted by shard for filtered reads
    assert len(set(shard_col)) == 5  # ceil(84 / 20)


def test_plan_is_deterministic_and_seed_dependent():
    catalog = _catalog([5] * 50)
    a = plan_shards(catalog, 16, 40, 4, seed=0)
    b = plan_shards(catalog, 16, 40, 4, seed=0)
    c = plan_shards(catalog, 16, 40, 4, seed=1)
    assert a.equals(b)
    assert a.column("shard_index").to_pylist() != c.column("shard_index").to_pylist() or a.column(
        "image_id"
    ).to_pylist() != c.column("image_id").to_pylist()


def test_plan_shuffles_places_across_shards():
    # Places given in order must not land in shards in that order.
    catalog = _catalog([4] * 200)
    plan = plan_shards(catalog, 16, 100, 8, seed=0)
    first_shard_places = {p for p, s in zip(plan.column("place_id").to_pylist(), plan.column("shard_index").to_pylist()) if s == 0}
    assert max(first_shard_places) > 100 * 1000  # not just the first places


def test_empty_catalog_is_an_error():
    with pytest.raises(ValueError, match="nothing to shard"):
        plan_shards(_catalog([]), 16, 10, 1, 0)
