"""Training loaders: place samples from the shards -> decoded, augmented batches, equal steps on every rank.

    loader, steps = make_loader(shard_dir, "pairs", rank=r, world_size=w, num_workers=8,
                                geometry=BatchGeometry(pairs_per_batch=64), image_size=224, epoch=e, seed=0)
    for img_a, img_b, place_ids in loader: ...            # exactly `steps` batches, on every rank

    loader, steps = make_loader(shard_dir, "groups", ..., labels_dir=labels, label_version=None)
    for images, place_ids, image_ids, class_ids, positions in loader: ...
    loader.dataset.label_version                          # the label version these class ids came from
    check_label_set(shard_dir, labels, version)           # rank 0, once per version: sha256, same shard set

Stages (one generator each, testable on lists), run inside each DataLoader worker:

    shards.reader.place_sample_pipeline (this rank/worker's shards, shuffle of JPEG bytes)
      -> same_place_pairs | place_groups(P, K)
      -> batched (pairs only) -> decode + augment (trainer.augment) -> PairBatch | GroupBatch
      -> first `quota` batches, where the quotas of a rank's workers sum to `steps` (trainer.data_plan)

Build a new loader every epoch (`persistent_workers=False`): the epoch picks the shard
order, the steps, and the label version.  To switch labels between epochs pass the new
`label_version` (or None for the latest) to the next epoch's `make_loader`.  In DDP,
resolve the version once (rank 0) and broadcast it, or every rank may pick a different
"latest" while clustering writes a new one.
"""

from __future__ import annotations

import functools
import itertools
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clustering.labels import (
    LABELS_FILE,
    class_lookup,
    classes_of,
    latest_version,
    read_labels,
    read_manifest,
    version_dir,
)
from clustering.labels import MANIFEST_FILE as LABEL_MANIFEST_FILE
from shards.index import read_index
from shards.layout import INDEX_FILE
from shards.layout import MANIFEST_FILE as SHARD_MANIFEST_FILE
from shards.reader import (
    PlaceGroup,
    SamePlacePair,
    ShardSet,
    check_enough_shards,
    place_groups,
    place_sample_pipeline,
    same_place_pairs,
)
from trainer.augment import AugmentConfig, decode_augment
from trainer.data_plan import group_reserve, rank_worker_capacities, steps_per_epoch, worker_quotas

STAGES = ("pairs", "groups")


class PairBatch(NamedTuple):
    img_a: torch.Tensor  # [B, 3, S, S] uint8 (trainer.augment.model_input normalises)
    img_b: torch.Tensor  # [B, 3, S, S] uint8, same place as img_a row for row
    place_ids: torch.Tensor  # [B] int64


class GroupBatch(NamedTuple):
    images: torch.Tensor  # [P*K, 3, S, S] uint8, place-major: rows p*K .. p*K+K-1 are place p
    place_ids: torch.Tensor  # [P*K] int64
    image_ids: torch.Tensor  # [P*K] int64
    class_ids: torch.Tensor  # [P*K] int64, -1 for images the label version does not cover
    positions: torch.Tensor | None = None  # [P*K, 3] float64 (UTM zone, east, north), NaN where unknown


@dataclass(frozen=True)
class BatchGeometry:
    pairs_per_batch: int = 32  # stage "pairs": B
    places_per_batch: int = 16  # stage "groups": P
    images_per_place: int = 4  # stage "groups": K

    def items_per_step(self, stage: str) -> int:
        """Place samples one batch consumes."""
        return self.pairs_per_batch if stage == "pairs" else self.places_per_batch

    def min_images(self, stage: str) -> int:
        """Images a place sample needs to be usable by `stage`."""
        return 2 if stage == "pairs" else self.images_per_place


# ---- generator stages (plain lists in, plain values out) ----


