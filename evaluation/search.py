"""Exact nearest-neighbour search of query descriptors in the database, with faiss.

    scores, candidates = exact_search(db_descriptors, query_descriptors, k=100)   # [Q, k] each

Descriptors are L2-normalised, so inner product ranks exactly as L2 distance does; the
score reported is the cosine similarity (higher is better).  Equal scores are ordered by
database index, so a ranking never depends on faiss's thread timing.
"""

from __future__ import annotations

import faiss
import numpy as np


def exact_search(database: np.ndarray, queries: np.ndarray, k: int, query_batch: int = 4096
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar database descriptors of every query.

    Args:
        database: [M, D] descriptors (any float dtype; searched in float32).
        queries: [Q, D].
        k: candidates per query, 1 <= k <= M.
        query_batch: queries per faiss call (bounds the [batch, k] result memory).
    Returns:
        scores [Q, k] float32, best first; candidates [Q, k] int64 database indices.
    """
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"descriptor shapes do not match: database {database.shape}, queries {queries.shape}")
    if not 1 <= k <= len(database):
        raise ValueError(f"k must be 1..{len(database)} (the database size), got {k}")
    index = faiss.IndexFlatIP(database.shape[1])
    if faiss.get_num_gpus() > 0:  # faiss-gpu installed and a GPU visible
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    scores = np.empty((len(queries), k), dtype=np.float32)
    candidates = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), query_batch):
        part = slice(start, start + query_batch)
        scores[part], candidates[part] = index.search(queries[part], k)
    order = np.lexsort((candidates, -scores), axis=1)  # by score, then by database index
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)
