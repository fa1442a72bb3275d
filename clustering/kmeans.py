"""Per-cell K-means with faiss: the view classes of every cell, every round, deterministic.

`cluster_cells` groups rows by cell with one sort and runs a small faiss K-means per
cell.  MutualVPR runs sklearn's KMeans(n_init=10) per cell; faiss does the same work
(same restarts, inertia within 0.2 %) about 13x faster, ~3,500 cells/s on one core for
cells of 5-30 images, because its per-call overhead is microseconds, not milliseconds
(benchmarks/bench_clustering.py).

Rules, all chosen so a class always means "a non-empty set of images":
  * K' = min(k, number of distinct descriptors in the cell), or fewer in the rare case a
    centroid wins no image (third rule).  A cell with 1 or 2 images
    and k = 3 gets 1 or 2 classes; an all-identical cell gets 1 class.  When K' equals the
    number of distinct points, each distinct point is its own class (no faiss call).
  * Duplicate descriptors are clustered once with a weight (their count), so faiss
    never starts two centroids on the same point.
  * After faiss, every image goes to its nearest centroid; a centroid that ends up with
    no image is dropped and the classes are renumbered dense 0..K'-1 (no empty classes).
  * Determinism: each cell's faiss seed is mix64(seed, cell_id), and rows inside a cell
    are taken in the order of a content hash of their descriptor, so the result depends
    only on the (cell, descriptor) pairs: not on row order, on the order cells are
    processed, or on how cells are partitioned across processes.
  * NaN / Inf descriptors are rejected (ValueError naming how many rows and which cells)
    since faiss would silently produce garbage centroids from them.

Distances are Euclidean (not squared) from a descriptor to its class centroid.  With
`spherical=True` descriptors and centroids are L2-normalised and faiss uses inner product.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse

from placeforge.clustering.cells import mix64

# Rows per block when scanning all descriptors (finite check, content hash): 8192 x 512
# float32 is 16 MiB, so the scan never holds a full-size temporary.
_SCAN_ROWS = 8192
# faiss runs on one OpenMP thread inside the per-cell loop; parallelism comes from giving
# processes disjoint sets of cells.  Measured on 2 cores: 5-30-point cells, 1 thread 3,357
# cells/s vs 2 threads 2,357; one 5,000-point cell, 0.07 s vs 3.0 s (the threads fight
# numpy's BLAS threads); one 50,000-point cell 0.6 s vs 4.1 s.


@dataclass(frozen=True)
class CellCentroids:
    """Class centroids of many cells, packed: cell c owns rows offsets[c]:offsets[c+1]."""

    cell_ids: np.ndarray  # [C] int64, ascending
    offsets: np.ndarray  # [C + 1] int64
    class_in_cell: np.ndarray  # [M] int32, the class each centroid row belongs to
    vectors: np.ndarray  # [M, D] float32

    def of_cell(self, cell_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(class_in_cell [K'], vectors [K', D]) of one cell; empty if the cell is absent."""
        c = int(np.searchsorted(self.cell_ids, cell_id))
        if c == len(self.cell_ids) or self.cell_ids[c] != cell_id:
            return self.class_in_cell[:0], self.vectors[:0]
        s, e = self.offsets[c], self.offsets[c + 1]
        return self.class_in_cell[s:e], self.vectors[s:e]


@dataclass(frozen=True)
class CellClusters:
    """K-means result for N images in C cells."""

    class_in_cell: np.ndarray  # [N] int32, dense 0..K'-1 inside each cell
    distance: np.ndarray  # [N] float32, Euclidean distance to the class centroid
    centroids: CellCentroids


def check_descriptors(cell_ids: np.ndarray, descriptors: np.ndarray) -> None:
    """Raise ValueError for bad shapes or non-finite rows, naming how many and which cells.

    Args:
        cell_ids: [N] integer.
        descriptors: [N, D] float16 / float32 / float64.
    """
    if descriptors.ndim != 2:
        raise ValueError(f"descriptors must be [N, D], got shape {descriptors.shape}")
    if descriptors.dtype.kind != "f":
        raise ValueError(f"descriptors must be floating point, got {descriptors.dtype}")
    if cell_ids.ndim != 1 or len(cell_ids) != len(descriptors):
        raise ValueError(f"cell_ids must be [N] with N = {len(descriptors)}, got shape {cell_ids.shape}")
    if cell_ids.dtype.kind not in "iu":
        raise ValueError(f"cell_ids must be integers, got {cell_ids.dtype}")
    bad_rows = [
        start + np.flatnonzero(~np.isfinite(descriptors[start:start + _SCAN_ROWS]).all(axis=1))
        for start in range(0, len(descriptors), _SCAN_ROWS)
    ]
    bad = np.concatenate(bad_rows) if bad_rows else np.empty(0, np.int64)
    if len(bad):
        cells = np.unique(cell_ids[bad])
        shown = ", ".join(str(c) for c in cells[:10]) + (", ..." if len(cells) > 10 else "")
        raise ValueError(
            f"{len(bad)} descriptor row(s) contain NaN or Inf (first rows {bad[:5].tolist()}), "
            f"in {len(cells)} cell(s): {shown}"
        )


