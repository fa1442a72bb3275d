"""Clustering core: cells and groups, per-cell K-means, matching across rounds, label sets.

Pure and fast: numpy + faiss on tiny arrays, label sets in a temp dir; no Ray.
"""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pytest

from placeforge.catalog import catalog_table, stable_id
from placeforge.clustering.cells import assign_cells, cells_from_catalog, group_of_cell
from placeforge.clustering.initial import initial_classes, random_classes
from placeforge.clustering.kmeans import class_means, cluster_cells
from placeforge.clustering.labels import (
    class_lookup,
    classes_of,
    label_table,
    latest_version,
    next_version,
    previous_labels,
    read_labels,
    read_manifest,
    write_label_set,
)
from placeforge.clustering.matching import PreviousLabels, assign_class_ids, count_changed, match_cell, relabel
from placeforge.geo import cell_col_row, utm_cell_keys


def unit_rows(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if labelings a and b split the rows the same way, whatever the label numbers."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- cells and groups -------------------------------------------------------------------

def test_cell_keys_include_zone_and_hemisphere():
    zone = np.array([10, 11, 10, 10])
    northern = np.array([True, True, False, True])
    col, row = cell_col_row(np.array([551_003.0, 551_003.0, 551_003.0, 551_009.9]),
                            np.array([4_180_001.0] * 4), cell_size_m=10.0)
    keys = utm_cell_keys(zone, northern, col, row)
    ids = np.array([stable_id(k) for k in keys])
    assert keys.tolist() == ["utm:10N:55100:418000", "utm:11N:55100:418000", "utm:10S:55100:418000",
                             "utm:10N:55100:418000"]
    assert len(set(ids[:3].tolist())) == 3  # same metric cell, different zone or hemisphere
    assert ids[0] == ids[3] == stable_id("utm:10N:55100:418000")


def test_negative_coordinates_floor_into_their_own_cells():
    col, row = cell_col_row(np.array([-0.5, 0.5, -10.0, -10.01]), np.array([-0.1, 0.0, 9.99, 10.0]), 10.0)
    assert col.tolist() == [-1, 0, -1, -2]
    assert row.tolist() == [-1, 0, 0, 1]


def test_groups_cells_n_apart_share_neighbours_do_not():
    n = 5
    assert group_of_cell(np.array([3]), np.array([-7]), cells_apart=n)[0] == group_of_cell(
        np.array([3 + n]), np.array([-7 - 2 * n]), cells_apart=n)[0]
    base = group_of_cell(np.array([-2]), np.array([4]), cells_apart=n)[0]
    for dc in range(-(n - 1), n):
        for dr in range(-(n - 1), n):
            if (dc, dr) != (0, 0):
                assert group_of_cell(np.array([-2 + dc]), np.array([4 + dr]), cells_apart=n)[0] != base
    cols, rows = np.meshgrid(np.arange(-3, 2), np.arange(10, 15))
    groups = group_of_cell(cols.ravel(), rows.ravel(), cells_apart=n)
    assert sorted(groups.tolist()) == list(range(n * n))  # dense 0..N*N-1
    with_heading = group_of_cell(cols.ravel(), rows.ravel(), np.full(25, 3), cells_apart=n, heading_groups=2)
    assert with_heading.max() < n * n * 2 and np.all(with_heading % 2 == 1)


def test_rows_without_utm_use_the_catalog_place():
    cells = assign_cells(
        utm_zone=np.array([10, np.nan]), northern=np.array([True, False]),
        east_m=np.array([551_003.0, np.nan]), north_m=np.array([4_180_001.0, np.nan]),
        place_id=np.array([None, 1234], dtype=object),
        place_key=np.array([None, "gldv2:gldv2:landmark-7"], dtype=object),
    )
    assert cells.is_geo.tolist() == [True, False]
    assert cells.cell_key[1] == "gldv2:gldv2:landmark-7" and cells.cell_id[1] == 1234
    assert cells.cell_key[0] == "utm:10N:55100:418000"
    assert 0 <= cells.group_id[1] < 25
    with pytest.raises(ValueError, match="1 row"):
        assign_cells(np.array([np.nan]), np.array([True]), np.array([np.nan]), np.array([np.nan]),
                     np.array([None], dtype=object), np.array([None], dtype=object))


def test_cells_from_catalog_table():
    catalog = catalog_table({
        "image_id": [1, 2, 3], "source": ["atname", "atname", "gldv2"], "dataset": ["sf", "sf", "gld"],
        "path": ["/a", "/b", "/c"], "relpath": ["a", "b", "c"],
        "utm_east": np.array([551_003.0, 551_003.0, np.nan]), "utm_north": np.array([-5.0, -5.0, np.nan]),
        "utm_zone": pa.array([10, 10, None], pa.int16()), "utm_letter": ["S", "H", None],
        "place_key": [None, None, "gldv2:gld:77"], "place_id": pa.array([None, None, 77], pa.int64()),
    })
    cells = cells_from_catalog(catalog)
    assert cells.cell_key.tolist() == ["utm:10N:55100:-1", "utm:10S:55100:-1", "gldv2:gld:77"]
    assert cells.cell_id[2] == 77 and cells.is_geo.tolist() == [True, True, False]


# --- K-means ------------------------------------------------------------------------------

def test_tiny_cells_get_fewer_classes():
    rng = np.random.default_rng(0)
    cells = np.array([7, 8, 8])
    result = cluster_cells(cells, unit_rows(rng, 3), k=3, seed=0)
    assert result.class_in_cell.tolist()[0] == 0
    assert sorted(result.class_in_cell[1:].tolist()) == [0, 1]
    assert np.allclose(result.distance, 0.0)
    assert result.centroids.of_cell(7)[1].shape == (1, 16)
    assert result.centroids.of_cell(8)[1].shape == (2, 16)


def test_duplicates_and_k_above_distinct_points():
    rng = np.random.default_rng(1)
    same = np.repeat(unit_rows(rng, 1), 10, axis=0)  # cell 1: all identical
    two = np.repeat(unit_rows(rng, 2), [4, 5], axis=0)  # cell 2: two points, 4 and 5 copies
    four = unit_rows(rng, 4)  # cell 3: four distinct points, k = 10
    x = np.concatenate([same, two, four])
    cells = np.repeat([1, 2, 3], [10, 9, 4])
    result = cluster_cells(cells, x, k=3, seed=0)
    assert set(result.class_in_cell[:10].tolist()) == {0}
    assert same_partition(result.class_in_cell[10:19], np.repeat([0, 1], [4, 5]))
    assert sorted(set(result.class_in_cell[19:].tolist())) == [0, 1, 2]  # k=3 < 4 points: 3 classes
    wide = cluster_cells(cells, x, k=10, seed=0)
    assert sorted(wide.class_in_cell[19:].tolist()) == [0, 1, 2, 3]
    # Many copies + a few others: clustering sees weighted distinct points, still no empty class.
    crowd = np.concatenate([np.repeat(x[:1], 20, axis=0), unit_rows(rng, 5)])
    res = cluster_cells(np.zeros(25, np.int64), crowd, k=3, seed=0)
    assert len(set(res.class_in_cell[:20].tolist())) == 1
    assert sorted(set(res.class_in_cell.tolist())) == [0, 1, 2]


def test_two_blobs_recovered_exactly_and_classes_dense():
    rng = np.random.default_rng(2)
    centres = unit_rows(rng, 2, dim=32) * 10.0
    truth = rng.integers(0, 2, 40)
    x = (centres[truth] + 0.1 * rng.standard_normal((40, 32))).astype(np.float32)
    result = cluster_cells(np.full(40, 99), x, k=2, seed=3)
    assert same_partition(result.class_in_cell, truth)
    mine = result.centroids.of_cell(99)[1][result.class_in_cell]
    assert np.allclose(result.distance, np.linalg.norm(x - mine, axis=1), atol=1e-4)


def test_every_cell_gets_min_k_n_dense_classes():
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 12, 60)
    cells = np.repeat(rng.integers(0, 2**62, 60), sizes)
    result = cluster_cells(cells, unit_rows(rng, len(cells)), k=3, seed=0, n_init=2)
    for cell, size in zip(np.unique(cells, return_index=True)[0], np.unique(cells, return_counts=True)[1]):
        classes = result.class_in_cell[cells == cell]
        assert sorted(set(classes.tolist())) == list(range(min(3, size)))


