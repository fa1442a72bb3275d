"""Keep class ids meaning the same view from one clustering round to the next.

K-means numbers its clusters arbitrarily, so without matching a classifier row can
silently receive another view after reclustering (a flaw of MutualVPR's code).  Here:

  * Per cell, new cluster j is matched to previous class i by the Hungarian assignment
    (scipy `linear_sum_assignment`) that maximises the number of images they share.
    Ties are broken by the cosine similarity of their centroids when both are given
    (weighted so it can never outvote a single shared image), otherwise by scipy's
    deterministic order.  A pair that shares no image is not a match.
  * A matched cluster takes the previous class's slot (`class_in_cell`).  An unmatched
    cluster (a split, a new view, a new cell) gets a fresh slot after every slot the cell
    had in the previous version, so it can never inherit a retired class's meaning.
    Slots are therefore stable but not always dense.
  * Global class ids (`class_id`, the classifier row) are keyed by (cell_id, slot):
    a pair present in the previous version keeps its id; a new pair gets the next id
    after the previous version's `next_class_id` high-water mark, in (cell_id, slot)
    order; a previous pair that is gone is "retired": its id is recorded and never
    reused, so a retired classifier row is simply never a target again.  Version 0 ids
    are dense 0..P-1 in (cell_id, slot) order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from placeforge.clustering.kmeans import CellCentroids


@dataclass(frozen=True)
class PreviousLabels:
    """The label arrays of the previous version that matching needs."""

    image_id: np.ndarray  # [P] int64
    cell_id: np.ndarray  # [P] int64
    class_in_cell: np.ndarray  # [P] int32 slot
    class_id: np.ndarray  # [P] int64 global class
    next_class_id: int  # every id below this was used at some point; new ids start here


@dataclass(frozen=True)
class ClassIds:
    class_id: np.ndarray  # [N] int64
    retired_class_ids: np.ndarray  # [R] int64, ascending: previous ids no longer used
    next_class_id: int


@dataclass(frozen=True)
class Relabeling:
    """A round's labels, matched to the previous version."""

    class_in_cell: np.ndarray  # [N] int32 stable slot
    class_id: np.ndarray  # [N] int64 global class
    retired_class_ids: np.ndarray  # [R] int64
    next_class_id: int
    images_changed_class: int  # images in both versions whose class_id differs
    images_new: int  # images not in the previous version


