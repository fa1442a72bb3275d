"""How many steps every rank takes, and how a rank's steps are split over its loader workers.

Pure functions of integers, so they can be checked on a simulated 22 nodes x 8 ranks x
8 workers without a process.  The shard each reader slot reads is `shards.reader.shards_for_slot`;
everything here is derived from it, so the two can never disagree.

Why: with DDP every rank must run the same number of optimizer steps, or the rank with
more data waits forever in an all-reduce the others never join.  Shards hold different
numbers of samples, so each rank is stopped after `steps_per_epoch` steps, the largest
number that *every* rank's workers can deliver.

Counting is conservative: a worker delivers `(samples - reserve) // items_per_step` full
batches (a partial last batch is dropped), where `reserve` is how many samples the batch
former may fail to use at the end of its stream (0 for pairs; see `group_reserve`).

When a batch takes its places from one subset (a GSV-Cities city; trainer.data's
`batch_places_from`), counts are per shard and subset, and a worker's capacity is the sum
over subsets of the full batches that subset's samples alone can form: a subset's last,
unfilled batch is never counted, so the step count holds however the subsets interleave.
Its reserve is per subset and capped by the worker's samples of split places (only they can
wait; `waiting_reserve`), so that twenty subsets do not cost twenty reserves on every worker.
"""

from __future__ import annotations

import numpy as np

from placeforge.shards.reader import ReaderSlot, shards_for_slot


def worker_capacity(samples: int, items_per_step: int, reserve: int = 0) -> int:
    """Full batches one worker can form from `samples` usable samples."""
    if items_per_step < 1:
        raise ValueError(f"items_per_step must be >= 1, got {items_per_step}")
    return max(0, samples - reserve) // items_per_step


def slot_samples(shard_sample_counts: np.ndarray, slot: ReaderSlot, epoch: int, seed: int) -> np.ndarray:
    """[num_subsets] usable samples `slot` reads in `epoch`, of each subset.

    Args:
        shard_sample_counts: [num_shards] or [num_shards, num_subsets] usable samples per shard
            (a 1-D count is one subset).
    """
    counts = np.asarray(shard_sample_counts, dtype=np.int64)
    if counts.ndim == 1:
        counts = counts[:, None]
    shards = shards_for_slot(len(counts), slot, epoch, seed)
    return counts[shards].sum(axis=0)  # [num_subsets]


