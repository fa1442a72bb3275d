"""Embedding a test split with Ray Data: global descriptors and, for re-ranking, patch tokens.

    rows {"row": i, "path": p} --map_batches(models.embedding.Embedder, actor pool)-->
        {"row", "descriptor" [B, D], "tokens" [B, N, C], "ok"}
    driver: FeatureStore.write(...) per batch, commit every few batches (resumable)

The actors (the same one reclustering uses) read the image files themselves; an image that
cannot be decoded gives a row with ok=False, not a failed job.  Every image of a split is
resized to one input size (`split_input_hw`): a batch is one tensor, and a store row holds
one patch grid.  With "short_side" that size comes from the split's most common image size
(benchmarks have one per split); an image of another aspect ratio is resized to it as well.
"""

from __future__ import annotations

import io
import time
from collections import Counter

from PIL import Image
from tqdm import tqdm

from placeforge.evaluation.dense_store import FeatureStore
from placeforge.ingest.listing import read_image_file
from placeforge.models.embedding import Embedder
from placeforge.models.encoders import short_side_hw
from placeforge.raysession import quiet_data_context

# Image headers read to find a split's input size under "short_side" (evenly spaced).
SIZE_SAMPLE = 16


def split_input_hw(paths: list[str], image_size: int, resize: str, patch_size: int,
                   sample: int = SIZE_SAMPLE) -> tuple[int, int]:
    """(H, W) pixels every image of the split is resized to.

    S x S for "crop" and "squash"; for "short_side", `short_side_hw` of the most common
    (width, height) among `sample` evenly spaced images that open (ties: the first seen), or
    S x S when none opens (the actors then mark those rows failed).
    """
    if resize != "short_side":
        return image_size, image_size
    picks = sorted({int(i * len(paths) / sample) for i in range(sample)} & set(range(len(paths))))
    sizes: Counter[tuple[int, int]] = Counter()
    for i in picks:
        blob = read_image_file(paths[i])
        try:
            with Image.open(io.BytesIO(blob or b"")) as image:
                sizes[image.size] += 1  # (width, height): only the header is read
        except (OSError, Image.DecompressionBombError):
            continue
    if not sizes:
        return image_size, image_size
    (width, height), _ = sizes.most_common(1)[0]
    return short_side_hw(width, height, image_size, patch_size)


def embed_split(store: FeatureStore, paths: list[str], checkpoint: str, batch_size: int, actors: int,
                label: str, resize: str, input_hw: tuple[int, int], commit_every_s: float = 10.0,
                actor_resources: dict[str, float] | None = None) -> int:
    """Fill every pending row of `store` (the rows of `paths`) with a Ray Data job, every image
    preprocessed by `resize` to `input_hw` (H, W) pixels (`split_input_hw`).

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
                                              "keep_tokens": store.tokens is not None, "resize": resize,
                                              "input_hw": tuple(input_hw),
                                              "descriptor_dtype": str(store.descriptors.dtype)},
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
