"""The one Ray Data embedding actor: a model per actor, descriptors (and tokens) per batch.

    {"<id column>": [B], "jpeg": [B] bytes | "path": [B] str}
        --Embedder--> {"<id column>": [B] int64, "ok": [B] bool,
                       "descriptor": [B, D] descriptor_dtype, "tokens": [B, N, C] float16 (keep_tokens)}

Reclustering feeds encoded images read from the shards ("jpeg"); evaluation feeds file
paths ("path"), which the actor reads itself (on a cluster the files must be on storage
every node sees).  An image that cannot be read or decoded gives a row with ok=False (its
descriptor is that of a black image), never a failed job.  The actor runs on a GPU when it
has one (bf16 autocast), else on its CPUs.
"""

from __future__ import annotations

import numpy as np


class Embedder:
    """map_batches callable class: loads the checkpoint once per actor, embeds batches.

    Args:
        checkpoint: a model checkpoint (`models.checkpoint`).
        id_column: the column passed through to identify each row ("image_id", "row").
        keep_tokens: also return the encoder's patch tokens (the re-ranking input).
        resize: models.encoders.RESIZES; None = the checkpoint's own (evaluation may override it).
        input_hw: (H, W) every image of a "short_side" batch is resized to (one size per batch);
            the other modes use the checkpoint's square image_size.
        descriptor_dtype: "float32" for evaluation (ranking must use what the model produced:
            tests/test_recall_reference.py), "float16" for reclustering (its Parquet keeps float16).
    """

    def __init__(self, checkpoint: str, id_column: str = "image_id", keep_tokens: bool = False,
                 resize: str | None = None, input_hw: tuple[int, int] | None = None,
                 descriptor_dtype: str = "float16") -> None:
        import torch

        from placeforge.models.checkpoint import load_model_checkpoint

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, cfg = load_model_checkpoint(checkpoint, self.device)
        self.resize = resize or cfg.resize
        if self.resize == "short_side" and input_hw is None:
            raise ValueError("resize short_side needs input_hw, the (H, W) of the batch")
        self.image_size = tuple(input_hw) if self.resize == "short_side" else cfg.image_size
        self.id_column = id_column
        self.keep_tokens = keep_tokens
        self.descriptor_dtype = np.dtype(descriptor_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from placeforge.models.encoders import decode_images

        blobs = list(batch["jpeg"]) if "jpeg" in batch else [_read_file(str(p)) for p in batch["path"]]
        images, ok = decode_images(blobs, self.image_size, self.resize)
        images = images.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens = self.model.forward_features(images)  # [B, P + N, C], P prefix tokens
            descriptors = self.model.pool(tokens, self.model.token_grid(images))  # [B, D], unit length
        out = {self.id_column: np.asarray(batch[self.id_column], dtype=np.int64), "ok": ok,
               "descriptor": descriptors.float().cpu().numpy().astype(self.descriptor_dtype)}
        if self.keep_tokens:
            patches = tokens[:, self.model.encoder.num_prefix_tokens:]  # [B, N, C]
            out["tokens"] = patches.float().cpu().numpy().astype(np.float16)
        return out


def _read_file(path: str) -> bytes | None:
    """The image file's bytes; None (row not ok) for a non-regular, too large or unreadable file."""
    from placeforge.ingest.listing import read_image_file  # one home for opening image files safely

    return read_image_file(path)