def test_kmeans_independent_of_row_order_and_partition():
    rng = np.random.default_rng(5)
    cells = np.repeat(np.arange(30) * 1_000_003, rng.integers(5, 15, 30))
    x = unit_rows(rng, len(cells), dim=24)
    whole = cluster_cells(cells, x, k=3, seed=11)
    again = cluster_cells(cells, x, k=3, seed=11)
    assert np.array_equal(whole.class_in_cell, again.class_in_cell)
    shuffled = rng.permutation(len(cells))
    first_half = np.isin(cells[shuffled], np.unique(cells)[::2])
    labels = np.empty(len(cells), np.int32)
    distance = np.empty(len(cells), np.float32)
    for part in (shuffled[~first_half], shuffled[first_half]):  # other order, two "processes"
        res = cluster_cells(cells[part], x[part], k=3, seed=11)
        labels[part], distance[part] = res.class_in_cell, res.distance
    assert np.array_equal(labels, whole.class_in_cell)
    assert np.allclose(distance, whole.distance, atol=1e-6)
    half = cluster_cells(cells, x.astype(np.float16), k=3, seed=11)  # float16 input is accepted
    assert half.class_in_cell.dtype == np.int32


def test_nan_descriptors_rejected_with_count_and_cells():
    x = unit_rows(np.random.default_rng(6), 6)
    x[1, 3] = np.nan
    x[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 descriptor row\(s\).*2 cell\(s\): 10, 20"):
        cluster_cells(np.array([10, 10, 10, 20, 20, 20]), x, k=2)


def test_empty_input_and_thread_count_restored():
    threads = faiss.omp_get_max_threads()
    empty = cluster_cells(np.empty(0, np.int64), np.empty((0, 8), np.float32), k=3)
    assert empty.class_in_cell.shape == (0,) and empty.centroids.vectors.shape == (0, 8)
    cluster_cells(np.zeros(9, np.int64), unit_rows(np.random.default_rng(0), 9), k=3)
    assert faiss.omp_get_max_threads() == threads
    assert relabel(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32), None).next_class_id == 0