def match_cell(overlap: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
    """Match the new clusters of one cell to its previous classes.

    Args:
        overlap: [K_old, K_new] shared-image counts.
        similarity: [K_old, K_new] centroid cosine similarity in [-1, 1], or None.
    Returns:
        [K_new] int64: the row of the matched previous class, or -1 (unmatched).
    """
    k_old, k_new = overlap.shape
    out = np.full(k_new, -1, dtype=np.int64)
    if k_old == 0 or k_new == 0:
        return out
    score = overlap.astype(np.float64)
    if similarity is not None:
        # Assignments differ in at most 2m tie-break terms of size < 1/(2m+1) each, so the
        # tie-break sums to < 1 and never beats one more shared image.
        pairs = min(k_old, k_new)
        score = score + np.clip(similarity, -1.0, 1.0) / (2 * pairs + 1)
    rows, cols = linear_sum_assignment(score, maximize=True)
    shared = overlap[rows, cols] > 0
    out[cols[shared]] = rows[shared]
    return out


def previous_slots(image_id: np.ndarray, cell_id: np.ndarray, previous: PreviousLabels) -> np.ndarray:
    """Previous class slot of each image, -1 if it was absent or in another cell.  [N] int32."""
    order = np.argsort(previous.image_id, kind="stable")
    sorted_ids = previous.image_id[order]
    pos = np.minimum(np.searchsorted(sorted_ids, image_id), max(len(sorted_ids) - 1, 0))
    out = np.full(len(image_id), -1, dtype=np.int32)
    if len(sorted_ids) == 0:
        return out
    prev_row = order[pos]
    same = (sorted_ids[pos] == image_id) & (previous.cell_id[prev_row] == cell_id)
    out[same] = previous.class_in_cell[prev_row[same]]
    return out


def _cosine(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """[K_old, D] x [K_new, D] -> [K_old, K_new] cosine similarity."""
    old_n = old / np.maximum(np.linalg.norm(old, axis=1, keepdims=True), 1e-12)
    new_n = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
    return old_n @ new_n.T


def _similarity(cell: int, old_slots: np.ndarray, k_new: int, old_centroids: CellCentroids,
                new_centroids: CellCentroids) -> np.ndarray | None:
    old_classes, old_vectors = old_centroids.of_cell(cell)
    new_classes, new_vectors = new_centroids.of_cell(cell)
    if len(old_classes) == 0 or len(new_classes) == 0:
        return None
    sim = np.zeros((len(old_slots), k_new))
    old_pos = np.searchsorted(old_classes, old_slots)  # centroids are stored in class order
    old_pos = np.minimum(old_pos, len(old_classes) - 1)
    have_old = old_classes[old_pos] == old_slots
    cos = _cosine(old_vectors[old_pos[have_old]], new_vectors)  # [n_have, K'_new stored]
    sim[np.ix_(np.flatnonzero(have_old), new_classes[new_classes < k_new])] = cos[:, new_classes < k_new]
    return sim


def match_to_previous(
    image_id: np.ndarray,
    cell_id: np.ndarray,
    cluster_in_cell: np.ndarray,
    previous: PreviousLabels,
    new_centroids: CellCentroids | None = None,
    old_centroids: CellCentroids | None = None,
) -> np.ndarray:
    """Renumber this round's clusters into stable slots (see module docstring).

    Args:
        image_id, cell_id: [N] int64.
        cluster_in_cell: [N] int32, dense 0..K'-1 per cell (a `cluster_cells` result).
        new_centroids / old_centroids: per-cell centroids for tie-breaks, by cluster and by
            previous slot (e.g. `class_means` of the previous classes under this encoder).
    Returns:
        [N] int32 class_in_cell slots.
    """
    n = len(image_id)
    if n == 0:
        return np.empty(0, dtype=np.int32)
    cells, cell_index = np.unique(cell_id, return_inverse=True)  # [C], [N]
    clusters = np.asarray(cluster_in_cell, dtype=np.int64)
    k_of_cell = np.zeros(len(cells), dtype=np.int64)
    np.maximum.at(k_of_cell, cell_index, clusters + 1)
    k_max = int(k_of_cell.max())

    # Highest slot each cell had in the previous version: fresh slots go after it.
    last_slot = np.full(len(cells), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(cells, previous.cell_id), len(cells) - 1)
    in_new = cells[at] == previous.cell_id
    np.maximum.at(last_slot, at[in_new], previous.class_in_cell[in_new].astype(np.int64))

    # Shared-image counts per (cell, previous slot, new cluster), sorted by cell.
    old_slot = previous_slots(image_id, cell_id, previous).astype(np.int64)
    kept = old_slot >= 0
    slot_span = int(old_slot.max()) + 1 if kept.any() else 1
    key = (cell_index[kept] * slot_span + old_slot[kept]) * k_max + clusters[kept]
    triples, shared = np.unique(key, return_counts=True)
    t_cell, rest = np.divmod(triples, slot_span * k_max)
    t_old, t_new = np.divmod(rest, k_max)

    mapping = np.full((len(cells), k_max), -1, dtype=np.int64)  # [C, k_max] slot of each cluster
    # Fast path: a cell whose shared pairs are one-to-one keeps those pairs (the Hungarian
    # optimum, since no row or column has a second non-zero entry).
    old_once = _count_of(t_cell * slot_span + t_old) == 1
    new_once = _count_of(t_cell * k_max + t_new) == 1
    simple_cell = np.ones(len(cells), dtype=bool)
    simple_cell[t_cell[~(old_once & new_once)]] = False
    easy = simple_cell[t_cell]
    mapping[t_cell[easy], t_new[easy]] = t_old[easy]

    starts = np.flatnonzero(np.r_[True, t_cell[1:] != t_cell[:-1]]) if len(t_cell) else np.empty(0, np.int64)
    bounds = np.append(starts, len(t_cell))
    use_centroids = new_centroids is not None and old_centroids is not None
    for s, e in zip(bounds[:-1], bounds[1:]):
        c = t_cell[s]
        if simple_cell[c]:
            continue
        slots, old_row = np.unique(t_old[s:e], return_inverse=True)
        k_new = int(k_of_cell[c])
        overlap = np.zeros((len(slots), k_new), dtype=np.int64)
        overlap[old_row, t_new[s:e]] = shared[s:e]
        similarity = _similarity(int(cells[c]), slots, k_new, old_centroids, new_centroids) if use_centroids else None
        matched = match_cell(overlap, similarity)
        mapping[c, np.flatnonzero(matched >= 0)] = slots[matched[matched >= 0]]  # matched is [k_new <= k_max]

    exists = np.arange(k_max)[None, :] < k_of_cell[:, None]
    fresh = exists & (mapping < 0)
    rank = np.cumsum(fresh, axis=1) - 1
    mapping[fresh] = (last_slot[:, None] + 1 + rank)[fresh]
    return mapping[cell_index, clusters].astype(np.int32)


def _count_of(keys: np.ndarray) -> np.ndarray:
    """How often each element's value occurs in `keys`.  [T] -> [T]."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)]


def assign_class_ids(cell_id: np.ndarray, class_in_cell: np.ndarray, previous: PreviousLabels | None = None
                     ) -> ClassIds:
    """Global class id of each image's (cell, slot); stable across versions (module docstring).

    Args:
        cell_id: [N] int64; class_in_cell: [N] int32 slots.
    Returns:
        ClassIds: class_id [N] int64, retired ids, the new next_class_id.
    Raises:
        ValueError: the previous version maps one (cell, slot) to several class ids.
    """
    cell_id = np.asarray(cell_id, dtype=np.int64)
    slot = np.asarray(class_in_cell, dtype=np.int64)
    prev_cell = previous.cell_id if previous is not None else np.empty(0, np.int64)
    prev_slot = previous.class_in_cell.astype(np.int64) if previous is not None else np.empty(0, np.int64)
    all_cells, inverse = np.unique(np.concatenate([cell_id, prev_cell]), return_inverse=True)
    span = int(max(slot.max(initial=-1), prev_slot.max(initial=-1))) + 1
    keys = inverse.reshape(-1) * span + np.concatenate([slot, prev_slot])  # (cell, slot) as one int64
    new_keys, new_pair = np.unique(keys[: len(cell_id)], return_inverse=True)
    new_pair = new_pair.reshape(-1)
    if previous is None:
        return ClassIds(new_pair.astype(np.int64), np.empty(0, np.int64), len(new_keys))

    prev_all = keys[len(cell_id):]
    by_key = np.argsort(prev_all, kind="stable")
    sorted_keys, sorted_ids = prev_all[by_key], previous.class_id[by_key].astype(np.int64)
    if np.any((sorted_keys[1:] == sorted_keys[:-1]) & (sorted_ids[1:] != sorted_ids[:-1])):
        raise ValueError("previous labels map one (cell_id, class_in_cell) to several class_id values")
    first = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if len(sorted_keys) else by_key[:0]
    prev_keys, prev_ids = sorted_keys[first], sorted_ids[first]
    if len(np.unique(prev_ids)) != len(prev_ids):
        raise ValueError("previous labels give one class_id to several (cell_id, class_in_cell) pairs")
    if len(prev_ids) and prev_ids.max() >= previous.next_class_id:
        raise ValueError(f"previous next_class_id {previous.next_class_id} <= its largest class id {prev_ids.max()}")

    pos = np.minimum(np.searchsorted(prev_keys, new_keys), max(len(prev_keys) - 1, 0))
    kept = (prev_keys[pos] == new_keys) if len(prev_keys) else np.zeros(len(new_keys), bool)
    pair_ids = np.empty(len(new_keys), dtype=np.int64)
    pair_ids[kept] = prev_ids[pos[kept]]
    pair_ids[~kept] = previous.next_class_id + np.arange(int((~kept).sum()))
    retired = np.sort(prev_ids[~np.isin(prev_keys, new_keys)])
    return ClassIds(pair_ids[new_pair], retired, previous.next_class_id + int((~kept).sum()))


def count_changed(image_id: np.ndarray, class_id: np.ndarray, previous: PreviousLabels) -> tuple[int, int]:
    """(images in both versions whose class_id differs, images not in the previous version)."""
    order = np.argsort(previous.image_id, kind="stable")
    sorted_ids = previous.image_id[order]
    if len(sorted_ids) == 0:
        return 0, len(image_id)
    pos = np.minimum(np.searchsorted(sorted_ids, image_id), len(sorted_ids) - 1)
    found = sorted_ids[pos] == image_id
    changed = found & (previous.class_id[order[pos]] != class_id)
    return int(changed.sum()), int((~found).sum())


def relabel(
    image_id: np.ndarray,
    cell_id: np.ndarray,
    cluster_in_cell: np.ndarray,
    previous: PreviousLabels | None,
    new_centroids: CellCentroids | None = None,
    old_centroids: CellCentroids | None = None,
) -> Relabeling:
    """Slots, global ids and change counts of a round's clusters against the previous version.

    With `previous=None` (the first version) the clusters are the slots and ids are dense.
    Shapes as in `match_to_previous`.
    """
    image_id = np.asarray(image_id, dtype=np.int64)
    cell_id = np.asarray(cell_id, dtype=np.int64)
    if len(np.unique(image_id)) != len(image_id):
        raise ValueError("image_id values must be unique")
    if previous is None:
        slots = np.asarray(cluster_in_cell, dtype=np.int32)
        ids = assign_class_ids(cell_id, slots)
        return Relabeling(slots, ids.class_id, ids.retired_class_ids, ids.next_class_id, 0, len(image_id))
    slots = match_to_previous(image_id, cell_id, cluster_in_cell, previous, new_centroids, old_centroids)
    ids = assign_class_ids(cell_id, slots, previous)
    changed, new = count_changed(image_id, ids.class_id, previous)
    return Relabeling(slots, ids.class_id, ids.retired_class_ids, ids.next_class_id, changed, new)
