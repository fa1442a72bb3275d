"""The descriptor-store contract: one checkpoint's global descriptors of one shard set.

Kept on request (`recluster.py --keep-descriptors`) so a later round, an evaluation or a
plot can reuse them without running the encoder again:

    LABELS_DIR/descriptors/<checkpoint-stem>-<sha256[:12]>/
        *.parquet           image_id int64, descriptor [D] float16 (a Ray tensor column;
                            plain pyarrow reads it as large_list<halffloat>)
        descriptors.json    checkpoint path and sha256, shard-set fingerprint, D, image count

The folder is written under a temporary name and renamed when complete, with
`descriptors.json` written last inside it, so a folder with that name and a valid
descriptors.json is complete.  Descriptors are a pure function of (checkpoint bytes,
shard set): a folder whose sha256 and fingerprint match can be reused as is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DESCRIPTOR_FORMAT_VERSION = 1
DESCRIPTORS_SUBDIR = "descriptors"
META_FILE = "descriptors.json"


@dataclass(frozen=True)
class DescriptorMeta:
    checkpoint: str
    checkpoint_sha256: str
    shards_fingerprint: str  # shards.manifest.Manifest.fingerprint of the shard set embedded
    descriptor_dim: int
    images: int
    format_version: int = DESCRIPTOR_FORMAT_VERSION


def descriptor_dir(labels_root: str | os.PathLike, checkpoint: str | os.PathLike, sha256: str) -> Path:
    """Where the descriptors of `checkpoint` (whose file hashes to `sha256`) are kept."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(checkpoint).stem) or "checkpoint"
    return Path(labels_root) / DESCRIPTORS_SUBDIR / f"{stem}-{sha256[:12]}"


def temporary_dir(final: Path) -> Path:
    """The name a descriptor folder is written under before `publish`."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def read_meta(folder: str | os.PathLike) -> DescriptorMeta | None:
    """The folder's descriptors.json, or None if absent or unreadable (an incomplete folder)."""
    try:
        meta = DescriptorMeta(**json.loads((Path(folder) / META_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return meta if meta.format_version == DESCRIPTOR_FORMAT_VERSION else None


def reusable(folder: str | os.PathLike, checkpoint_sha256: str, shards_fingerprint: str) -> bool:
    """True if `folder` holds complete descriptors of this checkpoint for this shard set."""
    meta = read_meta(folder)
    return meta is not None and (meta.checkpoint_sha256, meta.shards_fingerprint) == (
        checkpoint_sha256, shards_fingerprint)


def publish(tmp: Path, final: Path, checkpoint: str, checkpoint_sha256: str, shards_fingerprint: str,
            descriptor_dim: int) -> DescriptorMeta:
    """Finish a folder of parquet parts written under `tmp`: write descriptors.json, rename to `final`.

    Raises:
        FileExistsError: `final` exists (an older folder; it is never replaced).
    """
    rows = sum(pq.read_metadata(p).num_rows for p in tmp.glob("*.parquet"))
    meta = DescriptorMeta(checkpoint, checkpoint_sha256, shards_fingerprint, descriptor_dim, rows)
    (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
    if final.exists():
        raise FileExistsError(f"{final} exists; descriptor folders are never replaced")
    os.rename(tmp, final)
    return meta


def read_descriptors(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All descriptors of a complete folder, without Ray.

    Returns:
        (image_id [N] int64, descriptors [N, D] float16), in file order.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder / META_FILE} missing or invalid: not a complete descriptor folder")
    table = pq.read_table(sorted(folder.glob("*.parquet")))
    column = table.column("descriptor").combine_chunks()
    if isinstance(column.type, pa.ExtensionType):  # read with Ray imported: its tensor type
        column = column.storage
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False)
    return table.column("image_id").to_numpy(), values.reshape(len(table), meta.descriptor_dim)
