"""Recall@N equal to gmberton/VPR-methods-evaluation's, query by query and N by N.

The reference (commit adbb6e2 of that repository) is re-implemented here from its code, not
from placeforge's:

  - test_dataset.py: a position is fields 1 and 2 of the "@" name as floats; the positives of
    a query are `NearestNeighbors(n_jobs=-1).fit(database_utms).radius_neighbors(queries_utms,
    radius=25, return_distance=False)` (parser.py: `--positive_dist_threshold` 25);
  - main.py: `faiss.IndexFlatL2` over the float32 descriptors, `search(queries, max(recall_values))`
    with recall_values 1, 5, 10, 20, and a query counts at N when any of its first N predictions
    is a positive (`np.isin`), every query in the denominator.

placeforge goes the way evaluation/job.py goes: `parse_at_names` + `positions_from_fields` (as
evaluation/testset.py reads a folder), `positives_within`, `exact_search` with k = max N over the
descriptors as its feature store (evaluation/dense_store.py) holds them, `correct_matrix`,
`first_correct`, `recall_at`.  The reference gets the model's float32 descriptors themselves,
placeforge the copies read back from a real store written with them.  The generated sets put
positions on a 5 m grid, so many query-database pairs are exactly 25.0 m apart (3-4-5
triangles: 15 m and 20 m), and hold exactly tied descriptor distances: duplicated database
descriptors and a query equidistant from two axis vectors, placed so that the order of a tie
decides a hit, including a tie that straddles rank 20 (the k of the search).
"""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl
import pytest
from sklearn.neighbors import NearestNeighbors

from placeforge.evaluation.dense_store import DONE, FeatureStore, StoreKey
from placeforge.evaluation.job import EvalConfig
from placeforge.evaluation.positions import positions_from_fields
from placeforge.evaluation.recall import correct_matrix, first_correct, positives_within, recall_at
from placeforge.evaluation.search import exact_search
from placeforge.ingest import parse_at_names
from tests.conftest import at_name

NS = (1, 5, 10, 20)
RADIUS_M = 25.0
ORIGIN = np.array([550_000.0, 4_180_000.0])  # UTM zone 10S (San Francisco)
DIM = 32


# --- the reference --------------------------------------------------------------------------------

