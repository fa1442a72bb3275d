"""Training loaders: place samples from the shards -> decoded, augmented batches, equal steps on every rank.

    loader, steps = make_loader(shard_dir, "pairs", rank=r, world_size=w, num_workers=8,
                                geometry=BatchGeometry(pairs_per_batch=64), image_size=224, epoch=e, seed=0)
    for img_a, img_b, place_ids, pair_kinds in loader: ...  # exactly `steps` batches, on every rank
    # pairing=PairRule(max_heading_diff_deg=50, panorama_views=True, one_per_place=True): Pair-VPR's pairs

    loader, steps = make_loader(shard_dir, "groups", ..., labels_dir=labels, label_version=None)
    for images, place_ids, image_ids, class_ids, positions in loader: ...
    loader.dataset.label_version                          # the label version these class ids came from
    check_label_set(shard_dir, labels, version)           # trainer.label_versions; rank 0, once per version

Stages (one generator each, testable on lists; trainer.batches), run inside each DataLoader worker:

    shards.reader.place_sample_pipeline (this rank/worker's shards, shuffle of JPEG bytes)
      -> [one sample per place (pairs, pairing.one_per_place)]
      -> [one CosPlace group's images only (cosface_group; trainer.cosface_groups.keep_images)]
      -> trainer.pairs.stage1_pairs | place_groups(P, K) [each group's places from one subset: one_subset]
      -> batched (pairs only) -> decode + augment (trainer.augment) -> PairBatch | GroupBatch
      -> first `quota` batches, where the quotas of a rank's workers sum to `steps` (trainer.data_plan,
         from the usable samples per shard that trainer.sample_counts reads from the shard index)

Build a new loader every epoch (`persistent_workers=False`): the epoch picks the shard
order, the steps, and the label version.  To switch labels between epochs pass the new
`label_version` (or None for the latest) to the next epoch's `make_loader`.  In DDP,
resolve the version once (rank 0) and broadcast it, or every rank may pick a different
"latest" while clustering writes a new one.

`batch_places_from="one_subset"` (stage "groups") takes every group's places from one subset
of the catalog (`place_subsets`: a GSV-Cities city), so its negatives are hard, as in Pair-VPR's
stage 2.  Shard samples do not record a subset; the loader reads it from the shard set's
catalog.parquet by place id, once per process.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from placeforge.clustering.labels import class_lookup, read_labels
from placeforge.shards.reader import ShardSet, check_enough_shards, place_groups, place_sample_pipeline
from placeforge.trainer.augment import AugmentConfig
from placeforge.trainer.batches import GroupBatch, PairBatch, batched, group_batches, pair_batches, skip_samples
from placeforge.trainer.cosface_groups import keep_images, labels_group_image_ids
from placeforge.trainer.data_plan import (
    group_reserve,
    rank_worker_capacities,
    steps_per_epoch,
    waiting_reserve,
    worker_quotas,
)
from placeforge.trainer.label_versions import resolve_label_version
from placeforge.trainer.pairs import PairRule, kind_counts, stage1_pairs
from placeforge.trainer.sample_counts import (
    group_usable_samples_of,
    logged_subset_leftovers,
    pair_samples,
    pair_samples_of,
    place_subsets_of,
    subset_samples_of,
    usable_samples_of,
)
from placeforge.trainer.sections import BatchGeometry
from placeforge.trainer.subsets import PlaceSubsets

STAGES = ("pairs", "groups")
BATCH_PLACES_FROM = ("any", "one_subset")  # stage "groups": a group's places from anywhere, or from one subset
log = logging.getLogger(__name__)


# ---- the dataset each rank iterates ----


class PlaceBatchStream(IterableDataset):
    """The batches of one rank in one epoch; each loader worker yields its quota of them.

    `len()` is the rank's step count, equal on every rank.  Picklable (plain fields), so
    workers get a copy; the label lookup is loaded inside each worker, once per epoch.
    """

    def __init__(
        self,
        urls: list[str],
        stage: str,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        geometry: BatchGeometry,
        image_size: int,
        quotas: list[int],
        shuffle_buffer: int = 256,
        augment: AugmentConfig = AugmentConfig(),
        labels_dir: str | None = None,
        label_version: int | None = None,
        pairing: PairRule = PairRule(),
        skip_keys: np.ndarray | None = None,
        subsets: PlaceSubsets | None = None,
        subset_leftovers: dict[str, int] | None = None,
        cosface_group: int | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        if stage == "groups" and (labels_dir is None or label_version is None):
            raise ValueError("stage 'groups' needs labels_dir and a resolved label_version")
        self.urls, self.stage, self.rank, self.world_size = urls, stage, rank, world_size
        self.epoch, self.seed, self.geometry, self.image_size = epoch, seed, geometry, image_size
        self.quotas, self.shuffle_buffer, self.augment = quotas, shuffle_buffer, augment
        self.labels_dir, self.label_version = labels_dir, label_version
        self.pairing = pairing
        self.skip_keys = np.zeros(0, dtype=np.bytes_) if skip_keys is None else skip_keys  # sorted sample keys
        self.subsets = subsets  # stage "groups": each group's places from one subset; None: from any
        self.cosface_group = cosface_group  # stage "groups": only this CosPlace group's images; None: all
        self.subset_leftovers = subset_leftovers or {}  # one_subset: {subset: samples no counted group holds}

    def __len__(self) -> int:
        return sum(self.quotas)

    def _place_samples(self, worker: int) -> Iterator:
        """This worker's place samples, re-read from the start if the batches run short.

        The step count is conservative, so a second pass should never start; it exists
        so that a wrong estimate costs repeated samples, not a DDP hang.
        """
        for passes in itertools.count():
            if passes:
                warnings.warn(f"rank {self.rank} worker {worker}: shards exhausted before the step quota; re-reading")
            seen = 0
            for sample in place_sample_pipeline(self.urls, self.rank, self.world_size, self.epoch, self.seed,
                                                self.shuffle_buffer):
                seen += 1
                yield sample
            if not seen:
                return

    def __iter__(self) -> Iterator[PairBatch | GroupBatch]:
        info = get_worker_info()
        worker = info.id if info else 0
        quota = self.quotas[worker]
        if quota == 0:
            return
        np_rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        py_rng = random.Random(int(np_rng.integers(2**63)))
        samples = self._place_samples(worker)
        g = self.geometry
        if self.stage == "pairs":
            if len(self.skip_keys):
                samples = skip_samples(samples, self.skip_keys)
            pairs = batched(stage1_pairs(samples, self.pairing, py_rng), g.pairs_per_batch)
            batches: Iterator = pair_batches(pairs, self.image_size, np_rng, self.augment)
        else:
            lookup = class_lookup(read_labels(self.labels_dir, self.label_version))
            if self.cosface_group is not None:  # MutualVPR: an epoch trains one CosPlace group's images
                samples = keep_images(samples, labels_group_image_ids(self.labels_dir, self.label_version,
                                                                      self.cosface_group))
            subset_of = None if self.subsets is None else self.subsets.sample_subset
            groups = place_groups(samples, g.places_per_batch, g.images_per_place, py_rng, subset_of)
            batches = group_batches(groups, lookup, self.image_size, np_rng, self.augment)
        delivered, kinds = 0, []
        for batch in itertools.islice(batches, quota):
            delivered += 1
            if self.stage == "pairs":
                kinds += batch.pair_kinds.tolist()  # a copy: the tensor's memory moves to shared memory once yielded
            yield batch
        if delivered < quota:
            raise RuntimeError(f"rank {self.rank} worker {worker}: {delivered} of {quota} batches; its shards are empty")
        if kinds:  # one line per worker and epoch: how its pairs were chosen (fallbacks are counted, not silent)
            log.info("epoch %d rank %d worker %d: stage-1 pairs by kind %s", self.epoch, self.rank, worker,
                     kind_counts(kinds))


def make_loader(
    shard_dir: str | Path,
    stage: str,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    geometry: BatchGeometry,
    image_size: int,
    epoch: int,
    seed: int,
    labels_dir: str | Path | None = None,
    label_version: int | None = None,
    shuffle_buffer: int = 256,
    prefetch_factor: int = 4,
    pin_memory: bool = False,
    augment: AugmentConfig = AugmentConfig(),
    pairing: PairRule = PairRule(),
    batch_places_from: str = "any",
    cosface_group: int | None = None,
) -> tuple[DataLoader, int]:
    """A DataLoader yielding exactly `steps` batches on this rank, and `steps` (equal on every rank).

    Args:
        stage: "pairs" -> PairBatch of B = geometry.pairs_per_batch;
            "groups" -> GroupBatch of P x K (needs `labels_dir`; `label_version` None = latest).
        num_workers: loader processes per rank (0 = main process); the shard set needs
            >= world_size x num_workers shards.
        shuffle_buffer: place samples (JPEG bytes) held per worker for shuffling.
        prefetch_factor: batches each worker prepares ahead (ignored when num_workers == 0).
        pairing: stage "pairs": which two images of a place make a pair (trainer.pairs); with
            `one_per_place`, a place split over several samples gives one pair an epoch, not one
            per sample (`pair_samples`), and the step count follows.
        batch_places_from: stage "groups": "any" (places from the whole shard set) or
            "one_subset": every group's places from one subset (`place_subsets`; a GSV-Cities
            city).  Each worker fills one pending group per subset and yields whichever fills;
            the steps count full one-subset groups only, and the samples they leave out are
            counted (`loader.dataset.subset_leftovers`) and logged per epoch.
        cosface_group: stage "groups": only the images of this CosPlace group of the label version
            (trainer.cosface_groups; MutualVPR trains one group an epoch); the steps count the samples
            left with >= K of its images.  None: every image.
    Returns:
        (loader, steps); `loader.dataset.label_version` is the label version used (None for pairs).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    if batch_places_from not in BATCH_PLACES_FROM:
        raise ValueError(f"batch_places_from must be one of {list(BATCH_PLACES_FROM)}, got {batch_places_from!r}")
    if batch_places_from != "any" and stage != "groups":
        raise ValueError(f"batch_places_from {batch_places_from} needs stage 'groups' (P x K place groups)")
    shards = ShardSet.open(shard_dir)
    num_shards = len(shards.urls)
    check_enough_shards(num_shards, world_size, num_workers)
    counts, max_parts = usable_samples_of(str(Path(shard_dir).resolve()), num_shards, geometry.min_images(stage))
    if cosface_group is not None:  # count what keep_images leaves: one CosPlace group's images
        if stage != "groups" or batch_places_from != "any" or labels_dir is None:
            raise ValueError("cosface_group needs stage 'groups', batch_places_from 'any' and labels_dir")
        label_version = resolve_label_version(labels_dir, label_version)  # the version the workers read too
        counts, max_parts = group_usable_samples_of(str(Path(shard_dir).resolve()), num_shards,
                                                     geometry.min_images(stage), str(labels_dir), label_version,
                                                     cosface_group)
    skip_keys = None
    if stage == "pairs" and pairing.one_per_place:
        counts, skip_keys = pair_samples(pair_samples_of(str(Path(shard_dir).resolve())), num_shards, epoch, seed)
    items = geometry.items_per_step(stage)
    reserve = group_reserve(geometry.places_per_batch, max_parts) if stage == "groups" else 0
    subsets, split, leftovers = None, None, {}
    if batch_places_from == "one_subset":  # counts per shard and subset; each subset fills groups on its own
        where, min_images = str(Path(shard_dir).resolve()), geometry.min_images(stage)
        subsets = place_subsets_of(where)
        counts, split = subset_samples_of(where, num_shards, min_images)
        reserve = waiting_reserve(geometry.places_per_batch, max_parts)
        leftovers = dict(logged_subset_leftovers(where, num_shards, min_images, rank, world_size, num_workers,
                                                  geometry.places_per_batch, epoch, seed, reserve))
    steps = steps_per_epoch(list(counts), world_size, num_workers, items, epoch, seed, reserve, split)
    capacities = rank_worker_capacities(list(counts), rank, world_size, num_workers, items, epoch, seed, reserve,
                                        split)
    version = None
    if stage == "groups":
        if labels_dir is None:
            raise ValueError("stage 'groups' needs labels_dir (a clustering.labels root)")
        version = resolve_label_version(labels_dir, label_version)
    dataset = PlaceBatchStream(
        shards.urls, stage, rank, world_size, epoch, seed, geometry, image_size,
        quotas=worker_quotas(capacities, steps), shuffle_buffer=shuffle_buffer, augment=augment,
        labels_dir=None if labels_dir is None else str(labels_dir), label_version=version,
        pairing=pairing, skip_keys=skip_keys, subsets=subsets, subset_leftovers=leftovers,
        cosface_group=cosface_group,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        persistent_workers=False,  # a new loader per epoch
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
    return loader, steps