def test_class_means_match_a_plain_loop():
    rng = np.random.default_rng(10)
    cells = rng.integers(0, 5, 50_000)  # many rows per (cell, class): the blocked sum crosses blocks
    classes = rng.integers(-1, 3, 50_000)  # -1 rows are skipped
    x = rng.standard_normal((50_000, 4)).astype(np.float32)
    means = class_means(cells, classes, x)
    for cell in range(5):
        slots, vectors = means.of_cell(cell)
        assert slots.tolist() == [0, 1, 2]
        for slot, vector in zip(slots, vectors):
            assert np.allclose(vector, x[(cells == cell) & (classes == slot)].mean(axis=0), atol=1e-4)


def test_spherical_centroids_are_unit_length():
    rng = np.random.default_rng(7)
    x = unit_rows(rng, 20) * 3.0
    result = cluster_cells(np.zeros(20, np.int64), x, k=3, spherical=True)
    assert np.allclose(np.linalg.norm(result.centroids.vectors, axis=1), 1.0, atol=1e-4)


# --- initial labels -----------------------------------------------------------------------

def test_initial_by_heading_separates_opposite_headings():
    headings = np.array([10.0, 12.0, 190.0, 191.0, 9.0, 189.0, 5.0, 7.0, 3.0, 185.0])
    classes = initial_classes(np.arange(10), np.zeros(10, np.int64), headings, k=2, seed=0)
    north = headings < 90
    assert len(set(classes[north].tolist())) == 1 and len(set(classes[~north].tolist())) == 1
    assert classes[north][0] != classes[~north][0]
    one_way = initial_classes(np.arange(4), np.zeros(4, np.int64), np.array([0.0, 360.0, 0.0, 720.0]), k=3)
    assert set(one_way.tolist()) == {0}  # every image faces the same way: one class


def test_initial_random_split_is_balanced_and_order_free():
    image_ids = np.arange(100, 124)
    cells = np.repeat([5, 6, 7], [10, 2, 12])
    headings = np.full(24, np.nan)
    headings[12:] = np.linspace(0, 300, 12)  # cell 7 has headings; cells 5 and 6 do not
    classes = initial_classes(image_ids, cells, headings, k=3, seed=1)
    assert sorted(np.bincount(classes[:10]).tolist()) == [3, 3, 4]
    assert sorted(classes[10:12].tolist()) == [0, 1]
    perm = np.random.default_rng(0).permutation(24)
    assert np.array_equal(initial_classes(image_ids[perm], cells[perm], headings[perm], k=3, seed=1), classes[perm])
    assert not np.array_equal(random_classes(image_ids, cells, 3, seed=2), random_classes(image_ids, cells, 3, 1))


