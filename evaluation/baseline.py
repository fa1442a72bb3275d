"""The raw-pixel baseline a model must beat: 16 x 16 thumbnails ranked by correlation.

    candidates, unreadable = rank_by_thumbnails(database_paths, query_paths, k=20)   # [Q, k] int64

Each image is decoded (a JPEG at reduced scale, PIL draft mode), squashed to 16 x 16 RGB
(aspect not kept, nothing cropped) and flattened to 768 values; the image's own mean is
removed and the row scaled to unit length.  The inner product of two rows is then the
correlation of their pixels, so a uniformly brighter or darker copy of an image still
matches it; retrieval is the same exact search as the model's (evaluation/search.py).

An image that cannot be read (missing, not a regular file, too large, not an image,
truncated) gives a row with ok False, never an exception: it is left out of the database,
and a query that cannot be read has no candidates (-1), so it counts as a miss.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from placeforge.evaluation.search import exact_search
from placeforge.ingest.listing import read_image_file

BASELINE_NAME = "thumbnail 16x16 correlation"
THUMB_SIDE = 16
DESCRIPTOR_DIM = THUMB_SIDE * THUMB_SIDE * 3  # 768


def thumbnail_descriptors(pixels: np.ndarray) -> np.ndarray:
    """[B, 16, 16, 3] uint8 thumbnails -> [B, 768] float32 rows, each mean-free and of unit length.

    A flat image (one colour everywhere) has no pattern to correlate: its row is all zeros,
    so it scores 0 against every image.
    """
    flat = np.asarray(pixels, dtype=np.float32).reshape(len(pixels), -1)  # [B, 768], H, W, C order
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)  # [B, 1]
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 1e-3)


def thumbnail_pixels(image: Image.Image, side: int = THUMB_SIDE) -> np.ndarray:
    """An opened PIL image -> [side, side, 3] uint8 RGB, squashed to a square (no crop)."""
    image.draft("RGB", (side, side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= side
    return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)


def read_thumbnail(path: str, side: int = THUMB_SIDE) -> np.ndarray | None:
    """[side, side, 3] uint8 thumbnail of the image file at `path`, or None if it cannot be read."""
    blob = read_image_file(path)  # None for a FIFO, device, folder, missing or oversized file
    if blob is None:
        return None
    try:
        with Image.open(io.BytesIO(blob)) as image:
            return thumbnail_pixels(image, side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def describe_files(paths: Sequence[str], label: str = "images", chunk: int = 4096, threads: int | None = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnail descriptors of image files, decoded `chunk` at a time by a few threads.

    Memory beyond the result is one chunk of 768-byte thumbnails (PIL decodes without the GIL,
    so threads give the speed of several cores without processes).
    Returns:
        [M, 768] float32 descriptors (zeros where unreadable), [M] bool ok.
    """
    descriptors = np.zeros((len(paths), DESCRIPTOR_DIM), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(paths), desc=f"thumbnails {label}", unit="img",
                                                   mininterval=2.0, disable=not progress) as bar:
        for start in range(0, len(paths), chunk):
            thumbs = list(pool.map(read_thumbnail, paths[start:start + chunk]))  # [C] arrays or None
            read = np.array([t is not None for t in thumbs], dtype=bool)
            if read.any():
                rows = start + np.flatnonzero(read)
                descriptors[rows] = thumbnail_descriptors(np.stack([t for t in thumbs if t is not None]))
            ok[start:start + len(thumbs)] = read
            bar.update(len(thumbs))
    return descriptors, ok


def rank_by_thumbnails(database_paths: Sequence[str], query_paths: Sequence[str], k: int,
                       progress: bool = True) -> tuple[np.ndarray, int]:
    """The k database images whose thumbnails correlate best with each query's.

    Returns:
        candidates [Q, k] int64 indices into `database_paths`, best first, -1 where there is
        none (an unreadable query; fewer than k readable database images); the number of
        images (database and queries) that could not be read.
    """
    database, db_ok = describe_files(database_paths, "database", progress=progress)
    queries, q_ok = describe_files(query_paths, "queries", progress=progress)
    candidates = np.full((len(query_paths), k), -1, dtype=np.int64)
    db_rows = np.flatnonzero(db_ok)
    found = min(k, len(db_rows))
    if found and q_ok.any():
        readable = database if len(db_rows) == len(database) else database[db_rows]  # copy only when needed
        _, local = exact_search(readable, queries[q_ok], found)
        candidates[q_ok, :found] = db_rows[local]
    return candidates, int((~db_ok).sum() + (~q_ok).sum())
