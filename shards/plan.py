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

from placeforge.shards.layout import image_member, sample_key


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
    shard_of = [0] * len(sample_sizes)
    sizes, replace = np.asarray(sample_sizes).tolist(), heapq.heapreplace
    # (load, shard) pairs are distinct, so heapreplace picks what heappop + heappush would.
    for sample in order.tolist():
        load, shard = heap[0]
        shard_of[sample] = shard
        replace(heap, (load + sizes[sample], shard))
    return np.array(shard_of, dtype=np.int64)


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
    sort, columns = plan_rows(catalog.column("place_id").to_numpy(), max_images_per_sample, images_per_shard,
                              min_shards, seed)
    planned = catalog.take(pa.array(sort))
    for name, values in columns.items():
        planned = planned.append_column(name, values)
    return planned


def plan_rows(
    place_id: np.ndarray, max_images_per_sample: int, images_per_shard: int, min_shards: int, seed: int
) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """`plan_shards` on the place ids alone, so the driver plans over compact integer columns.

    Args:
        place_id: [N] int64 place of each catalog row (not null).
    Returns:
        (sort [N]: the catalog rows in plan order, {shard_index, sample_index, sample_key, part,
        parts, member}: [N] arrays in that order).
    """
    place = np.asarray(place_id)
    if len(place) == 0:
        raise ValueError("nothing to shard: the catalog has no images left after rejects")
    rng = np.random.default_rng(seed)
    # Deterministic, seed-shuffled order of images inside each place: rows by (place, jitter).  As
    # jitter is a permutation, that is a stable sort by place of the rows taken in jitter order
    # (one key instead of lexsort's two: half the time at 5 M rows).
    jitter = rng.permutation(len(place))
    by_jitter = np.empty_like(jitter)
    by_jitter[jitter] = np.arange(len(jitter))
    rows = by_jitter[np.argsort(place[by_jitter], kind="stable")]
    place_sorted = place[rows]
    starts = np.flatnonzero(np.r_[True, place_sorted[1:] != place_sorted[:-1]])
    place_size = np.diff(np.r_[starts, len(rows)])  # [P] images per place, places in ascending id
    sample_of, member_of, part_of, parts_of, sample_sizes = split_places(place_size, max_images_per_sample)
    # rows[i] is the i-th image in place order: scatter the per-position results back to catalog rows
    for values in (sample_of, member_of, part_of, parts_of):
        values[rows] = values.copy()

    num_shards = choose_num_shards(len(rows), len(sample_sizes), images_per_shard, min_shards)
    shard_of_sample = balance_samples(sample_sizes, num_shards, seed)
    # Samples are numbered in shard order so that sample keys grow through the set.
    sample_rank = rng.permutation(len(sample_sizes))
    order = np.lexsort((sample_rank, shard_of_sample))
    new_number = np.empty_like(order)
    new_number[order] = np.arange(len(order))
    sample_index = new_number[sample_of]

    # Keys and member names are made once per sample and per position, then gathered.
    sample_keys = pa.array(list(map(sample_key, range(len(sample_sizes)))), pa.string())
    members = pa.array([image_member(m) for m in range(int(member_of.max()) + 1)], pa.string())
    sort = _by_sample_and_member_name(sample_index, member_of, sample_sizes[order], members.to_pylist())
    return sort, {
        "shard_index": pa.array(shard_of_sample[sample_of][sort]),
        "sample_index": pa.array(sample_index[sort]),
        "sample_key": sample_keys.take(pa.array(sample_index[sort])),
        "part": pa.array(part_of[sort]),
        "parts": pa.array(parts_of[sort]),
        "member": members.take(pa.array(member_of[sort])),
    }


def _by_sample_and_member_name(sample_index: np.ndarray, member: np.ndarray, sizes: np.ndarray,
                               names: list[str]) -> np.ndarray:
    """The [N] rows sorted by (sample_index, member name): names, not positions, as ever ("1000.jpg" <
    "999.jpg").  sample_index [N] numbers samples 0..S-1, whose sizes are `sizes` [S]; a sample of k
    images has members 0..k-1, named names[m].  Every (sample, member) is distinct, so each row's place
    in the order is computed, not sorted for: its sample's start plus the rank of its member's name
    among the sample's k names, as np.lexsort((name rank, sample_index)) would place it."""
    name_rank = np.argsort(np.argsort(np.array(names, dtype=object)))  # [M] over all names
    if len(names) > 1024:  # a [M + 1, M] table of ranks would be too big: sort
        return np.lexsort((name_rank[member], sample_index))
    rank_among_first = np.zeros((len(names) + 1, len(names)), dtype=np.int64)  # [k, m]: among members 0..k-1
    for k in range(1, len(names) + 1):
        rank_among_first[k, :k] = np.argsort(np.argsort(name_rank[:k]))
    start = np.cumsum(sizes) - sizes  # [S]
    position = start[sample_index] + rank_among_first[sizes[sample_index], member]
    sort = np.empty_like(position)
    sort[position] = np.arange(len(position))
    return sort


def split_places(place_size: np.ndarray, max_per_sample: int) -> tuple[np.ndarray, ...]:
    """Split P places into near-equal samples (`split_sizes` of each), for all places at once.

    Args:
        place_size: [P] images per place (>= 1), places in order.
    Returns:
        (sample, member, part, parts) for each of the N = sum(place_size) image positions in
        place order (the first place's images, then the second's, ...), each [N] int64, and
        sample_sizes [S] int64; samples are numbered in place order, parts in order.
    """
    place_size = np.asarray(place_size, dtype=np.int64)
    parts = -(-place_size // max_per_sample)  # ceil
    base, extra = np.divmod(place_size, parts)  # `extra` parts of base + 1, then parts - extra of base
    first_sample = np.cumsum(parts) - parts
    sample_place = np.repeat(np.arange(len(parts)), parts)
    part_in_place = np.arange(len(sample_place)) - first_sample[sample_place]
    sample_sizes = base[sample_place] + (part_in_place < extra[sample_place])

    place_of = np.repeat(np.arange(len(place_size)), place_size)  # [N]
    position = np.arange(len(place_of)) - (np.cumsum(place_size) - place_size)[place_of]
    b, e = base[place_of], extra[place_of]
    in_big = position < e * (b + 1)  # within the first `extra` (bigger) parts
    after_big = position - e * (b + 1)
    part = np.where(in_big, position // (b + 1), e + after_big // b)
    member = np.where(in_big, position % (b + 1), after_big % b)
    return first_sample[place_of] + part, member, part, parts[place_of], sample_sizes