# --- matching ------------------------------------------------------------------------------

def _previous(image_id, cell_id, slot) -> PreviousLabels:
    ids = assign_class_ids(cell_id, slot)
    return PreviousLabels(np.asarray(image_id), np.asarray(cell_id), np.asarray(slot, np.int32), ids.class_id,
                          ids.next_class_id)


def test_permuted_clusters_keep_their_ids():
    rng = np.random.default_rng(8)
    cells = np.repeat([11, 22, 33], [9, 7, 3])
    slots = np.concatenate([np.arange(9) % 3, np.arange(7) % 3, np.arange(3) % 3]).astype(np.int32)
    image_id = np.arange(19) + 1000
    prev = _previous(image_id, cells, slots)
    permuted = np.concatenate([np.array([2, 0, 1])[slots[:9]], np.array([1, 2, 0])[slots[9:]]])
    order = rng.permutation(19)  # rows in another order too
    result = relabel(image_id[order], cells[order], permuted[order], prev)
    assert np.array_equal(result.class_in_cell, slots[order])
    assert np.array_equal(result.class_id, prev.class_id[order])
    assert result.images_changed_class == 0 and result.images_new == 0
    assert len(result.retired_class_ids) == 0 and result.next_class_id == prev.next_class_id


def test_split_gets_a_fresh_id_and_merge_retires_one():
    image_id = np.arange(8)
    cells = np.full(8, 5)
    prev = _previous(image_id, cells, np.array([0, 0, 0, 0, 1, 1, 2, 2]))  # ids 0, 1, 2
    # Old class 0 splits into clusters 0 and 2; old classes 1 and 2 merge into cluster 1.
    new = np.array([0, 0, 2, 2, 1, 1, 1, 1])
    result = relabel(image_id, cells, new, prev)
    assert result.class_id[:2].tolist() == [0, 0]  # one half keeps class 0
    assert result.class_id[2] == result.class_id[3] == 3  # the other half: fresh id after next_class_id 3
    assert result.class_in_cell[2] == 3  # fresh slot after the cell's previous slots 0..2
    merged = set(result.class_id[4:].tolist())
    assert len(merged) == 1 and merged <= {1, 2}
    assert result.retired_class_ids.tolist() == sorted({1, 2} - merged)
    assert result.next_class_id == 4
    assert result.images_changed_class == 2 + 2  # the split-off half and the other merged class
    assert count_changed(image_id, result.class_id, prev) == (4, 0)


def test_new_cells_and_images_get_ids_after_high_water_mark():
    prev = PreviousLabels(np.array([1, 2]), np.array([9, 9]), np.array([0, 1], np.int32), np.array([4, 6]), 10)
    result = relabel(np.array([1, 2, 3]), np.array([9, 9, 70]), np.array([0, 1, 0]), prev)
    assert result.class_id.tolist() == [4, 6, 10]
    assert result.images_new == 1 and result.next_class_id == 11


def test_ties_broken_by_centroid_similarity():
    overlap = np.array([[2, 2]])  # one old class, two halves that share as much with it
    assert match_cell(overlap).tolist().count(0) == 1
    assert match_cell(overlap, np.array([[0.1, 0.9]])).tolist() == [-1, 0]
    assert match_cell(overlap, np.array([[0.9, 0.1]])).tolist() == [0, -1]
    assert match_cell(np.array([[3, 2]]), np.array([[-1.0, 1.0]])).tolist() == [0, -1]  # overlap wins
    assert match_cell(np.array([[0, 0]]), np.array([[1.0, 1.0]])).tolist() == [-1, -1]  # no shared image

    rng = np.random.default_rng(9)
    x = unit_rows(rng, 4)
    prev = _previous(np.arange(4), np.zeros(4, np.int64), np.zeros(4, np.int32))
    new = np.array([0, 0, 1, 1])
    new_centroids = class_means(np.zeros(4, np.int64), new, x)
    old_near_second = class_means(np.zeros(4, np.int64), np.zeros(4, np.int32), np.repeat(x[2:3], 4, axis=0))
    result = relabel(np.arange(4), np.zeros(4, np.int64), new, prev, new_centroids, old_near_second)
    assert result.class_id.tolist()[2:] == [0, 0] and result.class_id.tolist()[:2] == [1, 1]


