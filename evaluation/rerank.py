"""Re-ranking the global top K with the pair classifier (Pair-VPR's second stage).

    scores = pair_scores(pair, query_tokens, db_tokens, candidates, grid)    # [Q, K]; db_grid if it differs
    order, reranked = rerank_order(candidates, scores)                       # [Q, K] each

Each candidate's score is logit(query, candidate) + logit(candidate, query): the pair
classifier is not symmetric (A attends to B), so both directions are scored, as Pair-VPR
does; a classifier with a `global_weight` w > 0 (not in Pair-VPR) adds w x the global
descriptors' cosine of the pair.  Tokens are read from the feature store's memory maps one chunk of queries at a
time, so only ~`pairs_per_batch` candidates' tokens are in memory at once.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from placeforge.models.heads import PairClassifier


def pair_scores(pair: PairClassifier, query_tokens: np.ndarray, db_tokens: np.ndarray, candidates: np.ndarray,
                grid: tuple[int, int], pairs_per_batch: int = 512, progress: bool = True,
                query_rows: np.ndarray | None = None, db_grid: tuple[int, int] | None = None,
                global_scores: np.ndarray | None = None) -> np.ndarray:
    """Symmetric same-place scores of every (query, candidate) pair.

    Args:
        pair: the stage-2 pair classifier (eval mode, on the device to use).
        query_tokens: [Q, N, C] float16 patch tokens (a memmap is fine).
        db_tokens: [M, N', C] float16.
        candidates: [Q, K] database indices.
        query_rows: [Q] rows of `query_tokens` the candidates belong to (default 0..Q-1), so a
            memmap of every query is read a chunk at a time, never copied whole.
        grid: (gh, gw) patch grid of the queries, N = gh * gw.
        db_grid: (gh', gw') of the database, N' = gh' * gw' (default `grid`); the two differ
            when images keep their aspect ratio ("short_side") and the splits' shapes differ.
        pairs_per_batch: pairs per classifier call.
        global_scores: [Q, K] global cosine of each pair; required when `pair.global_weight` > 0.
    Returns:
        [Q, K] float32 scores, higher = more likely the same place.
    """
    device = next(pair.parameters()).device
    queries, k = candidates.shape
    scores = np.empty((queries, k), dtype=np.float32)
    per_chunk = max(1, pairs_per_batch // k)  # whole queries per call
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"), \
            tqdm(total=queries * k, desc="re-rank", unit="pair", mininterval=2.0, disable=not progress) as bar:
        for start in range(0, queries, per_chunk):
            rows = slice(start, min(start + per_chunk, queries))
            chunk = candidates[rows]  # [q, K]
            wanted = np.unique(chunk)  # each database row read once per chunk, in file order
            db = torch.from_numpy(np.asarray(db_tokens[wanted])).to(device).float()  # [u, N, C]
            where = torch.from_numpy(np.searchsorted(wanted, chunk.ravel())).to(device)  # [q * K]
            wanted_queries = np.arange(queries)[rows] if query_rows is None else query_rows[rows]
            query = torch.from_numpy(np.asarray(query_tokens[wanted_queries])).to(device).float()  # [q, N, C]
            query = query.repeat_interleave(k, dim=0)  # [q * K, N, C]
            logits = pair.score(query, db[where], grid, db_grid)  # [q * K]
            scores[rows] = logits.float().cpu().numpy().reshape(chunk.shape)
            bar.update(chunk.size)
    if pair.global_weight:
        if global_scores is None:
            raise ValueError(f"this pair classifier adds {pair.global_weight} x the global cosine: pass global_scores")
        scores += np.float32(pair.global_weight) * np.asarray(global_scores, dtype=np.float32)
    return scores


def rerank_order(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each query's candidates by pair score (ties: the global order is kept).

    Args:
        candidates: [Q, K] database indices in global-descriptor order; scores [Q, K].
    Returns:
        order [Q, K] (positions into the global list), reranked candidates [Q, K].
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, np.take_along_axis(candidates, order, axis=1)
