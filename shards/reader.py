"""The one reader of shard sets: stream place samples, split by node and worker.

Stages are small generators (testable on plain lists), composed into a
`webdataset.DataPipeline`:

    shard urls -> select this (rank, worker)'s shards -> tar members -> PlaceSample
               -> shuffle (compressed bytes) -> same_place_pairs | place_groups

Which reader slot reads which shard is a pure function of integers
(`shards_for_slot`), so it can be checked for thousands of simulated ranks and
workers without starting a process.  Images stay JPEG bytes here; decoding and
augmentation belong to the training loader's workers.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Iterator

import numpy as np

from placeforge.shards.layout import SHARD_SUBDIR, image_members
from placeforge.shards.manifest import Manifest, read_manifest

if TYPE_CHECKING:
    import webdataset as wds


@dataclass(frozen=True)
class ReaderSlot:
    """One reading process: a distributed rank and a data-loader worker inside it."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def global_index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def total(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class PlaceSample:
    """One shard sample: images of one place (or one part of a big place)."""

    key: str
    place_id: int
    place_key: str
    image_ids: tuple[int, ...]
    jpegs: tuple[bytes, ...]  # [n] encoded images, same order as image_ids
    meta: tuple[dict, ...]  # [n] per-image records from the sample JSON


@dataclass(frozen=True)
class SamePlacePair:
    place_id: int
    image_ids: tuple[int, int]
    jpegs: tuple[bytes, bytes]


@dataclass(frozen=True)
class PlaceGroup:
    """P places x K images, the batch unit of metric learning."""

    place_ids: tuple[int, ...]  # [P]
    image_ids: tuple[tuple[int, ...], ...]  # [P][K]
    jpegs: tuple[tuple[bytes, ...], ...]  # [P][K]
    positions: tuple[tuple[tuple[float, float, float], ...], ...] = ()  # [P][K] utm_position of each image


def utm_position(meta: dict) -> tuple[float, float, float]:
    """(zone, east, north) of an image's sample record; NaN for what the record does not have."""
    values = (meta.get("utm_zone"), meta.get("utm_east"), meta.get("utm_north"))
    return tuple(float("nan") if v is None else float(v) for v in values)


@dataclass(frozen=True)
class ShardSet:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        return cls(root, read_manifest(root))

    @property
    def urls(self) -> list[str]:
        return [str(self.root / SHARD_SUBDIR / s.name) for s in self.manifest.shards]