# --- label sets ----------------------------------------------------------------------------

def _write(root, version, class_in_cell, previous=None):
    image_id = np.array([30, 10, 20, 40])
    cell_id = np.array([1, 1, 2, 2])
    result = relabel(image_id, cell_id, class_in_cell, previous)
    table = label_table(image_id, cell_id, np.array(["a", "a", "b", "b"], dtype=object), np.array([0, 0, 3, 3]),
                        result.class_in_cell, result.class_id, None if version == 0 else np.ones(4), version)
    return write_label_set(
        root, table, k=3, seed=0, cell_size_m=10.0, previous_version=None if version == 0 else version - 1,
        retired_class_ids=result.retired_class_ids, next_class_id=result.next_class_id,
        images_changed_class=None if version == 0 else result.images_changed_class,
        images_new=result.images_new, method="initial" if version == 0 else "kmeans",
    )


def test_label_set_round_trip_and_incomplete_versions_ignored(tmp_path):
    root = tmp_path / "labels"
    m0 = _write(root, 0, np.array([0, 1, 0, 0]))
    previous, _ = previous_labels(root)
    m1 = _write(root, 1, np.array([0, 1, 0, 1]), previous)  # cell 2 splits: one fresh class
    assert latest_version(root) == 1
    assert m0.counts.images == 4 and m0.counts.cells == 2 and m0.counts.classes == 3
    assert m1.counts.classes == 4 and m1.counts.images_changed_class == 1 and m1.previous_version == 0
    assert m1.next_class_id == 4 and m1.retired_class_ids == []
    assert read_manifest(root).version == 1
    v0 = read_labels(root, 0)
    assert v0.column("image_id").to_pylist() == [10, 20, 30, 40]  # sorted for binary search
    assert np.isnan(v0.column("distance").to_numpy()).all()
    assert read_labels(root).column("label_version").to_pylist() == [1] * 4

    (root / ".v0002.tmp-12345").mkdir()  # a crashed write
    (root / ".v0002.tmp-12345" / "labels.parquet").write_bytes(b"partial")
    (root / "v0002").mkdir()  # a folder that looks like a version but has no manifest
    (root / "v0002" / "labels.parquet").write_bytes(b"x")
    (root / "v0003").mkdir()
    (root / "v0003" / "manifest.json").write_text("{not json")
    assert latest_version(root) == 1
    assert next_version(root) == 4
    with pytest.raises(FileNotFoundError, match="v0002"):
        read_labels(root, 2)

    image_ids, class_ids = class_lookup(read_labels(root))
    assert classes_of(image_ids, class_ids, np.array([40, 99, 10])).tolist() == [class_ids[3], -1, class_ids[0]]


def test_corrupt_label_file_names_the_file(tmp_path):
    root = tmp_path / "labels"
    _write(root, 0, np.array([0, 1, 0, 0]))
    path = root / "v0000" / "labels.parquet"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"v0000/labels\.parquet"):
        read_labels(root)
    manifest = json.loads((root / "v0000" / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 4 and manifest["encoder_checkpoint"] is None


def test_write_never_overwrites_and_failed_write_leaves_no_version(tmp_path):
    root = tmp_path / "labels"
    _write(root, 0, np.array([0, 1, 0, 0]))
    with pytest.raises(FileExistsError):
        _write(root, 0, np.array([0, 0, 0, 0]))
    bad = label_table(np.array([1]), np.array([1]), np.array(["a"], dtype=object), np.array([0]), np.array([0]),
                      np.array([0]), None, 1)
    with pytest.raises(TypeError):
        write_label_set(root, bad, k=3, seed=0, cell_size_m=10.0, previous_version=0, retired_class_ids=[],
                        next_class_id=1, images_changed_class=0, images_new=0, params={"bad": object()})
    assert sorted(p.name for p in root.iterdir()) == ["v0000"]
    shutil.rmtree(root / "v0000")
    assert latest_version(root) is None
