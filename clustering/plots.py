"""Diagnostic plots of a label version: what the classes of a few cells look like.

Per sampled cell, one PNG: a contact sheet (one row of thumbnails per class, images
nearest their centroid first) and, when descriptors exist, a 2-D PCA of the cell's
descriptors coloured by class.  Matplotlib draws through `Figure` objects with the Agg
canvas only: no pyplot, no global state, no display needed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB_PX = 72
MAX_PER_ROW = 10


def pick_plot_cells(cell_ids: np.ndarray, count: int, seed: int, class_in_cell: np.ndarray | None = None,
                    min_images: int = 3) -> np.ndarray:
    """A seeded sample of `count` cells, preferring cells that can show several classes.

    Preferred cells have >= 2 distinct classes (when `class_in_cell` is given) or else
    >= `min_images` images; other cells only fill up a short list.

    Args:
        cell_ids: [N] int64 cell of each image; class_in_cell: [N] or None.
    Returns:
        [C] int64 cell ids, ascending, C = min(count, number of cells).
    """
    cells, inverse, sizes = np.unique(np.asarray(cell_ids, np.int64), return_inverse=True, return_counts=True)
    if class_in_cell is not None:
        pairs = np.unique(np.stack([inverse.reshape(-1), np.asarray(class_in_cell, np.int64)], axis=1), axis=0)
        preferred = np.bincount(pairs[:, 0], minlength=len(cells)) >= 2
    else:
        preferred = sizes >= min_images
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(preferred)), rng.permutation(np.flatnonzero(~preferred))])
    return np.sort(cells[order[:max(count, 0)]])


def project_2d(descriptors: np.ndarray) -> np.ndarray:
    """PCA to 2-D by SVD of the centred rows.  [n, D] -> [n, 2] float32 (zeros where n < 2)."""
    x = np.asarray(descriptors, dtype=np.float64)
    out = np.zeros((len(x), 2), dtype=np.float32)
    if len(x) < 2:
        return out
    centred = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)  # u: [n, r], s: [r]
    r = min(2, len(s))
    out[:, :r] = (u[:, :r] * s[:r]).astype(np.float32)
    return out


def _thumbnail(jpeg: bytes, size: int) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as image:
        image.draft("RGB", (size, size))
        thumb = image.convert("RGB")
        thumb.thumbnail((size, size))
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    tile.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    return tile


def contact_sheet(rows: list[list[bytes]], thumb_px: int = THUMB_PX, max_per_row: int = MAX_PER_ROW) -> np.ndarray:
    """One row of thumbnails per class.  -> [rows * thumb_px, cols * thumb_px, 3] uint8.

    A class with more than `max_per_row` images shows its first `max_per_row`.
    """
    cols = max(1, min(max_per_row, max((len(r) for r in rows), default=1)))
    sheet = Image.new("RGB", (cols * thumb_px, max(1, len(rows)) * thumb_px), (255, 255, 255))
    for r, jpegs in enumerate(rows):
        for c, jpeg in enumerate(jpegs[:cols]):
            sheet.paste(_thumbnail(jpeg, thumb_px - 2), (c * thumb_px + 1, r * thumb_px + 1))
    return np.asarray(sheet)


def cell_figure(title: str, class_in_cell: np.ndarray, jpegs: list[bytes], distance: np.ndarray | None = None,
                projection: np.ndarray | None = None) -> Figure:
    """The figure of one cell: contact sheet by class [+ PCA scatter by class].

    Args:
        class_in_cell: [n] class slot of each image; jpegs: [n] encoded images.
        distance: [n] distance to the class centroid (orders each row), or None / NaN.
        projection: [n, 2] PCA coordinates, or None (version 0: no descriptors).
    """
    from matplotlib.figure import Figure  # here, not at import: the clustering workers use project_2d alone

    classes = np.unique(class_in_cell)
    key = np.zeros(len(jpegs)) if distance is None else np.nan_to_num(np.asarray(distance, np.float64), nan=0.0)
    rows = []
    for c in classes:
        members = np.flatnonzero(class_in_cell == c)
        rows.append([jpegs[i] for i in members[np.argsort(key[members], kind="stable")]])
    colours = [f"C{i % 10}" for i in range(len(classes))]
    sheet = contact_sheet(rows)
    panels = 2 if projection is not None else 1
    width = sheet.shape[1] / 100 + (4.5 if panels == 2 else 0) + 1.5
    fig = Figure(figsize=(width, max(2.5, sheet.shape[0] / 100 + 1.2)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(1, panels, width_ratios=[sheet.shape[1] / sheet.shape[0] * 1.0, 1.0][:panels])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(sheet)
    ax.set_xticks([])
    ax.set_yticks([(r + 0.5) * THUMB_PX for r in range(len(rows))])
    ax.set_yticklabels([f"class {c} ({len(r)})" for c, r in zip(classes, rows)])
    for label, colour in zip(ax.get_yticklabels(), colours):
        label.set_color(colour)
    if projection is not None:
        scatter = fig.add_subplot(grid[0, 1])
        for c, colour in zip(classes, colours):
            members = class_in_cell == c
            scatter.scatter(projection[members, 0], projection[members, 1], s=24, color=colour, label=f"class {c}")
        scatter.set_title("descriptors, PCA", fontsize=9)
        scatter.set_xticks([])
        scatter.set_yticks([])
        scatter.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    return fig


def write_cell_plot(path: Path, title: str, class_in_cell: np.ndarray, jpegs: list[bytes],
                    distance: np.ndarray | None = None, projection: np.ndarray | None = None) -> Path:
    """Draw `cell_figure` and save it as a PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cell_figure(title, class_in_cell, jpegs, distance, projection).savefig(path, format="png")
    return path