def shard_order(num_shards: int, epoch: int, seed: int) -> np.ndarray:
    """The epoch's shard order: a permutation that every slot computes identically."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def shards_for_slot(num_shards: int, slot: ReaderSlot, epoch: int, seed: int) -> list[int]:
    """Shard indices that `slot` reads in `epoch`: the epoch order dealt round-robin.

    Every shard goes to exactly one slot; slot loads differ by at most one shard.
    With more slots than shards some slots get none, which callers must treat as
    a configuration error for training (see `check_enough_shards`).
    """
    order = shard_order(num_shards, epoch, seed)
    return [int(s) for s in order[slot.global_index :: slot.total]]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    slots = world_size * max(1, num_workers)
    if num_shards < slots:
        raise ValueError(
            f"{num_shards} shards for {world_size} rank(s) x {max(1, num_workers)} loader worker(s): "
            f"some readers would get no data; rebuild with --min-shards {slots} or use fewer workers"
        )


def select_shards(urls: list[str], rank: int, world_size: int, epoch: int, seed: int) -> Iterator[dict]:
    """Pipeline source: this process's shard urls, as webdataset {"url": ...} dicts.

    The loader worker is looked up when iteration starts (inside the worker process).
    """
    from torch.utils.data import get_worker_info  # only needed once iteration starts

    info = get_worker_info()
    slot = ReaderSlot(rank, world_size, info.id if info else 0, info.num_workers if info else 1)
    for shard in shards_for_slot(len(urls), slot, epoch, seed):
        yield {"url": urls[shard]}


def to_place_samples(src: Iterable[dict]) -> Iterator[PlaceSample]:
    """webdataset sample dicts (raw bytes per member) -> PlaceSample."""
    for sample in src:
        record = json.loads(sample["json"])
        members = image_members(sample)
        by_member = {m["member"]: m for m in record["images"]}
        yield PlaceSample(
            key=sample["__key__"],
            place_id=int(record["place_id"]),
            place_key=record["place_key"],
            image_ids=tuple(int(by_member[m]["image_id"]) for m in members),
            jpegs=tuple(sample[m] for m in members),
            meta=tuple(by_member[m] for m in members),
        )


def same_place_pairs(src: Iterable[PlaceSample], rng: random.Random) -> Iterator[SamePlacePair]:
    """One pair of distinct images per place sample; samples of one image are skipped."""
    for sample in src:
        if len(sample.jpegs) < 2:
            continue
        a, b = rng.sample(range(len(sample.jpegs)), 2)
        yield SamePlacePair(
            sample.place_id, (sample.image_ids[a], sample.image_ids[b]), (sample.jpegs[a], sample.jpegs[b])
        )


def place_groups(
    src: Iterable[PlaceSample],
    places_per_group: int,
    images_per_place: int,
    rng: random.Random,
    subset_of: Callable[[PlaceSample], Hashable] | None = None,
) -> Iterator[PlaceGroup]:
    """Groups of P distinct places x K distinct images each.

    Samples with fewer than K images are skipped.  A sample whose place is already in
    the group being filled (two parts of a big place) waits for the next group, so
    a group never holds the same place twice.  With `subset_of` (sample -> its subset),
    a group takes all its places from one subset: every subset fills a pending group of
    its own, in stream order, and a group is yielded as soon as one is full; the stream
    then forms each subset's groups exactly as it would the subset's samples alone.
    """
    pending: dict[Hashable, tuple[list[PlaceSample], list[PlaceSample]]] = {}  # subset -> (group, waiting)
    for sample in src:
        if len(sample.jpegs) < images_per_place:
            continue
        group, waiting = pending.setdefault(subset_of(sample) if subset_of else None, ([], []))
        candidates = waiting + [sample]
        waiting.clear()
        for candidate in candidates:
            if any(g.place_id == candidate.place_id for g in group):
                waiting.append(candidate)
                continue
            group.append(candidate)
            if len(group) == places_per_group:
                yield _make_group(group, images_per_place, rng)
                group.clear()


def _make_group(samples: list[PlaceSample], k: int, rng: random.Random) -> PlaceGroup:
    picks = [rng.sample(range(len(s.jpegs)), k) for s in samples]
    return PlaceGroup(
        place_ids=tuple(s.place_id for s in samples),
        image_ids=tuple(tuple(s.image_ids[i] for i in p) for s, p in zip(samples, picks)),
        jpegs=tuple(tuple(s.jpegs[i] for i in p) for s, p in zip(samples, picks)),
        positions=tuple(tuple(utm_position(s.meta[i]) for i in p) for s, p in zip(samples, picks)),
    )


def place_sample_pipeline(
    urls: list[str],
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 256,
) -> "wds.DataPipeline":
    """An IterableDataset of PlaceSample for one rank; use it in a torch DataLoader.

    Shuffling happens on compressed samples (a buffer of `shuffle_buffer` places) so
    the buffer costs megabytes, not gigabytes of decoded pixels.
    """
    import webdataset as wds  # here, not at import: it imports torch, which the shard index readers
    # (clustering's workers, recluster's version 0) do not need (docs/benchmarks.md, start-up)

    stages: list = [
        functools.partial(select_shards, urls, rank, world_size, epoch, seed),
        wds.tarfile_to_samples(),
        to_place_samples,
    ]
    if shuffle_buffer > 1:
        stages.append(functools.partial(shuffle_place_samples, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank))
    return wds.DataPipeline(*stages)


def shuffle_place_samples(src: Iterable[PlaceSample], bufsize: int, seed: int, epoch: int, rank: int) -> Iterator[PlaceSample]:
    """webdataset's buffer shuffle, seeded per (seed, epoch, rank, loader worker) at iteration time."""
    import webdataset as wds
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    rng = random.Random(f"{seed}/{epoch}/{rank}/{info.id if info else 0}")
    yield from wds.shuffle(bufsize, initial=min(bufsize, 64), rng=rng)(src)