def content_hash(descriptors: np.ndarray) -> np.ndarray:
    """A uint64 per row that depends only on the row's values (equal rows, equal hash).

    Exact integer maths on the bit pattern (a random linear hash mod 2**64), so it is the
    same on every machine and for every block size; -0.0 is folded into 0.0 first.

    Args:
        descriptors: [N, D] float.
    Returns:
        [N] uint64.
    """
    n, d = descriptors.shape
    weights = mix64(np.arange(d), salt=0x5EED) | np.uint64(1)  # [D] odd multipliers
    out = np.empty(n, dtype=np.uint64)
    for start in range(0, n, _SCAN_ROWS):
        block = np.ascontiguousarray(descriptors[start:start + _SCAN_ROWS], dtype=np.float32) + np.float32(0.0)
        out[start:start + len(block)] = block.view(np.uint32).astype(np.uint64) @ weights
    return out


def cell_seeds(seed: int, cell_ids: np.ndarray) -> np.ndarray:
    """faiss seed of each cell, from (seed, cell_id) only.  [C] int64 in [0, 2**31)."""
    return (mix64(cell_ids, salt=seed) >> np.uint64(33)).astype(np.int64)


def kmeans_one_cell(x: np.ndarray, k: int, seed: int, n_init: int = 10, niter: int = 20,
                    spherical: bool = False, weights: np.ndarray | None = None) -> np.ndarray:
    """faiss K-means of one cell's points; returns the k centroids [k, D] float32.

    Args:
        x: [n, D] float32 C-contiguous, n >= k distinct points.
        weights: [n] float32 point weights (duplicate counts), or None.
    """
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.nredo = n_init
    params.seed = int(seed)
    params.spherical = spherical
    params.min_points_per_centroid = 1  # tiny cells are the normal case here, not a mistake
    params.verbose = False
    clustering = faiss.Clustering(x.shape[1], k, params)
    index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    clustering.train(x, index, weights)
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, x.shape[1])


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each row (ties: lowest index).  [n] int64."""
    d2 = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * (x @ centroids.T)  # [n, k], |x|^2 dropped
    return d2.argmin(axis=1)


def _classes_of_cell(x: np.ndarray, point_of_row: np.ndarray | None, first_of_point: np.ndarray, k: int,
                     seed: int, n_init: int, niter: int, spherical: bool) -> tuple[np.ndarray, np.ndarray]:
    """Classes of one cell's rows: (labels [n] dense 0..K'-1, centroids [K', D]).

    Args:
        x: [n, D] float32 rows, equal rows adjacent.
        point_of_row: [n] index of each row's distinct point, or None when all rows differ.
        first_of_point: [n] bool, True on the first row of each distinct point.
    """
    points = x if point_of_row is None else x[first_of_point]
    if len(points) <= k:  # as many classes as distinct points: each point is its own class
        return (np.arange(len(x)) if point_of_row is None else point_of_row), points
    weights = None if point_of_row is None else np.bincount(point_of_row).astype(np.float32)
    centroids = kmeans_one_cell(points, k, seed, n_init, niter, spherical, weights)
    labels = _nearest(x, centroids)
    used = np.bincount(labels, minlength=k) > 0
    if not used.all():  # a centroid that won no image is dropped: classes stay dense
        labels = (np.cumsum(used) - 1)[labels]
        centroids = centroids[used]
    return labels, centroids


def cluster_cells(
    cell_ids: np.ndarray,
    descriptors: np.ndarray,
    k: int = 3,
    seed: int = 0,
    n_init: int = 10,
    niter: int = 20,
    spherical: bool = False,
) -> CellClusters:
    """Split every cell's images into up to k view classes by K-means.

    Args:
        cell_ids: [N] int64 cell of each image.
        descriptors: [N, D] float32 or float16 (converted per cell), finite.
        k: classes per cell (MutualVPR's official code: 6).
        seed: base seed; each cell uses mix64(seed, cell_id).
        n_init: K-means restarts per cell, best objective kept (faiss nredo; sklearn n_init).
        niter: Lloyd iterations per restart.
        spherical: L2-normalise descriptors and centroids (cosine K-means).
    Returns:
        CellClusters: class_in_cell [N] int32, distance [N] float32, centroids per cell.
    """
    cell_ids = np.asarray(cell_ids)
    if k < 1 or n_init < 1 or niter < 1:
        raise ValueError(f"k, n_init and niter must be >= 1, got {k}, {n_init}, {niter}")
    check_descriptors(cell_ids, descriptors)
    n, dim = descriptors.shape
    fingerprint = content_hash(descriptors)
    order = np.lexsort((fingerprint, cell_ids))  # by cell, then by content: [N] row indices
    sorted_cells = cell_ids[order]
    sorted_print = fingerprint[order]
    new_cell = np.ones(n, dtype=bool)
    new_cell[1:] = sorted_cells[1:] != sorted_cells[:-1]
    new_point = new_cell.copy()  # first row of each distinct descriptor in its cell
    new_point[1:] |= sorted_print[1:] != sorted_print[:-1]
    starts = np.flatnonzero(new_cell)
    bounds = np.append(starts, n)
    unique_cells = sorted_cells[starts]
    distinct = np.add.reduceat(new_point.astype(np.int64), starts) if n else np.empty(0, np.int64)  # [C]
    point_rank = np.cumsum(new_point) - 1  # global rank of the distinct point of each sorted row
    seeds = cell_seeds(seed, unique_cells)

    class_in_cell = np.empty(n, dtype=np.int32)
    distance = np.empty(n, dtype=np.float32)
    max_centroids = int(np.minimum(distinct, k).sum()) if n else 0
    vectors = np.empty((max_centroids, dim), dtype=np.float32)
    classes_of = np.empty(max_centroids, dtype=np.int32)
    counts = np.zeros(len(unique_cells), dtype=np.int64)
    written = 0
    threads_before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        for c in range(len(unique_cells)):
            s, e = bounds[c], bounds[c + 1]
            rows = order[s:e]
            x = np.asarray(descriptors[rows], dtype=np.float32)  # fancy indexing copies: contiguous
            if spherical:
                x = _normalise(x)
            point_of_row = point_rank[s:e] - point_rank[s] if distinct[c] < e - s else None
            labels, centroids = _classes_of_cell(x, point_of_row, new_point[s:e], k, int(seeds[c]), n_init, niter,
                                                 spherical)
            class_in_cell[rows] = labels
            distance[rows] = np.linalg.norm(x - centroids[labels], axis=1)
            m = len(centroids)
            vectors[written:written + m] = centroids
            classes_of[written:written + m] = np.arange(m)
            counts[c] = m
            written += m
    finally:
        faiss.omp_set_num_threads(threads_before)
    offsets = np.zeros(len(unique_cells) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return CellClusters(
        class_in_cell=class_in_cell,
        distance=distance,
        centroids=CellCentroids(unique_cells.astype(np.int64), offsets, classes_of[:written], vectors[:written]),
    )


def class_means(cell_ids: np.ndarray, class_in_cell: np.ndarray, descriptors: np.ndarray,
                spherical: bool = False) -> CellCentroids:
    """Mean descriptor of each (cell, class): e.g. the previous round's classes seen through
    the current encoder, for tie-breaking the matching.

    Args:
        cell_ids: [N] int64; class_in_cell: [N] int (rows < 0 are skipped);
        descriptors: [N, D] float.
    Returns:
        CellCentroids with one row per (cell, class) present, L2-normalised if `spherical`.
    """
    keep = np.flatnonzero(np.asarray(class_in_cell) >= 0)
    cells = np.asarray(cell_ids)[keep]
    classes = np.asarray(class_in_cell)[keep].astype(np.int32)
    order = keep[np.lexsort((classes, cells))]
    cells_s, classes_s = np.asarray(cell_ids)[order], np.asarray(class_in_cell)[order].astype(np.int32)
    new_pair = np.ones(len(order), dtype=bool)
    new_pair[1:] = (cells_s[1:] != cells_s[:-1]) | (classes_s[1:] != classes_s[:-1])
    pair_of_row = np.cumsum(new_pair) - 1  # [n_keep]
    n_pairs = int(pair_of_row[-1]) + 1 if len(order) else 0
    sums = np.zeros((n_pairs, descriptors.shape[1]), dtype=np.float32)
    for start in range(0, len(order), _SCAN_ROWS):
        block = np.asarray(descriptors[order[start:start + _SCAN_ROWS]], dtype=np.float32)  # [b, D]
        pairs = pair_of_row[start:start + _SCAN_ROWS]
        local = pairs - pairs[0]  # rows are sorted by pair, so a block covers a contiguous range
        # Segment sums as a sparse 0/1 matrix product: 20x faster than np.add.reduceat on rows.
        summer = scipy.sparse.csr_matrix(
            (np.ones(len(block), np.float32), (local, np.arange(len(block)))), shape=(local[-1] + 1, len(block))
        )
        sums[pairs[0]:pairs[-1] + 1] += summer @ block
    size = np.bincount(pair_of_row, minlength=n_pairs).astype(np.float32)
    means = sums / np.maximum(size, 1)[:, None]
    if spherical:
        means = _normalise(means)
    pair_cells = cells_s[new_pair]
    cell_start = np.flatnonzero(np.r_[True, pair_cells[1:] != pair_cells[:-1]]) if n_pairs else np.empty(0, np.int64)
    offsets = np.append(cell_start, n_pairs).astype(np.int64)
    return CellCentroids(pair_cells[cell_start].astype(np.int64), offsets, classes_s[new_pair], means)
