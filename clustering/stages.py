"""The stages of the recluster Ray Data job: dict in, dict out, each testable on plain dicts.

    shard paths --flat_map(shard_image_rows)--> {image_id, jpeg}
        --map_batches(models.embedding.Embedder, actors)--> {image_id, descriptor [B, D] float16}
        --map_batches(add_cells)--> + {cell_id, partition}
        --groupby(partition).map_groups(cluster_partition)--> {image_id, cell_id, class_in_cell,
                                                              distance, finite, projection_x/y}

Partitions are `cell_id mod P`, so every cell is clustered whole by exactly one process and
no process holds more than about 1/P of the descriptors.  Rows that cannot be clustered
(an image the catalog does not know, a NaN/Inf descriptor) are passed through marked, not
raised inside a worker, so the driver can count them and fail with one clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from placeforge.clustering.kmeans import cluster_cells
from placeforge.clustering.plots import project_2d
from placeforge.shards.reader import to_place_samples

UNKNOWN_CELL = -1  # cell_id of an image that is in the shards but not in the catalog


def images_of_shard(shard_path: str) -> Iterator[tuple[int, bytes]]:
    """(image_id, encoded image) of every image in one shard tar, through the shard reader."""
    import webdataset as wds  # here, not at import: it imports torch, and only this stage reads tars

    pipeline = wds.DataPipeline(wds.SimpleShardList([shard_path]), wds.tarfile_to_samples(), to_place_samples)
    for sample in pipeline:
        yield from zip(sample.image_ids, sample.jpegs)


def shard_image_rows(row: dict) -> Iterator[dict]:
    """flat_map stage: {"shard_path": str} -> one {"image_id", "jpeg"} row per image."""
    for image_id, jpeg in images_of_shard(str(row["shard_path"])):
        yield {"image_id": image_id, "jpeg": jpeg}


@dataclass(frozen=True)
class CellLookup:
    """Image -> cell, as arrays sorted by image id (one ray.put, binary search per batch)."""

    image_id: np.ndarray  # [N] int64, ascending
    cell_id: np.ndarray  # [N] int64

    def cells_of(self, image_ids: np.ndarray) -> np.ndarray:
        """[Q] image ids -> [Q] int64 cell ids, UNKNOWN_CELL where the image is not listed."""
        query = np.asarray(image_ids, dtype=np.int64)
        if len(self.image_id) == 0:
            return np.full(len(query), UNKNOWN_CELL, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.image_id, query), len(self.image_id) - 1)
        return np.where(self.image_id[pos] == query, self.cell_id[pos], UNKNOWN_CELL).astype(np.int64)


def add_cells(batch: dict[str, np.ndarray], lookup: CellLookup | list, partitions: int) -> dict[str, np.ndarray]:
    """map_batches stage: add each image's `cell_id` and its clustering `partition` (cell_id mod P).

    Args:
        lookup: a CellLookup, or a one-element list holding its ray ObjectRef (a list, so
            Ray passes the reference and each worker fetches the shared arrays zero-copy).
    """
    if isinstance(lookup, list):
        import ray

        lookup = ray.get(lookup[0])
    cell_id = lookup.cells_of(batch["image_id"])
    partition = np.where(cell_id >= 0, np.mod(cell_id, partitions), 0)
    return {**batch, "cell_id": cell_id, "partition": partition.astype(np.int64)}


def cluster_partition(batch: dict[str, np.ndarray], k: int, seed: int, n_init: int, niter: int, spherical: bool,
                      plot_cells: np.ndarray) -> dict[str, np.ndarray]:
    """map_groups stage: per-cell K-means of every cell in one partition.

    Args:
        batch: {"image_id": [n], "cell_id": [n], "descriptor": [n, D]} of one partition.
        plot_cells: [C] ascending cell ids whose descriptors are also projected to 2-D.
    Returns:
        {"image_id", "cell_id": [n] int64, "class_in_cell": [n] int32 (-1: not clustered),
         "distance": [n] float32, "finite": [n] bool, "projection_x", "projection_y": [n] float32
         (NaN outside plot_cells)}.
    """
    image_id = np.asarray(batch["image_id"], dtype=np.int64)
    cell_id = np.asarray(batch["cell_id"], dtype=np.int64)
    descriptors = np.asarray(batch["descriptor"])  # [n, D] float16
    if descriptors.dtype == object:  # a ragged column arrives as an array of rows
        descriptors = np.stack(descriptors)
    n = len(image_id)
    finite = np.isfinite(descriptors).all(axis=1)
    decoded = np.asarray(batch["ok"], dtype=bool) if "ok" in batch else np.ones(n, dtype=bool)
    usable = finite & decoded & (cell_id != UNKNOWN_CELL)
    class_in_cell = np.full(n, -1, dtype=np.int32)
    distance = np.full(n, np.nan, dtype=np.float32)
    if usable.any():
        result = cluster_cells(cell_id[usable], descriptors[usable], k=k, seed=seed, n_init=n_init, niter=niter,
                               spherical=spherical)
        class_in_cell[usable] = result.class_in_cell
        distance[usable] = result.distance
    projection = np.full((n, 2), np.nan, dtype=np.float32)
    for cell in np.intersect1d(cell_id[usable], plot_cells):
        rows = np.flatnonzero(usable & (cell_id == cell))
        projection[rows] = project_2d(descriptors[rows])
    return {
        "image_id": image_id,
        "cell_id": cell_id,
        "class_in_cell": class_in_cell,
        "distance": distance,
        "finite": finite,
        "projection_x": projection[:, 0],
        "projection_y": projection[:, 1],
    }
