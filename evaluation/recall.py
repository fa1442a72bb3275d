"""Recall@N: which database images are right for a query, and how early the ranking finds one.

    positives = positives_within(db_east_north, db_zone, q_east_north, q_zone, radius_m=25.0)
    correct = correct_matrix(candidates, positives)           # [Q, K] bool
    first = first_correct(correct)                            # [Q] rank of the first right one, -1: none
    recall = recall_at(first, (1, 5, 10, 20))                 # {1: 0.62, 5: 0.81, ...}

A database image is right for a query when both have the same zone key (a UTM zone, or 0 for
the mock coordinates of evaluation/positions.py) and lie within `radius_m` of each other (the
standard 25 m, inclusive, as sklearn's radius search in the reference evaluator).  A query
with no database image inside the radius counts as a miss at every N: the denominator is
every query, so a test set cannot look better by having unanswerable queries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.spatial import KDTree


def positives_within(db_east_north: np.ndarray, db_zone: np.ndarray, q_east_north: np.ndarray,
                     q_zone: np.ndarray, radius_m: float) -> list[np.ndarray]:
    """Database indices within `radius_m` of each query, ascending.

    Args:
        db_east_north: [M, 2] UTM easting, northing in metres; db_zone [M] zone keys (e.g. "10S"
            or a zone number, 0 for mock coordinates); coordinates of different zones are not comparable.
        q_east_north: [Q, 2]; q_zone [Q].
        radius_m: distance in metres (inclusive).
    Returns:
        Q int64 arrays of database indices.
    """
    if radius_m <= 0:
        raise ValueError(f"radius_m must be > 0, got {radius_m}")
    db_east_north = np.asarray(db_east_north, dtype=np.float64).reshape(-1, 2)
    q_east_north = np.asarray(q_east_north, dtype=np.float64).reshape(-1, 2)
    db_zone, q_zone = np.asarray(db_zone), np.asarray(q_zone)
    positives = [np.empty(0, dtype=np.int64)] * len(q_east_north)
    for zone in np.unique(q_zone):
        queries = np.flatnonzero(q_zone == zone)
        database = np.flatnonzero(db_zone == zone)
        if len(database) == 0:
            continue
        tree = KDTree(db_east_north[database])
        for query, hits in zip(queries, tree.query_ball_point(q_east_north[queries], r=radius_m)):
            positives[query] = np.sort(database[np.asarray(hits, dtype=np.int64)])
    return positives


def correct_matrix(candidates: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """[Q, K] database indices, best first (-1: no candidate) -> [Q, K] bool, True where right."""
    candidates = np.asarray(candidates)
    correct = np.zeros(candidates.shape, dtype=bool)
    for query, right in enumerate(positives):
        if len(right):
            correct[query] = np.isin(candidates[query], right)
    return correct


def first_correct(correct: np.ndarray) -> np.ndarray:
    """[Q, K] bool -> [Q] int64, the 0-based rank of the first right candidate, -1 if none."""
    correct = np.asarray(correct, dtype=bool)
    first = np.argmax(correct, axis=1).astype(np.int64)
    first[~correct.any(axis=1)] = -1
    return first


def recall_at(first: np.ndarray, ns: Sequence[int]) -> dict[int, float]:
    """Fraction of all queries whose first right candidate is within the top N, for each N."""
    first = np.asarray(first)
    if len(first) == 0:
        raise ValueError("no queries: recall is undefined")
    found = first >= 0
    return {int(n): float(np.mean(found & (first < n))) for n in ns}


def recall_curve(first: np.ndarray, max_n: int) -> list[float]:
    """Recall@1 .. Recall@max_n as a list (index 0 is N = 1)."""
    return list(recall_at(first, range(1, max_n + 1)).values())
