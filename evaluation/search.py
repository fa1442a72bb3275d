"""Exact nearest-neighbour search of query descriptors in the database, with faiss.

    scores, candidates = exact_search(db_descriptors, query_descriptors, k=100)   # [Q, k] each

Ranked by squared L2 distance (`faiss.IndexFlatL2`, all queries in one call) as
gmberton/VPR-methods-evaluation's main.py ranks, and GSV-Cities' and Pair-VPR's evaluations.
For exactly unit-length descriptors that is the inner-product order; descriptors are unit-length
only to rounding, and ranking by inner product then can put near-equal candidates in another
order than the reference (tests/test_recall_reference.py compares the two to the last query).
The score reported is 1 - d^2 / 2, the cosine similarity of unit vectors (higher is better).
Equal distances are ordered by database index, as faiss's CPU search returns them, so a ranking
never depends on faiss's thread timing.
"""

from __future__ import annotations

import faiss
import numpy as np


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k database descriptors nearest each query.

    Args:
        database: [M, D] descriptors (any float dtype; searched in float32).
        queries: [Q, D].
        k: candidates per query, 1 <= k <= M.
    Returns:
        scores [Q, k] float32 (1 - squared L2 distance / 2), best first; candidates [Q, k] int64
        database indices.
    """
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"descriptor shapes do not match: database {database.shape}, queries {queries.shape}")
    if not 1 <= k <= len(database):
        raise ValueError(f"k must be 1..{len(database)} (the database size), got {k}")
    index = faiss.IndexFlatL2(database.shape[1])
    if faiss.get_num_gpus() > 0:  # faiss-gpu installed and a GPU visible (distances rounded as on the GPU)
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    # One call, as the reference makes it: faiss blocks the queries itself, and whether it computes
    # distances with BLAS depends on the size of a call (faiss.cvar.distance_compute_blas_threshold).
    distances, candidates = index.search(queries, k)  # [Q, k] squared L2, ascending
    order = np.lexsort((candidates, distances), axis=1)  # by distance, then by database index
    distances = np.take_along_axis(distances, order, axis=1)
    return 1.0 - distances / np.float32(2.0), np.take_along_axis(candidates, order, axis=1)