def slot_batches(
    shard_sample_counts: np.ndarray,
    slot: ReaderSlot,
    items_per_step: int,
    epoch: int,
    seed: int,
    reserve: int = 0,
    split_sample_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """([num_subsets] usable samples `slot` reads, [num_subsets] full batches they certainly form).

    Args:
        shard_sample_counts: [num_shards] or [num_shards, num_subsets] usable samples per shard.
        reserve: samples of one subset the batch former may leave unused at the end of the stream.
        split_sample_counts: same shape, the usable samples whose place has other usable samples
            (parts of a split place); only they can wait for a later group, so the reserve is
            at most those the slot reads.  None: the reserve as given.
    """
    samples = slot_samples(shard_sample_counts, slot, epoch, seed)
    reserves = np.full_like(samples, reserve)
    if split_sample_counts is not None:
        reserves = np.minimum(reserves, slot_samples(split_sample_counts, slot, epoch, seed))
    batches = np.array([worker_capacity(int(n), items_per_step, int(r)) for n, r in zip(samples, reserves)])
    return samples, batches.astype(np.int64)


def rank_worker_capacities(
    shard_sample_counts: list[int] | np.ndarray,
    rank: int,
    world_size: int,
    num_workers: int,
    items_per_step: int,
    epoch: int,
    seed: int,
    reserve_per_worker: int = 0,
    split_sample_counts: np.ndarray | None = None,
) -> list[int]:
    """[num_workers] full batches each loader worker of `rank` can deliver in `epoch`.

    Args:
        shard_sample_counts: [num_shards] usable samples per shard (samples the stage can
            use: >= 2 images for pairs, >= K images for P x K groups), or [num_shards,
            num_subsets] when a batch's places come from one subset: then each subset's
            samples form batches on their own, and `reserve_per_worker` is per subset.
        num_workers: DataLoader workers per rank; 0 (load in the main process) reads like 1.
        split_sample_counts: caps each worker's reserve (`slot_batches`); None: no cap.
    """
    workers = max(1, num_workers)
    capacities = []
    for worker in range(workers):
        slot = ReaderSlot(rank, world_size, worker, workers)
        _, batches = slot_batches(shard_sample_counts, slot, items_per_step, epoch, seed, reserve_per_worker,
                                  split_sample_counts)
        capacities.append(int(batches.sum()))
    return capacities


def steps_per_epoch(
    shard_sample_counts: list[int] | np.ndarray,
    world_size: int,
    num_workers: int,
    items_per_step: int,
    epoch: int,
    seed: int,
    reserve_per_worker: int = 0,
    split_sample_counts: np.ndarray | None = None,
) -> int:
    """Steps every rank can take in `epoch`: min over ranks of the sum over its workers' capacities.

    Args:
        shard_sample_counts: [num_shards] usable samples per shard, or [num_shards, num_subsets]
            (`rank_worker_capacities`).
        items_per_step: samples one batch consumes (pairs per batch, or P places per group).
        reserve_per_worker: samples a worker may leave unused at the end of its stream.
        split_sample_counts: caps each worker's reserve (`slot_batches`); None: no cap.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return min(
        sum(rank_worker_capacities(shard_sample_counts, rank, world_size, num_workers, items_per_step, epoch, seed,
                                   reserve_per_worker, split_sample_counts))
        for rank in range(world_size)
    )


def worker_quotas(capacities: list[int], steps: int) -> list[int]:
    """Split a rank's `steps` over its workers: [num_workers] batches each, summing to `steps`.

    Water-filling: every worker gets the same share, capped by its capacity, so workers
    finish together and the DataLoader's round-robin over workers rarely stalls.
    Raises:
        ValueError: `steps` exceeds the workers' total capacity.
    """
    if steps > sum(capacities):
        raise ValueError(f"{steps} steps asked of workers that can deliver {sum(capacities)}")
    quotas = [0] * len(capacities)
    left = steps
    open_workers = [w for w, c in enumerate(capacities) if c > 0]
    while left > 0:
        share = max(1, left // len(open_workers))
        for w in list(open_workers):
            take = min(share, capacities[w] - quotas[w], left)
            quotas[w] += take
            left -= take
            if quotas[w] == capacities[w]:
                open_workers.remove(w)
            if left == 0:
                break
    return quotas


def group_reserve(places_per_group: int, max_parts_per_place: int) -> int:
    """Samples `shards.reader.place_groups` may leave unused at the end of one worker's stream.

    At the end the unfinished group holds at most P - 1 samples, plus `waiting_reserve`.
    """
    return (places_per_group - 1) + waiting_reserve(places_per_group, max_parts_per_place)


def waiting_reserve(places_per_group: int, max_parts_per_place: int) -> int:
    """Samples waiting for a later group at the end of a stream of `shards.reader.place_groups`.

    They are parts of a place already in the group being filled or in the group just
    completed: at most 2P - 1 places, each with at most `max_parts_per_place` - 1 waiting parts.
    This is the reserve of one-subset groups (`batch_places_from` one_subset, per subset):
    n samples give (n - unfinished - waiting) / P groups, at least (n - waiting) // P, since
    the unfinished group's < P samples are what the floor drops anyway.  `group_reserve`
    counts those P - 1 once more (one group per worker too few, kept so that the steps of
    mixed-subset groups stay as they were).
    """
    return (2 * places_per_group - 1) * max(0, max_parts_per_place - 1)


def subset_leftovers(
    shard_sample_counts: np.ndarray,
    rank: int,
    world_size: int,
    num_workers: int,
    places_per_group: int,
    epoch: int,
    seed: int,
    reserve_per_worker: int = 0,
    split_sample_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """[num_subsets] usable samples `rank`'s workers read, and [num_subsets] of them its counted groups leave out.

    Per worker and subset, the samples beyond the P x `worker_capacity` its full groups hold:
    a subset a worker reads fewer than P samples of gives it no group at all.  The epoch's
    steps never count these; the worker may still use some (the reserve is a bound), and the
    next epoch deals shards and samples anew.

    Args:
        shard_sample_counts: [num_shards, num_subsets] usable samples per shard and subset.
        split_sample_counts: caps each worker's reserve (`slot_batches`); None: no cap.
    """
    workers = max(1, num_workers)
    read = np.zeros(np.asarray(shard_sample_counts).shape[1], dtype=np.int64)
    left = np.zeros_like(read)
    for worker in range(workers):
        slot = ReaderSlot(rank, world_size, worker, workers)
        samples, groups = slot_batches(shard_sample_counts, slot, places_per_group, epoch, seed, reserve_per_worker,
                                       split_sample_counts)
        read += samples
        left += samples - places_per_group * groups
    return read, left


PART_STREAM = 0x5A17  # a random stream of its own: not the shard order's (seed, epoch) draws


def one_sample_per_place(sample_place: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """[S] bool: the one sample of each place that gives the place's stage-1 pair in `epoch`.

    A big place is split over several samples (shards.plan), and every sample gives a pair,
    so a place of k samples would be drawn k times an epoch.  Pair-VPR draws each place once
    an epoch; keeping one of its samples, drawn afresh each epoch, does the same and lets every
    part of the place take its turn.  Every rank computes the same choice from the same index.

    Args:
        sample_place: [S] place id of each sample, in an order every rank shares (sample key).
    """
    sample_place = np.asarray(sample_place)
    if len(sample_place) == 0:
        return np.zeros(0, dtype=bool)
    tiebreak = np.random.default_rng([seed, epoch, PART_STREAM]).random(len(sample_place))  # [S]
    order = np.lexsort((tiebreak, sample_place))
    first = np.r_[True, sample_place[order][1:] != sample_place[order][:-1]]
    keep = np.zeros(len(sample_place), dtype=bool)
    keep[order[first]] = True
    return keep

