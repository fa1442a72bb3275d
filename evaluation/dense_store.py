"""The evaluation feature store: descriptors and dense patch tokens of one test split, on disk.

    OUT/features/database/
        store.json        what the arrays hold: checkpoint sha256, image-list sha256, shapes, dtypes, format
        descriptors.npy   [M, D] float32 global descriptors
        tokens.npy        [M, N, C] float16 encoder patch tokens (re-ranking input), optional
        done.npy          [M] uint8: 1 once row i of both arrays is on disk, 2 if the image failed

Why two dtypes.  Descriptors are float32, the precision the model returns them in: exact search
ranks by L2 distance, and float16 copies (unit length only to ~1e-4) can order near ties
differently from the model's own output, so recall would no longer equal the reference's on the
same descriptors (tests/test_recall_reference.py).  They are small: 512 x 4 B = 2 KiB per image,
0.25 % of a ViT-B row.  Patch tokens are the bulk (529 x 768 per ViT-B image at 322 px) and stay
float16: that halves the store, and on a GPU the re-ranker computes in bfloat16 anyway (8 mantissa
bits to float16's 11; evaluation/rerank.py).

The arrays are `.npy` memory maps: a database larger than RAM is written in batches and
read back one candidate list at a time, so memory holds only the rows being used.  A
row's done flag is set only after its data are flushed, so a killed run resumes with
exactly the rows that are missing, and a store made for another checkpoint, another
image list or another store format (format 1 held float16 descriptors) is recognised
(store.json) and rebuilt, never mixed; arrays whose dtypes disagree with their store.json are
refused.  Pair-VPR keeps 1.55 MB of float32 tokens per ViT-B image in RAM; this keeps half of
that on disk per image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# 2: float32 descriptors (format 1 stored them as float16; its stores are rebuilt, not reused).
STORE_FORMAT = 2
FORMAT_1_DTYPE = "float16"  # what a format-1 store.json (no dtype fields) held, descriptors and tokens
PENDING, DONE, FAILED = 0, 1, 2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreKey:
    """Everything the stored rows depend on; a store whose key differs is rebuilt."""

    checkpoint_sha256: str
    images_sha256: str  # of the ordered image paths
    image_size: int
    descriptor_dim: int
    tokens_shape: tuple[int, int] | None  # (N, C), None: descriptors only
    format: int = STORE_FORMAT
    resize: str = "crop"  # models.encoders.RESIZES
    input_hw: tuple[int, int] | None = None  # (H, W) pixels each image is resized to; None: S x S
    descriptor_dtype: str = "float32"  # the model's precision: ranking uses the descriptors it produced
    tokens_dtype: str = "float16"  # the bulk of the store: half the bytes of float32


def images_sha256(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


def bytes_per_image(key: StoreKey) -> int:
    """Disk per image: descriptor (float32) + tokens (float16), plus the one-byte done flag."""
    tokens = 0 if key.tokens_shape is None else key.tokens_shape[0] * key.tokens_shape[1]
    return (np.dtype(key.descriptor_dtype).itemsize * key.descriptor_dim
            + np.dtype(key.tokens_dtype).itemsize * tokens + 1)


class FeatureStore:
    """Memory-mapped rows of one split; open with `FeatureStore.open(folder, key, rows)`."""

    def __init__(self, folder: Path, key: StoreKey, descriptors: np.memmap, tokens: np.memmap | None,
                 done: np.memmap) -> None:
        self.folder, self.key = folder, key
        self.descriptors, self.tokens, self.done = descriptors, tokens, done
        self._written: list[np.ndarray] = []  # rows written since the last commit
        self._ok: list[np.ndarray] = []
        self._narrow_logged = False

    @classmethod
    def open(cls, folder: str | os.PathLike, key: StoreKey, rows: int) -> "FeatureStore":
        """Reuse the store in `folder` if it was made with `key`, else create it empty."""
        folder = Path(folder)
        found = _read_key(folder)
        if found != key:
            if found is not None:  # another checkpoint, image list or store format: start over
                logger.warning("%s: feature store made with %s; rebuilding it", folder, _key_changes(found, key))
            shutil.rmtree(folder, ignore_errors=True)
            tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            np.lib.format.open_memmap(tmp / "descriptors.npy", "w+", np.dtype(key.descriptor_dtype),
                                      (rows, key.descriptor_dim)).flush()
            if key.tokens_shape is not None:
                np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.dtype(key.tokens_dtype),
                                          (rows, *key.tokens_shape)).flush()
            np.lib.format.open_memmap(tmp / "done.npy", "w+", np.uint8, (rows,)).flush()
            (tmp / "store.json").write_text(json.dumps(asdict(key), indent=2) + "\n")
            os.rename(tmp, folder)  # store.json inside: the folder is valid from here on
        descriptors = np.load(folder / "descriptors.npy", mmap_mode="r+")
        tokens = np.load(folder / "tokens.npy", mmap_mode="r+") if key.tokens_shape is not None else None
        done = np.load(folder / "done.npy", mmap_mode="r+")
        if len(descriptors) != rows or len(done) != rows:
            raise ValueError(f"{folder}: holds {len(descriptors)} rows, expected {rows}")
        for name, array, dtype in (("descriptors", descriptors, key.descriptor_dtype),
                                   ("tokens", tokens, key.tokens_dtype)):
            if array is not None and array.dtype != np.dtype(dtype):  # store.json and the arrays disagree
                raise ValueError(f"{folder}: {name}.npy holds {array.dtype}, store.json says {dtype}; "
                                 "delete the folder and the next run rebuilds it")
        return cls(folder, key, descriptors, tokens, done)

    def pending(self) -> np.ndarray:
        """Row indices still to compute. -> [P] int64."""
        return np.flatnonzero(self.done == PENDING)

    def write(self, rows: np.ndarray, descriptors: np.ndarray, tokens: np.ndarray | None, ok: np.ndarray) -> None:
        """Store a batch: rows [B], descriptors [B, D], tokens [B, N, C] or None, ok [B] bool."""
        order = np.argsort(rows)  # ascending rows: sequential writes into the memmaps
        rows = np.asarray(rows)[order]
        if descriptors.dtype.itemsize < self.descriptors.dtype.itemsize and not self._narrow_logged:
            self._narrow_logged = True  # kept as given, but rounded before they reached the store
            logger.warning("%s: descriptors arrive as %s; the store keeps %s, so ranking uses the rounded values",
                           self.folder, descriptors.dtype, self.descriptors.dtype)
        self.descriptors[rows] = descriptors[order]
        if self.tokens is not None:
            self.tokens[rows] = tokens[order]
        self._written.append(rows)
        self._ok.append(np.asarray(ok, bool)[order])

    def commit(self) -> None:
        """Flush written rows to disk, then mark them done (the order that makes resume exact)."""
        if not self._written:
            return
        written, ok = np.concatenate(self._written), np.concatenate(self._ok)
        self.descriptors.flush()
        if self.tokens is not None:
            self.tokens.flush()
        self.done[written] = np.where(ok, DONE, FAILED)
        self.done.flush()
        self._written, self._ok = [], []

    def failed(self) -> np.ndarray:
        """Rows whose image could not be decoded. -> [F] int64."""
        return np.flatnonzero(self.done == FAILED)


def _read_key(folder: Path) -> StoreKey | None:
    try:
        raw = json.loads((folder / "store.json").read_text())
        for name in ("tokens_shape", "input_hw"):  # JSON lists back to the key's tuples
            raw[name] = tuple(raw[name]) if raw.get(name) else None
        if raw.get("format") == 1:  # no dtype fields then: read back what its arrays hold
            raw.setdefault("descriptor_dtype", FORMAT_1_DTYPE)
            raw.setdefault("tokens_dtype", FORMAT_1_DTYPE)
        return StoreKey(**raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _key_changes(found: StoreKey, wanted: StoreKey) -> str:
    """The fields in which two keys differ, e.g. "format 1 (now 2), descriptor_dtype float16 (now float32)"."""
    old, new = asdict(found), asdict(wanted)
    return ", ".join(f"{name} {old[name]} (now {new[name]})" for name in new if old[name] != new[name])
