"""Recall during training: Recall@1/5 of the current model on a validation split.

    split = ValidationSplit.open("atname:CITY/atname/val/database", "atname:CITY/atname/val/queries")
    result = validate(global_model, pair, split, resize="squash", device=device)
    # {"val_r1": .., "val_r5": .., "val_reranked_r1": .., "val_reranked_r5": .., "val_s": ..}

The same protocol as pipelines/evaluate.py (positives within `radius_m`, a query with none a
miss, exact search, both-direction pair scores over the global top K), in the training
process on rank 0, with no Ray and no files: images are decoded batch by batch at every
validation, descriptors kept in RAM ([M, D] float32), and the patch tokens of the database
only when re-ranking ([M, N, C] float16; 13 MiB for the demo's 400 images). A validation
set too large for that is better served by pipelines/evaluate.py on the exported models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from evaluation.recall import correct_matrix, first_correct, positives_within, recall_at
from evaluation.rerank import pair_scores, rerank_order
from evaluation.search import exact_search
from evaluation.testset import Split, read_split
from models.embedding import decode_batch
from models.encoders import GlobalDescriptorModel
from models.heads import PairClassifier

RECALL_AT = (1, 5)


@dataclass(frozen=True)
class ValidationSplit:
    database: Split
    queries: Split
    positives: list[np.ndarray]  # [Q] database indices within radius_m of each query

    @classmethod
    def open(cls, database: str, queries: str, radius_m: float = 25.0) -> "ValidationSplit":
        """Read both sides (FORMAT:PATH, as pipelines/evaluate.py's --database / --queries)."""
        db, q = read_split(database, "database"), read_split(queries, "queries")
        return cls(db, q, positives_within(db.east_north, db.zone, q.east_north, q.zone, radius_m))


@torch.inference_mode()
def embed_paths(model: GlobalDescriptorModel, paths: list[str], image_size: int, resize: str, device: torch.device,
                keep_tokens: bool, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """Descriptors [M, D] float32 and, with keep_tokens, patch tokens [M, N, C] float16 of image files."""
    from placeforge.ingest.listing import read_image_file

    descriptors, tokens = [], []
    for start in range(0, len(paths), batch_size):
        images, _ = decode_batch([read_image_file(p) for p in paths[start:start + batch_size]], image_size, resize)
        features = model.forward_features(images.to(device))  # [B, P + N, C]
        descriptors.append(model.pool(features).float().cpu().numpy())
        if keep_tokens:
            tokens.append(features[:, model.encoder.num_prefix_tokens:].to(torch.float16).cpu().numpy())
    return np.concatenate(descriptors), (np.concatenate(tokens) if keep_tokens else None)


def validate(model: GlobalDescriptorModel, pair: PairClassifier | None, split: ValidationSplit, image_size: int,
             resize: str, device: torch.device, rerank_top_k: int = 20) -> dict[str, float]:
    """Recall@1/5 (%) of `model` on `split`, and after re-ranking the top K with `pair` when given.

    The modules are put in eval mode for the measurement and back in their previous mode after.
    """
    started = time.perf_counter()
    modes = [(m, m.training) for m in (model, pair) if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        keep = pair is not None and rerank_top_k > 0
        db, db_tokens = embed_paths(model, split.database.paths, image_size, resize, device, keep)
        q, q_tokens = embed_paths(model, split.queries.paths, image_size, resize, device, keep)
        k = min(max(RECALL_AT[-1], rerank_top_k), len(db))
        _, candidates = exact_search(db, q, k)
        result = _recall("val", candidates, split.positives)
        if keep:
            side = image_size // model.encoder.patch_embed.patch_size[0]
            scores = pair_scores(pair, q_tokens, db_tokens, candidates[:, :rerank_top_k], (side, side), progress=False)
            _, reranked = rerank_order(candidates[:, :rerank_top_k], scores)
            result.update(_recall("val_reranked", reranked, split.positives))
    finally:
        for module, was_training in modes:
            module.train(was_training)
    result["val_s"] = time.perf_counter() - started
    return result


def _recall(prefix: str, candidates: np.ndarray, positives: list[np.ndarray]) -> dict[str, float]:
    first = first_correct(correct_matrix(candidates, positives))
    return {f"{prefix}_r{n}": 100.0 * r for n, r in recall_at(first, RECALL_AT).items()}
