"""CosPlace groups in stage 2: which group an epoch trains, and what each group's classifier holds.

CosPlace, and MutualVPR after it, split the UTM cells (M = 10 m) into N x N groups: cells whose
(east index mod N, north index mod N) agree share a group, so two cells of one group are at least
N cells (50 m at M = 10, N = 5) apart and never show the same spot (clustering.cells.group_of_cell numbers them
(east mod N) * N + (north mod N)).  Each group has its own CosFace classifier; G groups are used,
one per epoch, round-robin:

    rows = group_class_ids(table.column("group_id"), table.column("class_id"), groups_used=8)
    model = build_finetune_model(cfg, 1, rows)        # rows[g]: class ids of group g's classifier rows
    activate_cosface_group(model, optimizer, cosface_group_of_epoch(epoch, 8))
    samples = keep_images(samples, labels_group_image_ids(labels, version, group))  # the loader: that group's images

MutualVPR's train.py (Gucci233/MutualVPR at bd373c6) trains group `epoch_num % groups_num`;
its groups are numbered in the order the training images first show them
(datasets/train_dataset.py, `initialize`), here by the id above, so groups 0 .. G-1 are the
same cells in every run.  The label set (clustering.labels) records every image's group.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from placeforge.clustering.labels import read_labels
from placeforge.shards.reader import PlaceSample


def cosface_group_of_epoch(epoch: int, groups_used: int) -> int:
    """The CosPlace group whose classifier and images epoch `epoch` (0-based) trains: epoch mod G."""
    if groups_used < 1 or epoch < 0:
        raise ValueError(f"groups_used must be >= 1 and epoch >= 0, got {groups_used}, {epoch}")
    return epoch % groups_used


def group_class_ids(group_id: np.ndarray, class_id: np.ndarray, groups_used: int) -> list[np.ndarray]:
    """The class ids of each group 0 .. G-1, ascending: the rows of its classifier.

    Args:
        group_id: [N] int, the CosPlace group of each labelled image.
        class_id: [N] int64, its view class (global id).
    Returns:
        G arrays [R_g] int64, sorted, unique; classes of groups >= G are in none.
    """
    group_id, class_id = np.asarray(group_id, dtype=np.int64), np.asarray(class_id, dtype=np.int64)
    if group_id.shape != class_id.shape:
        raise ValueError(f"group_id {group_id.shape} and class_id {class_id.shape} differ")
    return [np.unique(class_id[group_id == g]) for g in range(groups_used)]


def group_image_ids(image_id: np.ndarray, group_id: np.ndarray, group: int) -> np.ndarray:
    """[M] the image ids of CosPlace group `group`, sorted (a loader's filter: np.searchsorted)."""
    image_id, group_id = np.asarray(image_id, dtype=np.int64), np.asarray(group_id)
    return np.sort(image_id[group_id == group])


@functools.lru_cache(maxsize=4)
def labels_group_class_ids(labels_dir: str, version: int, groups_used: int) -> tuple[np.ndarray, ...]:
    """`group_class_ids` of a label version on disk, read once per process (versions are immutable)."""
    table = read_labels(Path(labels_dir), version).select(["group_id", "class_id"])
    return tuple(group_class_ids(table.column("group_id").to_numpy(), table.column("class_id").to_numpy(),
                                 groups_used))


@functools.lru_cache(maxsize=4)
def labels_group_image_ids(labels_dir: str, version: int, group: int) -> np.ndarray:
    """`group_image_ids` of a label version on disk, read once per process.  An image's group is
    its cell's, the same in every version of a label set."""
    table = read_labels(Path(labels_dir), version).select(["image_id", "group_id"])
    return group_image_ids(table.column("image_id").to_numpy(), table.column("group_id").to_numpy(), group)


def in_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """[N] bool: which of [N] int64 `values` are in the sorted array `sorted_ids`."""
    values = np.asarray(values, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[at] == values


def keep_images(src: Iterable[PlaceSample], image_ids: np.ndarray) -> Iterator[PlaceSample]:
    """Each place sample with only its images whose id is in sorted `image_ids` (one group's);
    a sample left with none is dropped.  A loader stage before `shards.reader.place_groups`."""
    for sample in src:
        keep = in_sorted(np.array(sample.image_ids, dtype=np.int64), image_ids)
        if keep.all():
            yield sample
        elif keep.any():
            yield dataclasses.replace(sample, image_ids=tuple(i for i, k in zip(sample.image_ids, keep) if k),
                                      jpegs=tuple(j for j, k in zip(sample.jpegs, keep) if k),
                                      meta=tuple(m for m, k in zip(sample.meta, keep) if k))


def index_of_images(index: pa.Table, image_ids: np.ndarray) -> pa.Table:
    """The rows of a shard index (`shards.index`) whose image is in sorted `image_ids`: what
    `keep_images` leaves of the shards, so the loader's step count is that of the filtered stream."""
    keep = in_sorted(index.column("image_id").to_numpy(), image_ids)
    return index.filter(pa.array(keep)) if len(keep) else index