def batched(src: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items; a partial last list is dropped (every batch is full)."""
    batch = []
    for item in src:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []


def pair_batches(
    src: Iterable[list[SamePlacePair]], image_size: int, rng: np.random.Generator, augment: AugmentConfig
) -> Iterator[PairBatch]:
    for pairs in src:
        yield PairBatch(
            img_a=decode_augment([p.jpegs[0] for p in pairs], image_size, rng, augment),
            img_b=decode_augment([p.jpegs[1] for p in pairs], image_size, rng, augment),
            place_ids=torch.tensor([p.place_id for p in pairs], dtype=torch.int64),
        )


def group_batches(
    src: Iterable[PlaceGroup],
    lookup: tuple[np.ndarray, np.ndarray],
    image_size: int,
    rng: np.random.Generator,
    augment: AugmentConfig,
) -> Iterator[GroupBatch]:
    """PlaceGroup -> GroupBatch; `lookup` is `clustering.labels.class_lookup` of one label version."""
    for group in src:
        k = len(group.image_ids[0])
        image_ids = np.array([i for ids in group.image_ids for i in ids], dtype=np.int64)  # [P*K]
        yield GroupBatch(
            images=decode_augment([j for jpegs in group.jpegs for j in jpegs], image_size, rng, augment),
            place_ids=torch.tensor(group.place_ids, dtype=torch.int64).repeat_interleave(k),
            image_ids=torch.from_numpy(image_ids),
            class_ids=torch.from_numpy(classes_of(*lookup, image_ids)),
            positions=torch.tensor([xyz for row in group.positions for xyz in row], dtype=torch.float64
                                   ).reshape(len(image_ids), 3),
        )


# ---- what the shard set holds, per shard ----


def usable_samples(index: pa.Table, num_shards: int, min_images: int) -> tuple[list[int], int]:
    """Per-shard count of samples with >= `min_images` images, and the most such samples of one place.

    Args:
        index: `shards.index` rows (image_id, place_id, shard_index, sample_key, ...).
    Returns:
        ([num_shards] usable samples per shard, max usable samples sharing one place_id).
    """
    per_sample = index.group_by(["shard_index", "sample_key", "place_id"]).aggregate([("image_id", "count")])
    usable = per_sample.filter(pc.greater_equal(per_sample.column("image_id_count"), min_images))
    shard = usable.column("shard_index").to_numpy().astype(np.int64)
    counts = np.bincount(shard, minlength=num_shards)
    _, per_place = np.unique(usable.column("place_id").to_numpy(), return_counts=True)
    return counts.tolist(), int(per_place.max()) if len(per_place) else 0


@functools.lru_cache(maxsize=8)
def _usable_samples_of(shard_dir: str, num_shards: int, min_images: int) -> tuple[tuple[int, ...], int]:
    """`usable_samples` of a shard set on disk; read once per process (shard sets are immutable)."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    counts, max_parts = usable_samples(read_index(Path(shard_dir) / INDEX_FILE).select(columns), num_shards, min_images)
    return tuple(counts), max_parts


def resolve_label_version(labels_dir: str | Path, label_version: int | None = None) -> int:
    """`label_version`, or the latest complete version under `labels_dir` when None."""
    if label_version is not None:
        return int(label_version)
    version = latest_version(labels_dir)
    if version is None:
        raise FileNotFoundError(f"{labels_dir}: no complete label version to train stage 'groups' with")
    return version


def check_label_set(shard_dir: str | Path, labels_dir: str | Path, label_version: int) -> None:
    """Refuse a label version that is damaged or was made for another shard set.

    Checked: labels.parquet's sha256 against the version's manifest; the shard-set fingerprint
    the manifest records against SHARDS/manifest.json (where both have one: label sets written
    by hand record none); and that the version labels at least one image of the shards, as
    otherwise every class id is -1.  Images it does not label are only warned about.  Rank 0
    calls this once per version before training on it: it reads labels.parquet twice and the
    shard index once (seconds at 10 M images), so the loader workers skip the sha256.
    Raises:
        ValueError: one line naming the files.
    """
    table = read_labels(labels_dir, label_version, verify=True)
    manifest = read_manifest(labels_dir, label_version)
    label_manifest = version_dir(labels_dir, label_version) / LABEL_MANIFEST_FILE
    shard_manifest = Path(shard_dir) / SHARD_MANIFEST_FILE
    made_for, trained_on = manifest.shards_fingerprint, ShardSet.open(shard_dir).manifest.fingerprint
    if made_for and trained_on and made_for != trained_on:
        raise ValueError(f"{label_manifest} labels the shard set {manifest.params.get('shards', '?')} (fingerprint "
                         f"{made_for[:12]}), not {shard_manifest} (fingerprint {trained_on[:12]}); train on the shards "
                         f"it was made for, or write labels for these (pipelines/recluster.py --shards {shard_dir})")
    index = Path(shard_dir) / INDEX_FILE
    image_ids = np.sort(read_index(index).column("image_id").to_numpy())  # sorted: the lookups stay in cache
    labelled = int(np.count_nonzero(classes_of(*class_lookup(table), image_ids) >= 0))
    if labelled == 0:
        raise ValueError(f"{label_manifest.parent / LABELS_FILE} labels none of the {len(image_ids)} images in "
                         f"{index}; it was made for another shard set")
    if labelled < len(image_ids):
        warnings.warn(f"label version {label_version} ({label_manifest.parent}) has no view class for "
                      f"{len(image_ids) - labelled} of the {len(image_ids)} images in {index}; they train with "
                      "class id -1 (no CosFace term; positives by place)")


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
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        if stage == "groups" and (labels_dir is None or label_version is None):
            raise ValueError("stage 'groups' needs labels_dir and a resolved label_version")
        self.urls, self.stage, self.rank, self.world_size = urls, stage, rank, world_size
        self.epoch, self.seed, self.geometry, self.image_size = epoch, seed, geometry, image_size
        self.quotas, self.shuffle_buffer, self.augment = quotas, shuffle_buffer, augment
        self.labels_dir, self.label_version = labels_dir, label_version

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
            pairs = batched(same_place_pairs(samples, py_rng), g.pairs_per_batch)
            batches: Iterator = pair_batches(pairs, self.image_size, np_rng, self.augment)
        else:
            lookup = class_lookup(read_labels(self.labels_dir, self.label_version))
            groups = place_groups(samples, g.places_per_batch, g.images_per_place, py_rng)
            batches = group_batches(groups, lookup, self.image_size, np_rng, self.augment)
        delivered = 0
        for batch in itertools.islice(batches, quota):
            delivered += 1
            yield batch
        if delivered < quota:
            raise RuntimeError(f"rank {self.rank} worker {worker}: {delivered} of {quota} batches; its shards are empty")


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
) -> tuple[DataLoader, int]:
    """A DataLoader yielding exactly `steps` batches on this rank, and `steps` (equal on every rank).

    Args:
        stage: "pairs" -> PairBatch of B = geometry.pairs_per_batch;
            "groups" -> GroupBatch of P x K (needs `labels_dir`; `label_version` None = latest).
        num_workers: loader processes per rank (0 = main process); the shard set needs
            >= world_size x num_workers shards.
        shuffle_buffer: place samples (JPEG bytes) held per worker for shuffling.
        prefetch_factor: batches each worker prepares ahead (ignored when num_workers == 0).
    Returns:
        (loader, steps); `loader.dataset.label_version` is the label version used (None for pairs).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    shards = ShardSet.open(shard_dir)
    num_shards = len(shards.urls)
    check_enough_shards(num_shards, world_size, num_workers)
    counts, max_parts = _usable_samples_of(str(Path(shard_dir).resolve()), num_shards, geometry.min_images(stage))
    items = geometry.items_per_step(stage)
    reserve = group_reserve(geometry.places_per_batch, max_parts) if stage == "groups" else 0
    steps = steps_per_epoch(list(counts), world_size, num_workers, items, epoch, seed, reserve)
    capacities = rank_worker_capacities(list(counts), rank, world_size, num_workers, items, epoch, seed, reserve)
    version = None
    if stage == "groups":
        if labels_dir is None:
            raise ValueError("stage 'groups' needs labels_dir (a clustering.labels root)")
        version = resolve_label_version(labels_dir, label_version)
    dataset = PlaceBatchStream(
        shards.urls, stage, rank, world_size, epoch, seed, geometry, image_size,
        quotas=worker_quotas(capacities, steps), shuffle_buffer=shuffle_buffer, augment=augment,
        labels_dir=None if labels_dir is None else str(labels_dir), label_version=version,
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