def reference_hits(db_names: list[str], q_names: list[str], db_descriptors: np.ndarray,
                   q_descriptors: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """VPR-methods-evaluation's protocol -> ([Q, len(NS)] bool hits, [Q] positives, [Q, 20] predictions)."""
    database_utms = np.array([(name.split("@")[1], name.split("@")[2]) for name in db_names]).astype(float)
    queries_utms = np.array([(name.split("@")[1], name.split("@")[2]) for name in q_names]).astype(float)
    knn = NearestNeighbors(n_jobs=-1)
    knn.fit(database_utms)
    positives_per_query = knn.radius_neighbors(queries_utms, radius=25, return_distance=False)

    faiss_index = faiss.IndexFlatL2(db_descriptors.shape[1])
    faiss_index.add(np.ascontiguousarray(db_descriptors, dtype=np.float32))
    _, predictions = faiss_index.search(np.ascontiguousarray(q_descriptors, dtype=np.float32), max(NS))
    hits = np.zeros((len(q_names), len(NS)), dtype=bool)
    for query_index, preds in enumerate(predictions):
        for i, n in enumerate(NS):
            if np.any(np.isin(preds[:n], positives_per_query[query_index])):
                hits[query_index, i:] = True  # main.py: recalls[i:] += 1; break
                break
    return hits, list(positives_per_query), predictions


# --- placeforge, as evaluation/job.py goes from names and descriptors to Recall@N -------------------

def placeforge_hits(db_names: list[str], q_names: list[str], db_descriptors: np.ndarray,
                    q_descriptors: np.ndarray) -> tuple[np.ndarray, dict[int, float], list[np.ndarray]]:
    """([Q, len(NS)] bool hits, {N: Recall@N}, [Q] positives)."""
    cfg = EvalConfig()
    db = positions_from_fields(parse_at_names(pl.Series(db_names)))
    q = positions_from_fields(parse_at_names(pl.Series(q_names)))
    assert db.usable.all() and q.usable.all()
    positives = positives_within(db.east_north, db.zone, q.east_north, q.zone, cfg.radius_m)
    k = min(max(cfg.recall_at), len(db_names))  # job.py's k without a pair classifier
    _, candidates = exact_search(db_descriptors, q_descriptors, k)
    first = first_correct(correct_matrix(candidates, positives))
    hits = np.stack([(first >= 0) & (first < n) for n in NS], axis=1)
    return hits, recall_at(first, cfg.recall_at), positives


# --- a generated set ----------------------------------------------------------------------------

def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def names_at(offsets_m: np.ndarray) -> list[str]:
    """Downloader names (zone 10S) at ORIGIN + offsets; integer metres print exactly with 2 decimals."""
    return [at_name(*(ORIGIN + offset)) for offset in offsets_m]


def generated_set(seed: int) -> dict:
    """300 database images and 184 queries on a 5 m grid, float32 descriptors as a model returns them.

    Returns the names, descriptors and the rows built to probe the reference:
        boundary: queries whose rank-1 image is exactly 25.0 m away (the 25 m edge);
        beyond: queries whose rank-1 image is 25.5 m away (just outside);
        tie_low / tie_high / tie_straddle: queries whose only nearby image sits inside a group
            of identical descriptors, at the group's first, third and 25th index;
        axis_tie: a query equidistant from two database descriptors, the later one positive.
    """
    rng = np.random.default_rng(seed)
    num_db, num_random_q = 300, 150
    db_xy = 5.0 * rng.integers(0, 60, size=(num_db, 2))  # a 300 x 300 m block
    db = unit_rows(rng.normal(size=(num_db, DIM)))

    far = np.array([10_000.0, 10_000.0])  # 14 km away: no positive for anything there
    group = np.arange(200, 225)  # 25 identical descriptors
    db[group] = db[group[0]]
    db_xy[group] = far + 5.0 * np.arange(len(group))[:, None] * np.array([[100.0, 0.0]])  # 500 m apart
    axes = (40, 41)  # two database rows with axis descriptors e0, e1
    db[axes[0]], db[axes[1]] = np.eye(DIM)[0], np.eye(DIM)[1]
    db_xy[axes[0]], db_xy[axes[1]] = far + np.array([0.0, 5_000.0]), far + np.array([0.0, 7_000.0])

    q_xy = [5.0 * rng.integers(-4, 64, size=(num_random_q, 2))]  # around and beyond the block
    q = [unit_rows(db[rng.integers(0, num_db, num_random_q)] + rng.normal(0, 0.9, (num_random_q, DIM)))]
    rows = {}

    def add(name: str, xy: np.ndarray, descriptors: np.ndarray) -> None:
        start = sum(len(part) for part in q_xy)
        rows[name] = np.arange(start, start + len(xy))
        q_xy.append(np.asarray(xy, dtype=float).reshape(-1, 2))
        q.append(np.asarray(descriptors, dtype=float).reshape(-1, DIM))

    edge = rng.choice(np.setdiff1d(np.arange(num_db), [*group, *axes]), size=30, replace=False)
    steps = np.array([[15.0, 20.0], [-20.0, 15.0], [25.0, 0.0], [0.0, -25.0], [-15.0, -20.0]])
    add("boundary", db_xy[edge[:15]] + steps[np.arange(15) % 5], db[edge[:15]])
    add("beyond", db_xy[edge[15:]] + np.array([5.0, 25.0]), db[edge[15:]])  # sqrt(650) = 25.5 m
    add("tie_low", db_xy[group[0]] + [3.0, 4.0], db[group[0]])
    add("tie_high", db_xy[group[2]] + [3.0, 4.0], db[group[0]])
    add("tie_straddle", db_xy[group[-1]] + [3.0, 4.0], db[group[0]])
    add("axis_tie", db_xy[axes[1]] + [0.0, 5.0], unit_rows(np.eye(DIM)[[0]] + np.eye(DIM)[[1]]))

    return {"db_names": names_at(db_xy), "q_names": names_at(np.concatenate(q_xy)),
            "db_xy": db_xy, "q_xy": np.concatenate(q_xy), "db": db.astype(np.float32),
            "q": np.concatenate(q).astype(np.float32), "rows": rows, "group": group, "axes": axes}


def through_store(folder, descriptors: np.ndarray) -> np.ndarray:
    """[M, D] descriptors written to a feature store, committed, reopened and read back as job.py reads them."""
    key = StoreKey("sha", f"{len(descriptors)} images", 322, descriptors.shape[1], None)
    store = FeatureStore.open(folder, key, rows=len(descriptors))
    store.write(np.arange(len(descriptors))[::-1], descriptors[::-1], None, np.ones(len(descriptors), bool))
    store.commit()
    del store
    again = FeatureStore.open(folder, key, rows=len(descriptors))
    return again.descriptors[np.flatnonzero(again.done == DONE)]


# --- the tests --------------------------------------------------------------------------------------

# The reference ranks the model's float32 descriptors; placeforge ranks what its feature store gives
# back.  When the store kept float16 (format 1), unit length held only to ~1e-4, and ranking by
# inner product instead of L2 distance changed hits in sets 4, 8 and 11 (placeforge before this test).
@pytest.mark.parametrize("seed", range(12))
def test_recall_equals_the_reference_for_every_query_and_every_n(seed, tmp_path):
    s = generated_set(seed)
    db, q = through_store(tmp_path / "database", s["db"]), through_store(tmp_path / "queries", s["q"])
    assert db.dtype == q.dtype == np.float32
    assert np.array_equal(db, s["db"]) and np.array_equal(q, s["q"])  # bit for bit what the model returned
    ref_hits, ref_positives, _ = reference_hits(s["db_names"], s["q_names"], s["db"], s["q"])
    hits, recall, positives = placeforge_hits(s["db_names"], s["q_names"], db, q)

    assert [p.tolist() for p in positives] == [sorted(p.tolist()) for p in ref_positives]
    mismatched = np.flatnonzero((hits != ref_hits).any(axis=1))
    assert mismatched.size == 0, f"queries {mismatched.tolist()} differ from the reference"
    assert recall == {n: float(ref_hits[:, i].sum()) / len(s["q_names"]) for i, n in enumerate(NS)}
    assert 0 < recall[1] < recall[20] < 1  # neither all right nor all wrong


def test_the_generated_set_probes_the_25_m_edge_and_tie_order():
    """What the equality above covers: the reference's own answers on the probes, so a change of
    set that lost them would fail here."""
    s = generated_set(0)
    ref_hits, ref_positives, predictions = reference_hits(s["db_names"], s["q_names"], s["db"], s["q"])
    distances = np.linalg.norm(s["q_xy"][:, None] - s["db_xy"][None], axis=2)  # [Q, M] metres
    exactly_25 = np.argwhere(distances == RADIUS_M)
    assert len(exactly_25) > 100  # the grid gives many pairs at exactly 25.0 m ...
    assert all(d in ref_positives[q] for q, d in exactly_25)  # ... and the reference counts every one
    rows = s["rows"]
    assert ref_hits[rows["boundary"], 0].all()  # rank 1 is 25.0 m away: a hit
    assert not ref_hits[rows["beyond"], 0].any()  # rank 1 is 25.5 m away: a miss

    group, axes = s["group"], s["axes"]
    for name in ("tie_low", "tie_high", "tie_straddle"):
        # Equal distances come back by ascending database index, the first 20 of the group.
        assert predictions[rows[name][0]].tolist() == group[:20].tolist()
    assert ref_hits[rows["tie_low"][0]].tolist() == [True] * 4
    assert ref_hits[rows["tie_high"][0]].tolist() == [False, True, True, True]  # group's 3rd index: rank 3
    assert ref_hits[rows["tie_straddle"][0]].tolist() == [False] * 4  # 25th index: cut at rank 20
    axis_query = rows["axis_tie"][0]
    assert predictions[axis_query, :2].tolist() == list(axes)  # an exact tie of two distinct descriptors
    assert ref_positives[axis_query].tolist() == [axes[1]]
    assert ref_hits[axis_query].tolist() == [False, True, True, True]


def test_placeforge_breaks_ties_and_treats_the_edge_as_the_reference_does():
    s = generated_set(1)
    hits, _, positives = placeforge_hits(s["db_names"], s["q_names"], s["db"], s["q"])
    rows, group, axes = s["rows"], s["group"], s["axes"]
    assert hits[rows["tie_high"][0]].tolist() == [False, True, True, True]
    assert hits[rows["tie_straddle"][0]].tolist() == [False] * 4
    assert hits[rows["axis_tie"][0]].tolist() == [False, True, True, True]
    assert positives[rows["tie_straddle"][0]].tolist() == [group[-1]]
    assert hits[rows["boundary"], 0].all()
    _, candidates = exact_search(s["db"], s["q"][rows["tie_straddle"]], 20)
    assert candidates[0].tolist() == group[:20].tolist()
    assert axes[1] in positives[rows["axis_tie"][0]]


def test_ranking_is_by_l2_distance_not_inner_product_when_lengths_are_not_exactly_one():
    # Two database descriptors of lengths 1.003 and 0.999 (as float16 rounding leaves unit vectors): the
    # first has the larger inner product with the query, the second the smaller L2 distance.
    database = np.array([[0.601, 0.803], [0.600, 0.799]], dtype=np.float16)
    query = np.array([[1.0, 0.0]], dtype=np.float16)
    longer, shorter = database.astype(np.float32) @ query[0].astype(np.float32)
    assert longer > shorter
    scores, candidates = exact_search(database, query, k=2)
    assert candidates.tolist() == [[1, 0]]  # as faiss.IndexFlatL2 ranks, the reference's search
    distances = ((database.astype(np.float32) - query.astype(np.float32)) ** 2).sum(axis=1)
    np.testing.assert_allclose(scores[0], 1 - distances[[1, 0]] / 2, rtol=1e-6)  # the cosine of unit vectors


def test_float16_copies_would_not_match_the_reference():
    """Why the store keeps float32 descriptors: the float16 copies of format 1, ranked against the
    reference on the model's float32 descriptors, change the hit of a query in sets 4, 7 and 8."""
    for seed, query in ((4, 44), (7, 8), (8, 140)):
        s = generated_set(seed)
        ref_hits, _, _ = reference_hits(s["db_names"], s["q_names"], s["db"], s["q"])
        hits, _, _ = placeforge_hits(s["db_names"], s["q_names"], s["db"].astype(np.float16),
                                     s["q"].astype(np.float16))
        assert np.flatnonzero((hits != ref_hits).any(axis=1)).tolist() == [query]
