"""Embedding a test split with Ray Data: global descriptors and, for re-ranking, patch tokens.

    rows {"row": i, "path": p} --map_batches(models.embedding.Embedder, actor pool)-->
        {"row", "descriptor" [B, D], "tokens" [B, N, C], "ok"}
    driver: FeatureStore.write(...) per batch, commit every few batches (resumable)

The actors (the same one reclustering uses) read the image files themselves; an image that
cannot be decoded gives a row with ok=False, not a failed job.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from evaluation.dense_store import FeatureStore
from models.embedding import Embedder
from placeforge.raysession import quiet_data_context


def embed_split(store: FeatureStore, paths: list[str], checkpoint: str, batch_size: int, actors: int,
                label: str, commit_every_s: float = 10.0, actor_resources: dict[str, float] | None = None) -> int:
    """Fill every pending row of `store` (the rows of `paths`) with a Ray Data job.

    Returns the number of rows computed now (0 when the store was already complete).
    """
    import ray

    pending = store.pending()
    if len(pending) == 0:
        return 0
    quiet_data_context()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rows = [{"row": int(i), "path": paths[i]} for i in pending]
    embedded = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * actors))).map_batches(
        Embedder, fn_constructor_kwargs={"checkpoint": checkpoint, "id_column": "row",
                                         "keep_tokens": store.tokens is not None},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=1 if gpus else 0, **({"resources": actor_resources} if actor_resources else {}),
    )
    last_commit = time.monotonic()
    with tqdm(total=len(rows), desc=f"embed {label}", unit="img", mininterval=2.0) as bar:
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            store.write(batch["row"], batch["descriptor"], batch.get("tokens"), batch["ok"])
            bar.update(len(batch["row"]))
            if time.monotonic() - last_commit > commit_every_s:
                store.commit()
                last_commit = time.monotonic()
    store.commit()
    return len(rows)
