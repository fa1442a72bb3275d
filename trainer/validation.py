"""Recall during training: Recall@1/5 of the current model on a validation split.

    split = ValidationSplit.open("atname:CITY/atname/val/database", "atname:CITY/atname/val/queries")
    result = validate(global_model, pair, split, image_size=64, resize="squash", device=device)
    # {"val_r1": .., "val_r5": .., "val_reranked_r1": .., "val_reranked_r5": .., "val_s": ..}
    record_validation(out / "export", {"epoch": 3, **result}, out / "export/model_epoch0003.pt")
    print(validation_summary(out / "export", "val queries"))   # the curve and the best epoch

The same protocol as pipelines/evaluate.py (positives within `radius_m`, a query with none a
miss, exact search, both-direction pair scores over the global top K), in the training
process on rank 0, with no Ray and no files: images are decoded batch by batch at every
validation, descriptors kept in RAM ([M, D] float32), and the patch tokens of the database
only when re-ranking ([M, N, C] float16; 13 MiB for the demo's 400 images). A validation
set too large for that is better served by pipelines/evaluate.py on the exported models.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from placeforge.evaluation.recall import correct_matrix, first_correct, positives_within, recall_at
from placeforge.evaluation.rerank import pair_scores, rerank_order
from placeforge.evaluation.search import exact_search
from placeforge.evaluation.testset import Split, read_split
from placeforge.models.encoders import GlobalDescriptorModel, decode_images
from placeforge.models.heads import PairClassifier

RECALL_AT = (1, 5)
VALIDATION_FILE = "validation.json"  # in export/: every validation of the run and its best epoch
BEST_MODEL_FILE = "best_model.pt"  # in export/: a copy of the best epoch's model_epochNNNN.pt


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
def embed_paths(model: GlobalDescriptorModel, paths: list[str], image_size: int | tuple[int, int], resize: str,
                device: torch.device, keep_tokens: bool, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """Descriptors [M, D] float32 and, with keep_tokens, patch tokens [M, N, C] float16 of image files.
    `image_size`: S, or (H, W) for "short_side" (`evaluation.embed.split_input_hw`)."""
    from placeforge.ingest.listing import read_image_file

    descriptors, tokens = [], []
    for start in range(0, len(paths), batch_size):
        images, _ = decode_images([read_image_file(p) for p in paths[start:start + batch_size]], image_size, resize)
        images = images.to(device)
        features = model.forward_features(images)  # [B, P + N, C]
        descriptors.append(model.pool(features, model.token_grid(images)).float().cpu().numpy())
        if keep_tokens:
            tokens.append(features[:, model.encoder.num_prefix_tokens:].to(torch.float16).cpu().numpy())
    return np.concatenate(descriptors), (np.concatenate(tokens) if keep_tokens else None)


def validate(model: GlobalDescriptorModel, pair: PairClassifier | None, split: ValidationSplit, image_size: int,
             resize: str, device: torch.device, rerank_top_k: int = 20) -> dict[str, float]:
    """Recall@1/5 (%) of `model` on `split`, and after re-ranking the top K with `pair` when given.

    With resize "short_side" each side keeps its images' aspect ratio (its most common size,
    as pipelines/evaluate.py), so the two patch grids the pair classifier compares may differ.
    The modules are put in eval mode for the measurement and back in their previous mode after.
    """
    from placeforge.evaluation.embed import split_input_hw

    started = time.perf_counter()
    modes = [(m, m.training) for m in (model, pair) if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        keep = pair is not None and rerank_top_k > 0
        patch = model.encoder.patch_embed.patch_size[0]
        db_hw = split_input_hw(split.database.paths, image_size, resize, patch)
        q_hw = split_input_hw(split.queries.paths, image_size, resize, patch)
        short_side = resize == "short_side"  # crop and squash take S, short_side one (H, W) per side
        db, db_tokens = embed_paths(model, split.database.paths, db_hw if short_side else image_size, resize, device,
                                    keep)
        q, q_tokens = embed_paths(model, split.queries.paths, q_hw if short_side else image_size, resize, device, keep)
        k = min(max(RECALL_AT[-1], rerank_top_k), len(db))
        similarity, candidates = exact_search(db, q, k)
        result = _recall("val", candidates, split.positives)
        if keep:
            scores = pair_scores(pair, q_tokens, db_tokens, candidates[:, :rerank_top_k], (q_hw[0] // patch, q_hw[1] // patch),
                                 progress=False, db_grid=(db_hw[0] // patch, db_hw[1] // patch),
                                 global_scores=similarity[:, :rerank_top_k])
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


def record_validation(export_dir: Path, record: dict, exported: Path) -> None:
    """Add one validation `record` to EXPORT/validation.json; when its global Recall@1 is the
    best so far (ties: the later epoch), copy `exported` to EXPORT/best_model.pt.  A resumed run
    that validates an epoch again replaces that epoch's record."""
    from placeforge.fileio import atomic_write, write_json_atomic

    path = export_dir / VALIDATION_FILE
    summary = json.loads(path.read_text()) if path.is_file() else {"history": [], "best": None}
    summary["history"] = [r for r in summary["history"] if r["epoch"] < record["epoch"]] + [record]
    if summary["best"] is None or record["val_r1"] >= summary["best"]["val_r1"]:
        summary["best"] = {**record, "model": exported.name}
        atomic_write(export_dir / BEST_MODEL_FILE, lambda tmp: shutil.copyfile(exported, tmp))
    write_json_atomic(path, summary)


def validation_summary(export_dir: Path, label: str) -> str:
    """The curve and the best epoch from EXPORT/validation.json, for the training summary."""
    path = export_dir / VALIDATION_FILE
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    lines = [f"validation Recall@1 / @5 by epoch ({label}):"]
    for r in summary["history"]:
        reranked = (f", re-ranked {r['val_reranked_r1']:.1f} / {r['val_reranked_r5']:.1f}"
                    if "val_reranked_r1" in r else "")
        lines.append(f"  epoch {r['epoch']:>3}: {r['val_r1']:5.1f} / {r['val_r5']:5.1f}{reranked}")
    best = summary["best"]
    lines.append(f"best epoch {best['epoch']} (global Recall@1 {best['val_r1']:.1f}): "
                 f"{export_dir / BEST_MODEL_FILE} (= {best['model']})")
    return "\n".join(lines)
