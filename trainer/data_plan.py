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
"""

from __future__ import annotations

from shards.reader import ReaderSlot, shards_for_slot


def worker_capacity(samples: int, items_per_step: int, reserve: int = 0) -> int:
    """Full batches one worker can form from `samples` usable samples."""
    if items_per_step < 1:
        raise ValueError(f"items_per_step must be >= 1, got {items_per_step}")
    return max(0, samples - reserve) // items_per_step


def rank_worker_capacities(
    shard_sample_counts: list[int],
    rank: int,
    world_size: int,
    num_workers: int,
    items_per_step: int,
    epoch: int,
    seed: int,
    reserve_per_worker: int = 0,
) -> list[int]:
    """[num_workers] full batches each loader worker of `rank` can deliver in `epoch`.

    Args:
        shard_sample_counts: [num_shards] usable samples per shard (samples the stage can
            use: >= 2 images for pairs, >= K images for P x K groups).
        num_workers: DataLoader workers per rank; 0 (load in the main process) reads like 1.
    """
    workers = max(1, num_workers)
    num_shards = len(shard_sample_counts)
    capacities = []
    for worker in range(workers):
        slot = ReaderSlot(rank, world_size, worker, workers)
        samples = sum(shard_sample_counts[s] for s in shards_for_slot(num_shards, slot, epoch, seed))
        capacities.append(worker_capacity(samples, items_per_step, reserve_per_worker))
    return capacities


def steps_per_epoch(
    shard_sample_counts: list[int],
    world_size: int,
    num_workers: int,
    items_per_step: int,
    epoch: int,
    seed: int,
    reserve_per_worker: int = 0,
) -> int:
    """Steps every rank can take in `epoch`: min over ranks of the sum over its workers' capacities.

    Args:
        shard_sample_counts: [num_shards] usable samples per shard.
        items_per_step: samples one batch consumes (pairs per batch, or P places per group).
        reserve_per_worker: samples a worker may leave unused at the end of its stream.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return min(
        sum(rank_worker_capacities(shard_sample_counts, rank, world_size, num_workers, items_per_step, epoch, seed,
                                   reserve_per_worker))
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

    At the end the unfinished group holds at most P - 1 samples, and the samples waiting
    for a later group (parts of a place already in the group being filled, or in the
    group just completed) belong to at most 2P - 1 places, each with at most
    `max_parts_per_place` - 1 waiting parts.
    """
    return (places_per_group - 1) + (2 * places_per_group - 1) * max(0, max_parts_per_place - 1)
