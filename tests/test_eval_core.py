"""Evaluation core without Ray: positives, Recall@N, exact search, the feature store, re-ranking.

Recall is checked on hand-made descriptors with known answers, and against a second, plain
implementation (sklearn radius neighbours + a brute-force numpy ranking).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from placeforge.evaluation.dense_store import DONE, FAILED, FeatureStore, StoreKey
from placeforge.evaluation.recall import correct_matrix, first_correct, positives_within, recall_at, recall_curve
from placeforge.evaluation.rerank import pair_scores, rerank_order
from placeforge.evaluation.search import exact_search
from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
from placeforge.models.heads import PairClassifier


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_recall_on_hand_made_descriptors_with_known_answers():
    # Database: 4 images on a line 10 m apart; descriptors are axis directions.
    db_xy = np.array([[0, 0], [10, 0], [20, 0], [100, 0]], dtype=float)
    db = np.eye(4, dtype=np.float32)
    # q0 sits at db 0 and looks like db 0 (right at rank 1); q1 sits at db 3 but looks like
    # db 1 then db 3 (right at rank 2); q2 is 500 m away from everything (no positive: a miss).
    q_xy = np.array([[1, 0], [99, 0], [500, 0]], dtype=float)
    queries = unit(np.array([[1, 0.1, 0, 0], [0, 1, 0, 0.5], [0, 0, 1, 0]], dtype=float))
    zones = np.full(4, 10), np.full(3, 10)
    positives = positives_within(db_xy, zones[0], q_xy, zones[1], radius_m=25.0)
    assert [p.tolist() for p in positives] == [[0, 1, 2], [3], []]
    scores, candidates = exact_search(db, queries, k=4)
    assert candidates[0, 0] == 0 and candidates[1, :2].tolist() == [1, 3]
    first = first_correct(correct_matrix(candidates, positives))
    assert first.tolist() == [0, 1, -1]
    assert recall_at(first, (1, 2, 4)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(2 / 3)}
    assert recall_curve(first, 3) == pytest.approx([1 / 3, 2 / 3, 2 / 3])


def test_positives_never_cross_utm_zones_and_radius_is_inclusive():
    db_xy = np.array([[500000.0, 4e6], [500025.0, 4e6]])
    positives = positives_within(db_xy, np.array([10, 11]), np.array([[500000.0, 4e6]]), np.array([11]), 25.0)
    assert positives[0].tolist() == [1]  # same coordinates in zone 10 do not count; 25 m exactly does


def test_equal_scores_rank_by_database_index():
    db = np.tile(unit(np.array([[1.0, 1.0]])), (5, 1))  # five identical descriptors
    scores, candidates = exact_search(db, unit(np.array([[1.0, 0.9]])), k=5)
    assert candidates[0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"k must be 1\.\.5"):
        exact_search(db, db, k=6)


def plain_recall(db: np.ndarray, queries: np.ndarray, db_xy: np.ndarray, q_xy: np.ndarray, radius_m: float,
                 ns: tuple[int, ...]) -> dict[int, float]:
    """The second implementation: sklearn radius neighbours, a full numpy similarity matrix."""
    neighbours = NearestNeighbors(radius=radius_m).fit(db_xy)
    positives = neighbours.radius_neighbors(q_xy, return_distance=False)
    ranking = np.argsort(-(queries.astype(np.float64) @ db.astype(np.float64).T), axis=1, kind="stable")
    hits = {n: 0 for n in ns}
    for query, right in enumerate(positives):
        for n in ns:
            hits[n] += bool(np.isin(ranking[query, :n], right).any())
    return {n: hits[n] / len(queries) for n in ns}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_an_independent_plain_implementation(seed):
    rng = np.random.default_rng(seed)
    db_xy = rng.uniform(0, 400, size=(300, 2))
    q_xy = np.concatenate([db_xy[:120] + rng.normal(0, 8, size=(120, 2)), rng.uniform(2000, 3000, (10, 2))])
    db = unit(rng.normal(size=(300, 16)))
    # Queries resemble their source image plus noise, and share the float16 rounding of a store.
    queries = unit(np.concatenate([db[:120] + rng.normal(0, 0.6, (120, 16)), rng.normal(size=(10, 16))]))
    db, queries = db.astype(np.float16), queries.astype(np.float16)
    ns = (1, 5, 10, 20)
    positives = positives_within(db_xy, np.zeros(300), q_xy, np.zeros(130), 25.0)
    _, candidates = exact_search(db, queries, k=20)
    ours = recall_at(first_correct(correct_matrix(candidates, positives)), ns)
    assert ours == plain_recall(db.astype(np.float32), queries.astype(np.float32), db_xy, q_xy, 25.0, ns)
    assert 0 < ours[1] < ours[20] < 1  # a non-trivial case: neither all right nor all wrong


def test_feature_store_resumes_exactly_and_rebuilds_for_another_checkpoint(tmp_path):
    key = StoreKey("sha-a", "images-1", 56, 4, (16, 8))
    store = FeatureStore.open(tmp_path / "db", key, rows=6)
    assert store.pending().tolist() == list(range(6))
    store.write(np.array([3, 1]), np.ones((2, 4)), np.full((2, 16, 8), 2.0), np.array([True, False]))
    store.commit()
    store.write(np.array([5]), np.ones((1, 4)), np.ones((1, 16, 8)), np.array([True]))  # never committed: "killed"
    del store
    again = FeatureStore.open(tmp_path / "db", key, rows=6)
    assert again.pending().tolist() == [0, 2, 4, 5]
    assert again.done[3] == DONE and again.failed().tolist() == [1] and again.done[1] == FAILED
    assert float(again.tokens[3].max()) == 2.0 and again.tokens.dtype == np.float16
    other = FeatureStore.open(tmp_path / "db", StoreKey("sha-b", "images-1", 56, 4, (16, 8)), rows=6)
    assert other.pending().tolist() == list(range(6))  # another checkpoint: nothing reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no temporary folder left


def trained_pair_classifier(tokens: int, width: int, steps: int = 300) -> PairClassifier:
    """A tiny pair classifier trained here: same place = B is A plus small noise."""
    torch.manual_seed(0)
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), width, 14), hidden_dim=32)
    optimizer = torch.optim.Adam(pair.parameters(), lr=2e-3)
    grid = (int(tokens ** 0.5),) * 2
    for _ in range(steps):
        a = torch.randn(16, tokens, width)
        same = a + 0.1 * torch.randn_like(a)
        other = torch.randn(16, tokens, width)
        logits = torch.cat([pair(a, same, grid), pair(a, other, grid)])
        targets = torch.cat([torch.ones(16), torch.zeros(16)])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return pair.eval()


def test_reranking_moves_the_right_candidate_to_the_top():
    tokens, width = 4, 16  # a 2 x 2 patch grid of 16-wide tokens: trains in seconds
    pair = trained_pair_classifier(tokens, width)
    rng = np.random.default_rng(1)
    db_tokens = rng.normal(size=(10, tokens, width)).astype(np.float16)  # [M, N, C]
    query_tokens = (db_tokens[[7, 2]] + 0.1 * rng.normal(size=(2, tokens, width))).astype(np.float16)
    # Global search put the right image (7 for query 0, 2 for query 1) at rank 3 and 5.
    candidates = np.array([[1, 4, 7, 0, 9], [3, 5, 8, 6, 2]])
    scores = pair_scores(pair, query_tokens, db_tokens, candidates, (2, 2), pairs_per_batch=3, progress=False)
    order, reranked = rerank_order(candidates, scores)
    assert reranked[:, 0].tolist() == [7, 2]
    assert sorted(reranked[0].tolist()) == sorted(candidates[0].tolist())  # a permutation, nothing lost
    # Batching does not change scores: one call with every pair gives the same values.
    whole = pair_scores(pair, query_tokens, db_tokens, candidates, (2, 2), pairs_per_batch=1000, progress=False)
    np.testing.assert_allclose(scores, whole, rtol=1e-4, atol=1e-4)
    # Queries addressed by row in a larger store (how evaluation passes its memmap) score the same.
    store = np.concatenate([np.zeros_like(query_tokens[:1]), query_tokens])  # row 0: another query
    by_row = pair_scores(pair, store, db_tokens, candidates, (2, 2), pairs_per_batch=3, progress=False,
                         query_rows=np.array([1, 2]))
    np.testing.assert_allclose(by_row, scores, rtol=1e-5, atol=1e-5)
    # Both directions: the score is logit(q, db) + logit(db, q).
    with torch.no_grad():
        q = torch.from_numpy(query_tokens[:1]).float()
        d = torch.from_numpy(db_tokens[[7]]).float()
        expected = pair(q, d, (2, 2)) + pair(d, q, (2, 2))
    assert scores[0, 2] == pytest.approx(float(expected), abs=1e-4)


def test_a_global_weight_adds_that_much_of_the_global_cosine_to_the_score():
    tokens, width = 4, 16
    pair = trained_pair_classifier(tokens, width)
    rng = np.random.default_rng(2)
    db_tokens = rng.normal(size=(6, tokens, width)).astype(np.float16)
    query_tokens = rng.normal(size=(2, tokens, width)).astype(np.float16)
    candidates = np.array([[0, 1, 2], [3, 4, 5]])
    cosine = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.4]], dtype=np.float32)
    plain = pair_scores(pair, query_tokens, db_tokens, candidates, (2, 2), progress=False)
    pair.global_weight = 20.0
    with pytest.raises(ValueError, match="pass global_scores"):
        pair_scores(pair, query_tokens, db_tokens, candidates, (2, 2), progress=False)
    fused = pair_scores(pair, query_tokens, db_tokens, candidates, (2, 2), progress=False, global_scores=cosine)
    np.testing.assert_allclose(fused, plain + 20.0 * cosine, rtol=1e-6, atol=1e-5)
    # A large enough weight gives back the global order.
    pair.global_weight = 1e6
    strong = pair_scores(pair, query_tokens, db_tokens, candidates, (2, 2), progress=False, global_scores=cosine)
    assert rerank_order(candidates, strong)[1].tolist() == [[0, 1, 2], [4, 5, 3]]
