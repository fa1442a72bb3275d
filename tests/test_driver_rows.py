"""The plan-only driver's row work done in bulk (issue 14, round 3): each fast path against the
plain definition it replaces, so that the catalog, rejects, plan and ids stay what they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from placeforge.catalog import stable_id, stable_ids
from placeforge.geo import distinct_rows
from placeforge.ingest import read_source
from placeforge.ingest.common import path_prefix
from placeforge.shards.build import BuildConfig, _ingest, build
from placeforge.shards.layout import image_member
from placeforge.shards.plan import plan_rows
from tests.conftest import at_name, jpeg_bytes


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.string_view()])
def test_stable_ids_of_arrow_bytes_equal_the_scalar_hash(kind):
    texts = ["a/b.jpg", "", "é/ü €.jpg", "x" * 300]
    expected = [stable_id("ds/" + t) for t in texts]
    assert stable_ids(pa.array(texts, kind), "ds/").tolist() == expected
    assert stable_ids(pa.chunked_array([texts[:1], texts[1:]], kind), "ds/").tolist() == expected
    assert stable_ids(pl.Series(texts), "ds/").tolist() == expected
    assert stable_ids(texts, "ds/").tolist() == expected


def test_distinct_rows_packed_and_unpacked_agree():
    rng = np.random.default_rng(0)
    small = [rng.integers(1, 61, 500), rng.integers(0, 2, 500), rng.integers(-5, 5, 500), rng.integers(0, 3, 500)]
    wide = [*small, rng.choice([0, 2**62], 500)]  # 64 bits in all: the unpacked path
    for columns in (small, wide):
        first, inverse = distinct_rows(columns)
        rows = np.stack(columns, axis=1)
        distinct, expected_first, expected_inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        assert len(first) == len(distinct)
        assert (rows[first[inverse]] == rows).all()  # each row's number stands for that row
        if columns is wide:
            assert (first == expected_first).all() and (inverse == expected_inverse.reshape(-1)).all()
    assert [len(a) for a in distinct_rows([np.array([], np.int64)])] == [0, 0]


def _plan_rows_by_sorting(place, max_per_sample, images_per_shard, min_shards, seed):
    """plan_rows as it was written before round 3: np.lexsort on two keys, twice."""
    from placeforge.shards.plan import balance_samples, choose_num_shards, split_places

    rng = np.random.default_rng(seed)
    jitter = rng.permutation(len(place))
    rows = np.lexsort((jitter, place))
    place_sorted = place[rows]
    starts = np.flatnonzero(np.r_[True, place_sorted[1:] != place_sorted[:-1]])
    sample_of, member_of, _, _, sample_sizes = split_places(np.diff(np.r_[starts, len(rows)]), max_per_sample)
    for values in (sample_of, member_of):
        values[rows] = values.copy()
    shard_of_sample = balance_samples(sample_sizes, choose_num_shards(len(rows), len(sample_sizes),
                                                                      images_per_shard, min_shards), seed)
    order = np.lexsort((rng.permutation(len(sample_sizes)), shard_of_sample))
    new_number = np.empty_like(order)
    new_number[order] = np.arange(len(order))
    names = np.array([image_member(m) for m in range(int(member_of.max()) + 1)], dtype=object)
    return np.lexsort((np.argsort(np.argsort(names))[member_of], new_number[sample_of]))


@pytest.mark.parametrize("n,places,max_per_sample", [(3000, 300, 16), (3000, 40, 7), (1010, 1, 1024),
                                                     (2500, 2, 1200), (500, 500, 4)])
def test_plan_order_is_the_sorted_order(n, places, max_per_sample):
    # samples of more than 1000 images put "1000.jpg" before "999.jpg"; past 1024 names the plan sorts
    place = np.random.default_rng(n).integers(0, places, n) * 7919 - 3
    for seed in (0, 1):
        sort, columns = plan_rows(place, max_per_sample, 100, 3, seed)
        assert (sort == _plan_rows_by_sorting(place, max_per_sample, 100, 3, seed)).all()
        key = pc.binary_join_element_wise(columns["sample_key"], columns["member"], "/").to_pylist()
        assert key == sorted(key)


def _at_folder(root: Path, east0: float) -> Path:
    for i in range(6):
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / at_name(east0 + i, 4_180_007.0, heading=i * 60)).write_bytes(jpeg_bytes(i))
    return root


def test_catalog_paths_are_made_again_from_relpaths_and_nested_roots_are_duplicates(tmp_path):
    outer = _at_folder(tmp_path / "outer", 551_001.0)
    inner = outer / "train"  # the same files under a second root: another dataset name, the same paths
    catalog, rejects, inputs = _ingest([("atname", outer), ("atname", inner)])
    assert inputs == 12 and catalog.num_rows == 6
    assert rejects.column("detail").to_pylist() == ["the same image was given by more than one --source"] * 6
    assert catalog.column("path").equals(read_source("atname", outer).catalog.column("path"))
    assert path_prefix(inner) == f"{inner.resolve()}/"


def test_plan_paths_of_two_sources_are_their_readers_paths(tmp_path):
    sources = [("atname", _at_folder(tmp_path / "a", 551_001.0)), ("atname", _at_folder(tmp_path / "b", 552_001.0))]
    build(sources, tmp_path / "out", BuildConfig(min_shards=2), plan_only=True)
    plan = pq.read_table(tmp_path / "out" / "_work" / "plan.parquet")
    read = {i: p for s in sources for i, p in zip(*(read_source(*s).catalog.column(c).to_pylist()
                                                     for c in ("image_id", "path")))}
    assert plan.num_rows == 12
    assert dict(zip(plan.column("image_id").to_pylist(), plan.column("path").to_pylist())) == read
