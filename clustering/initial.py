"""Version 0 of the view classes: split each cell before any encoder exists.

Two rules (`INITIAL_SPLITS`; ReclusterConfig.initial picks one):
  * "heading" (the default), chosen per cell.  Where every image of the cell has a compass
    heading: K-means (the same faiss routine as later rounds, `cluster_cells`) on the
    heading as a point on the unit circle, (cos h, sin h).  The split therefore follows the
    cell's own heading distribution (a street seen both ways gives two opposite classes,
    wherever the street points), rather than fixed north-aligned sectors that could cut one
    view in half.  Opposite headings are 2 apart on the circle, the farthest two points can
    be, so they always land in different classes when k >= 2.  Equal headings count as one
    point, so a cell whose images all face one way gets one class.  Where any heading is
    unknown: the random split below.
  * "random": every cell split at random, headings or not, as MutualVPR's official code
    starts (Gucci233/MutualVPR, datasets/train_dataset.py, TrainDataset.initialize).  Images
    are ordered by a per-image random key, mix64(seed, cell_id, image_id), and dealt
    round-robin into K' = min(k, n) classes, so class sizes differ by at most one.  (The
    official split is not near-equal: classes 1..C-1 draw n // C images each and class 0
    keeps the rest, so a cell of fewer than C images is one class and C - 1 empty ones.)

Both rules are deterministic functions of (seed, cell, image ids, headings): the same
answer for any row order and any partition of cells across processes.  No class is
empty and class ids are dense 0..K'-1 in each cell.
"""

from __future__ import annotations

import numpy as np

from placeforge.clustering.cells import mix64
from placeforge.clustering.kmeans import cluster_cells

INITIAL_SPLITS = {
    "heading": "K-means on the compass heading where every image of a cell has one, else random",
    "random": "a seeded random near-equal split of every cell, headings ignored (MutualVPR's official code)",
}


def heading_points(heading_deg: np.ndarray) -> np.ndarray:
    """Compass headings as unit vectors (cos, sin).  [N] degrees -> [N, 2] float32.

    Headings are reduced mod 360 first so 0 and 360 are the same point exactly.
    """
    radians = np.deg2rad(np.mod(np.asarray(heading_deg, dtype=np.float64), 360.0))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def random_classes(image_ids: np.ndarray, cell_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded random split of each cell into K' = min(k, n) near-equal classes.

    Args:
        image_ids: [N] int64; cell_ids: [N] int64.
    Returns:
        [N] int32 class in cell, dense 0..K'-1.
    """
    image_ids = np.asarray(image_ids, dtype=np.int64)
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    key = mix64(image_ids ^ mix64(cell_ids, salt=seed).view(np.int64), salt=seed)  # [N] uint64
    order = np.lexsort((image_ids, key, cell_ids))  # image_ids only breaks (impossible) key ties
    sorted_cells = cell_ids[order]
    new_cell = np.ones(len(order), dtype=bool)
    new_cell[1:] = sorted_cells[1:] != sorted_cells[:-1]
    starts = np.flatnonzero(new_cell)
    cell_index = np.cumsum(new_cell) - 1
    rank = np.arange(len(order)) - starts[cell_index]  # position of each row inside its cell
    classes = np.empty(len(order), dtype=np.int32)
    classes[order] = (rank % k).astype(np.int32)  # round-robin: sizes differ by at most one
    return classes


def initial_classes(image_ids: np.ndarray, cell_ids: np.ndarray, heading_deg: np.ndarray | None,
                    k: int = 3, seed: int = 0, n_init: int = 10, rule: str = "heading") -> np.ndarray:
    """Version-0 class in cell of N images by `rule` (INITIAL_SPLITS): "heading" splits by heading
    where a whole cell has one, else at random; "random" splits every cell at random.

    Args:
        image_ids: [N] int64.
        cell_ids: [N] int64.
        heading_deg: [N] compass degrees, NaN where unknown; None = unknown everywhere.
        k: classes per cell.
    Returns:
        [N] int32, dense 0..K'-1 in each cell, K' <= k.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rule not in INITIAL_SPLITS:
        raise ValueError(f"unknown initial split {rule!r}; valid: {', '.join(INITIAL_SPLITS)}")
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    classes = random_classes(image_ids, cell_ids, k, seed)
    if heading_deg is None or rule == "random":
        return classes
    heading = np.asarray(heading_deg, dtype=np.float64)
    unknown_cells = np.unique(cell_ids[~np.isfinite(heading)])
    by_heading = ~np.isin(cell_ids, unknown_cells)  # rows of cells whose every heading is known
    if by_heading.any():
        result = cluster_cells(cell_ids[by_heading], heading_points(heading[by_heading]), k=k, seed=seed,
                               n_init=n_init)
        classes[by_heading] = result.class_in_cell
    return classes
