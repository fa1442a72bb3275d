"""What a shard set holds, per shard: the place samples each training stage can use.

    counts, max_parts = usable_samples(index, num_shards, min_images=4)  # [num_shards], most samples of a place
    counts, skip_keys = pair_samples(pair_sample_table(index), num_shards, epoch, seed)  # one pair per place

Pure functions of the shard index (`shards.index` rows), and their `..._of(shard_dir, ...)`
readers, which read a shard set on disk once per process (shard sets are immutable);
trainer.data.make_loader turns the counts into equal steps per rank (trainer.data_plan).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from placeforge.catalog import read_catalog
from placeforge.shards.index import read_index
from placeforge.shards.layout import CATALOG_FILE, INDEX_FILE
from placeforge.trainer.cosface_groups import index_of_images, labels_group_image_ids
from placeforge.trainer.data_plan import one_sample_per_place
from placeforge.trainer.subsets import PlaceSubsets, log_subset_leftovers, place_subsets, subset_samples


def usable_samples(index: pa.Table, num_shards: int, min_images: int) -> tuple[list[int], int]:
    """Per-shard count of samples with >= `min_images` images, and the most such samples of one place.

    Args:
        index: `shards.index` rows (image_id, place_id, shard_index, sample_key, ...).
    Returns:
        ([num_shards] usable samples per shard, max usable samples sharing one place_id).
    """
    usable = _usable_sample_rows(index, min_images)
    shard = usable.column("shard_index").to_numpy().astype(np.int64)
    counts = np.bincount(shard, minlength=num_shards)
    _, per_place = np.unique(usable.column("place_id").to_numpy(), return_counts=True)
    return counts.tolist(), int(per_place.max()) if len(per_place) else 0


def _usable_sample_rows(index: pa.Table, min_images: int) -> pa.Table:
    """One row per sample with >= `min_images` images: shard_index, sample_key, place_id, image_id_count."""
    per_sample = index.group_by(["shard_index", "sample_key", "place_id"]).aggregate([("image_id", "count")])
    return per_sample.filter(pc.greater_equal(per_sample.column("image_id_count"), min_images))


def pair_samples(usable: pa.Table, num_shards: int, epoch: int, seed: int) -> tuple[list[int], np.ndarray]:
    """Per-shard count of the samples that give `epoch`'s pairs at one pair per place, and the rest.

    Of each place's samples with >= 2 images, one (`trainer.data_plan.one_sample_per_place`)
    gives the place's pair; the others are skipped this epoch.
    Args:
        usable: `pair_sample_table` of the shard index.
    Returns:
        ([num_shards] pair samples per shard, sorted bytes array of the sample keys to skip).
    """
    keep = one_sample_per_place(usable.column("place_id").to_numpy(), epoch, seed)
    shard = usable.column("shard_index").to_numpy().astype(np.int64)
    keys = np.array([k.encode("utf-8", "replace") for k in usable.column("sample_key").to_pylist()], dtype=np.bytes_)
    return np.bincount(shard[keep], minlength=num_shards).tolist(), np.sort(keys[~keep])


def pair_sample_table(index: pa.Table) -> pa.Table:
    """One row per sample with >= 2 images (shard_index, sample_key, place_id, image_id_count), by sample key."""
    per_sample = index.group_by(["shard_index", "sample_key", "place_id"]).aggregate([("image_id", "count")])
    usable = per_sample.filter(pc.greater_equal(per_sample.column("image_id_count"), 2))
    return usable.sort_by("sample_key")  # group_by's order is not fixed; every rank must choose alike


@functools.lru_cache(maxsize=2)
def pair_samples_of(shard_dir: str) -> pa.Table:
    """`pair_sample_table` of a shard set on disk, read once per process (shard sets are immutable)."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    return pair_sample_table(read_index(Path(shard_dir) / INDEX_FILE).select(columns))


@functools.lru_cache(maxsize=8)
def usable_samples_of(shard_dir: str, num_shards: int, min_images: int) -> tuple[tuple[int, ...], int]:
    """`usable_samples` of a shard set on disk; read once per process (shard sets are immutable)."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    counts, max_parts = usable_samples(read_index(Path(shard_dir) / INDEX_FILE).select(columns), num_shards, min_images)
    return tuple(counts), max_parts


@functools.lru_cache(maxsize=8)
def group_usable_samples_of(shard_dir: str, num_shards: int, min_images: int, labels_dir: str, version: int,
                             group: int) -> tuple[tuple[int, ...], int]:
    """`usable_samples` of one CosPlace group's images, what `trainer.cosface_groups.keep_images`
    leaves of the shards; read once per process and group."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    index = index_of_images(read_index(Path(shard_dir) / INDEX_FILE).select(columns),
                            labels_group_image_ids(labels_dir, version, group))
    counts, max_parts = usable_samples(index, num_shards, min_images)
    return tuple(counts), max_parts


# ---- the subset of each place (batch_places_from one_subset) ----


@functools.lru_cache(maxsize=2)
def place_subsets_of(shard_dir: str) -> PlaceSubsets:
    """`place_subsets` of a shard set's catalog, read once per process (shard sets are immutable)."""
    path = Path(shard_dir) / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: batch_places_from one_subset reads each place's subset from the shard "
                                "set's catalog, and there is none; rebuild the shards, or use batch_places_from any")
    return place_subsets(read_catalog(path).select(["place_id", "dataset", "subset"]))


@functools.lru_cache(maxsize=8)
def subset_samples_of(shard_dir: str, num_shards: int, min_images: int) -> tuple[np.ndarray, np.ndarray]:
    """`subset_samples` of a shard set on disk, read once per process."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    usable = _usable_sample_rows(read_index(Path(shard_dir) / INDEX_FILE).select(columns), min_images)
    return subset_samples(usable, num_shards, place_subsets_of(shard_dir))


@functools.lru_cache(maxsize=4096)
def logged_subset_leftovers(shard_dir: str, num_shards: int, min_images: int, rank: int, world_size: int,
                             num_workers: int, places_per_group: int, epoch: int, seed: int,
                             reserve: int) -> tuple[tuple[str, int], ...]:
    """`log_subset_leftovers` once per process and epoch: trainer.train plans every epoch's steps
    with a loader, then builds the epoch's loader again."""
    counts, split = subset_samples_of(shard_dir, num_shards, min_images)
    return tuple(log_subset_leftovers(counts, split, place_subsets_of(shard_dir).names, rank, world_size,
                                      num_workers, places_per_group, epoch, seed, reserve).items())
