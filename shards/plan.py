"""Which image goes into which sample and which shard: pure functions of arrays and a seed.

Images of one place travel together in one sample, so a streaming reader can form
same-place pairs and P x K groups without random access.  Big places are split
into near-equal parts of at most `max_images_per_sample` images (23 images with a
cap of 16 give parts of 12 and 11, not 16 and 7, so both parts still make groups).
Samples are shuffled across shards and shards are balanced by image count.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.layout import image_member, sample_key


def split_sizes(n_images: int, max_per_sample: int) -> list[int]:
    """Sizes of the near-equal parts a place of `n_images` is split into."""
    if n_images <= 0:
        return []
    parts = math.ceil(n_images / max_per_sample)
    base, extra = divmod(n_images, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def choose_num_shards(n_images: int, n_samples: int, images_per_shard: int, min_shards: int) -> int:
    """At least `min_shards` (so every reader worker gets shards), about `images_per_shard` each,
    never more shards than samples."""
    wanted = max(min_shards, math.ceil(n_images / images_per_shard))
    return max(1, min(wanted, n_samples))


def balance_samples(sample_sizes: np.ndarray, num_shards: int, seed: int) -> np.ndarray:
    """Shard index of each sample: samples in a seeded random order, each to the emptiest shard.

    Args:
        sample_sizes: [S] images per sample.
    Returns:
        [S] int64 shard indices; shard image counts differ by at most the largest sample.
    """
    order = np.random.default_rng(seed).permutation(len(sample_sizes))
    heap = [(0, shard) for shard in range(num_shards)]
    out = np.empty(len(sample_sizes), dtype=np.int64)
    for sample in order:
        load, shard = heapq.heappop(heap)
        out[sample] = shard
        heapq.heappush(heap, (load + int(sample_sizes[sample]), shard))
    return out


def plan_shards(
    catalog: pa.Table, max_images_per_sample: int, images_per_shard: int, min_shards: int, seed: int
) -> pa.Table:
    """Assign every catalog row to a (shard, sample, member).

    Args:
        catalog: rows with at least image_id and place_id (place_id not null).
    Returns:
        The catalog rows with added columns shard_index, sample_index, sample_key, part,
        parts, member, sorted by (shard_index, order of samples in the shard, member).
        Order within a shard is shuffled too, so a reader streaming one shard sees
        places in random order.
    """
    if catalog.num_rows == 0:
        raise ValueError("nothing to shard: the catalog has no images left after rejects")
    rng = np.random.default_rng(seed)
    place = catalog.column("place_id").to_numpy()
    image = catalog.column("image_id").to_numpy()
    # Deterministic, seed-shuffled order of images inside each place.
    jitter = rng.permutation(len(image))
    rows = np.lexsort((jitter, place))
    place_sorted = place[rows]
    starts = np.flatnonzero(np.r_[True, place_sorted[1:] != place_sorted[:-1]])
    ends = np.r_[starts[1:], len(rows)]

    n = len(rows)
    sample_of = np.empty(n, dtype=np.int64)
    member_of = np.empty(n, dtype=np.int64)
    part_of = np.empty(n, dtype=np.int64)
    parts_of = np.empty(n, dtype=np.int64)
    sample_sizes: list[int] = []
    for start, end in zip(starts, ends):
        sizes = split_sizes(int(end - start), max_images_per_sample)
        offset = start
        for part, size in enumerate(sizes):
            block = rows[offset : offset + size]
            sample_of[block] = len(sample_sizes)
            member_of[block] = np.arange(size)
            part_of[block] = part
            parts_of[block] = len(sizes)
            sample_sizes.append(size)
            offset += size
    sizes_arr = np.asarray(sample_sizes)
    num_shards = choose_num_shards(n, len(sizes_arr), images_per_shard, min_shards)
    shard_of_sample = balance_samples(sizes_arr, num_shards, seed)
    # Samples are numbered in shard order so that sample keys grow through the set.
    sample_rank = rng.permutation(len(sizes_arr))
    order = np.lexsort((sample_rank, shard_of_sample))
    new_number = np.empty_like(order)
    new_number[order] = np.arange(len(order))
    sample_index = new_number[sample_of]

    planned = catalog.append_column("shard_index", pa.array(shard_of_sample[sample_of]))
    planned = planned.append_column("sample_index", pa.array(sample_index))
    planned = planned.append_column("sample_key", pa.array([sample_key(int(s)) for s in sample_index]))
    planned = planned.append_column("part", pa.array(part_of))
    planned = planned.append_column("parts", pa.array(parts_of))
    planned = planned.append_column("member", pa.array([image_member(int(m)) for m in member_of]))
    sort = pc.sort_indices(planned, [("sample_index", "ascending"), ("member", "ascending")])
    return planned.take(sort)
