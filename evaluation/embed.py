"""Embedding a test split with Ray Data: global descriptors and, for re-ranking, patch tokens.

    rows {"row": i, "path": p} --map_batches(SplitEmbedder, actor pool)--> {"row", "descriptor" [B, D],
                                                                           "tokens" [B, N, C], "ok"}
    driver: FeatureStore.write(...) per batch, commit every few batches (resumable)

Actors read the image files themselves (on a cluster the test set must be on storage every
node sees), decode at the model's size, and run on a GPU when they have one (bf16).  An
image that cannot be decoded gives a row with ok=False, not a failed job.
"""

from __future__ import annotations

import io
import time

import numpy as np
from tqdm import tqdm

from evaluation.dense_store import FeatureStore


class SplitEmbedder:
    """map_batches callable class: one model per actor, a batch of image paths per call."""

    def __init__(self, checkpoint: str, keep_tokens: bool) -> None:
        import torch

        from trainer.checkpoint import load_model_checkpoint

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, cfg = load_model_checkpoint(checkpoint, self.device)
        self.image_size = cfg.image_size
        self.keep_tokens = keep_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"row": [B], "path": [B]} -> {"row", "descriptor" [B, D] f16, "tokens" [B, N, C] f16, "ok" [B]}."""
        import torch

        images, ok = self._load(list(batch["path"]))
        images = images.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens = self.model.forward_features(images)  # [B, 1 + N, C]
            descriptors = self.model.pool(tokens)  # [B, D]
        out = {"row": np.asarray(batch["row"], dtype=np.int64), "ok": ok,
               "descriptor": descriptors.float().cpu().numpy().astype(np.float16)}
        if self.keep_tokens:
            patches = tokens[:, self.model.encoder.num_prefix_tokens:]  # [B, N, C]
            out["tokens"] = patches.float().cpu().numpy().astype(np.float16)
        return out

    def _load(self, paths: list[str]):
        """Decode each file at the model's size; an unreadable one becomes a black image, ok False."""
        from PIL import Image

        from trainer.encoders import resize_and_crop, imagenet_normalize, to_unit_tensor

        size = self.image_size
        pixels = np.zeros((len(paths), size, size, 3), dtype=np.uint8)  # [B, S, S, 3]
        ok = np.ones(len(paths), dtype=bool)
        for i, path in enumerate(paths):
            try:
                with open(path, "rb") as f, Image.open(io.BytesIO(f.read())) as image:
                    pixels[i] = resize_and_crop(image, size)
            except (OSError, ValueError, Image.DecompressionBombError):
                ok[i] = False
        return imagenet_normalize(to_unit_tensor(pixels)), ok


def embed_split(store: FeatureStore, paths: list[str], checkpoint: str, batch_size: int, actors: int,
                label: str, commit_every_s: float = 10.0, actor_resources: dict[str, float] | None = None) -> int:
    """Fill every pending row of `store` (the rows of `paths`) with a Ray Data job.

    Returns the number of rows computed now (0 when the store was already complete).
    """
    import ray

    pending = store.pending()
    if len(pending) == 0:
        return 0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rows = [{"row": int(i), "path": paths[i]} for i in pending]
    embedded = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * actors))).map_batches(
        SplitEmbedder, fn_constructor_kwargs={"checkpoint": checkpoint, "keep_tokens": store.tokens is not None},
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
