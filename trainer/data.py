"""Training loaders: place samples from the shards -> decoded, augmented batches, equal steps on every rank.

    loader, steps = make_loader(shard_dir, "pairs", rank=r, world_size=w, num_workers=8,
                                geometry=BatchGeometry(pairs_per_batch=64), image_size=224, epoch=e, seed=0)
    for img_a, img_b, place_ids, pair_kinds in loader: ...  # exactly `steps` batches, on every rank
    # pairing=PairRule(max_heading_diff_deg=50, panorama_views=True), one_pair_per_place=True: Pair-VPR's pairs

    loader, steps = make_loader(shard_dir, "groups", ..., labels_dir=labels, label_version=None)
    for images, place_ids, image_ids, class_ids, positions in loader: ...
    loader.dataset.label_version                          # the label version these class ids came from
    check_label_set(shard_dir, labels, version)           # rank 0, once per version: sha256, same shard set

Stages (one generator each, testable on lists), run inside each DataLoader worker:

    shards.reader.place_sample_pipeline (this rank/worker's shards, shuffle of JPEG bytes)
      -> [one sample per place (pairs, one_pair_per_place)]
      -> [one CosPlace group's images only (cosface_group; trainer.cosface_groups.keep_images)]
      -> trainer.pairs.stage1_pairs | place_groups(P, K) [each group's places from one subset: one_subset]
      -> batched (pairs only) -> decode + augment (trainer.augment) -> PairBatch | GroupBatch
      -> first `quota` batches, where the quotas of a rank's workers sum to `steps` (trainer.data_plan)

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

import functools
import itertools
import logging
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

from placeforge.catalog import read_catalog
from placeforge.clustering.labels import (
    LABELS_FILE,
    class_lookup,
    classes_of,
    latest_version,
    read_labels,
    read_manifest,
    version_dir,
)
from placeforge.clustering.labels import MANIFEST_FILE as LABEL_MANIFEST_FILE
from placeforge.shards.index import read_index
from placeforge.shards.layout import CATALOG_FILE, INDEX_FILE
from placeforge.shards.layout import MANIFEST_FILE as SHARD_MANIFEST_FILE
from placeforge.shards.reader import (
    PlaceGroup,
    PlaceSample,
    ShardSet,
    check_enough_shards,
    place_groups,
    place_sample_pipeline,
)
from placeforge.trainer.augment import AugmentConfig, decode_augment
from placeforge.trainer.cosface_groups import index_of_images, keep_images, labels_group_image_ids
from placeforge.trainer.data_plan import (
    group_reserve,
    one_sample_per_place,
    rank_worker_capacities,
    steps_per_epoch,
    waiting_reserve,
    worker_quotas,
)
from placeforge.trainer.pairs import PairRule, Stage1Pair, kind_counts, stage1_pairs, view_image
from placeforge.trainer.subsets import PlaceSubsets, log_subset_leftovers, place_subsets, subset_samples

STAGES = ("pairs", "groups")
BATCH_PLACES_FROM = ("any", "one_subset")  # stage "groups": a group's places from anywhere, or from one subset
log = logging.getLogger(__name__)


class PairBatch(NamedTuple):
    img_a: torch.Tensor  # [B, 3, S, S] uint8 (trainer.augment.model_input normalises)
    img_b: torch.Tensor  # [B, 3, S, S] uint8, same place as img_a row for row
    place_ids: torch.Tensor  # [B] int64
    pair_kinds: torch.Tensor | None = None  # [B] int8 trainer.pairs.PairKind: how each pair was chosen


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
    src: Iterable[list[Stage1Pair]], image_size: int, rng: np.random.Generator, augment: AugmentConfig
) -> Iterator[PairBatch]:
    """Lists of B pairs -> PairBatch; a panorama member is first cut to its view (trainer.pairs)."""
    for pairs in src:
        yield PairBatch(
            img_a=decode_augment([view_image(p.jpegs[0], p.views[0]) for p in pairs], image_size, rng, augment),
            img_b=decode_augment([view_image(p.jpegs[1], p.views[1]) for p in pairs], image_size, rng, augment),
            place_ids=torch.tensor([p.place_id for p in pairs], dtype=torch.int64),
            pair_kinds=torch.tensor([int(p.kind) for p in pairs], dtype=torch.int8),
        )


def skip_samples(src: Iterable[PlaceSample], skip_keys: np.ndarray) -> Iterator[PlaceSample]:
    """The samples whose key is not in `skip_keys` (sorted bytes, `pair_samples`)."""
    for sample in src:
        key = np.bytes_(sample.key.encode("utf-8", "replace"))
        at = int(np.searchsorted(skip_keys, key))
        if at < len(skip_keys) and skip_keys[at] == key:
            continue
        yield sample


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
def _pair_samples_of(shard_dir: str) -> pa.Table:
    """`pair_sample_table` of a shard set on disk, read once per process (shard sets are immutable)."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    return pair_sample_table(read_index(Path(shard_dir) / INDEX_FILE).select(columns))


@functools.lru_cache(maxsize=8)
def _usable_samples_of(shard_dir: str, num_shards: int, min_images: int) -> tuple[tuple[int, ...], int]:
    """`usable_samples` of a shard set on disk; read once per process (shard sets are immutable)."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    counts, max_parts = usable_samples(read_index(Path(shard_dir) / INDEX_FILE).select(columns), num_shards, min_images)
    return tuple(counts), max_parts


@functools.lru_cache(maxsize=8)
def _group_usable_samples_of(shard_dir: str, num_shards: int, min_images: int, labels_dir: str, version: int,
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
def _place_subsets_of(shard_dir: str) -> PlaceSubsets:
    """`place_subsets` of a shard set's catalog, read once per process (shard sets are immutable)."""
    path = Path(shard_dir) / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: batch_places_from one_subset reads each place's subset from the shard "
                                "set's catalog, and there is none; rebuild the shards, or use batch_places_from any")
    return place_subsets(read_catalog(path).select(["place_id", "dataset", "subset"]))


@functools.lru_cache(maxsize=8)
def _subset_samples_of(shard_dir: str, num_shards: int, min_images: int) -> tuple[np.ndarray, np.ndarray]:
    """`subset_samples` of a shard set on disk, read once per process."""
    columns = ["image_id", "place_id", "shard_index", "sample_key"]
    usable = _usable_sample_rows(read_index(Path(shard_dir) / INDEX_FILE).select(columns), min_images)
    return subset_samples(usable, num_shards, _place_subsets_of(shard_dir))


@functools.lru_cache(maxsize=4096)
def _logged_subset_leftovers(shard_dir: str, num_shards: int, min_images: int, rank: int, world_size: int,
                             num_workers: int, places_per_group: int, epoch: int, seed: int,
                             reserve: int) -> tuple[tuple[str, int], ...]:
    """`log_subset_leftovers` once per process and epoch: trainer.train plans every epoch's steps
    with a loader, then builds the epoch's loader again."""
    counts, split = _subset_samples_of(shard_dir, num_shards, min_images)
    return tuple(log_subset_leftovers(counts, split, _place_subsets_of(shard_dir).names, rank, world_size,
                                      num_workers, places_per_group, epoch, seed, reserve).items())


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
    one_pair_per_place: bool = False,
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
        pairing: stage "pairs": which two images of a place make a pair (trainer.pairs).
        one_pair_per_place: stage "pairs": a place split over several samples gives one pair
            an epoch, not one per sample (`pair_samples`); the step count follows.
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
    counts, max_parts = _usable_samples_of(str(Path(shard_dir).resolve()), num_shards, geometry.min_images(stage))
    if cosface_group is not None:  # count what keep_images leaves: one CosPlace group's images
        if stage != "groups" or batch_places_from != "any" or labels_dir is None:
            raise ValueError("cosface_group needs stage 'groups', batch_places_from 'any' and labels_dir")
        label_version = resolve_label_version(labels_dir, label_version)  # the version the workers read too
        counts, max_parts = _group_usable_samples_of(str(Path(shard_dir).resolve()), num_shards,
                                                     geometry.min_images(stage), str(labels_dir), label_version,
                                                     cosface_group)
    skip_keys = None
    if stage == "pairs" and one_pair_per_place:
        counts, skip_keys = pair_samples(_pair_samples_of(str(Path(shard_dir).resolve())), num_shards, epoch, seed)
    items = geometry.items_per_step(stage)
    reserve = group_reserve(geometry.places_per_batch, max_parts) if stage == "groups" else 0
    subsets, split, leftovers = None, None, {}
    if batch_places_from == "one_subset":  # counts per shard and subset; each subset fills groups on its own
        where, min_images = str(Path(shard_dir).resolve()), geometry.min_images(stage)
        subsets = _place_subsets_of(where)
        counts, split = _subset_samples_of(where, num_shards, min_images)
        reserve = waiting_reserve(geometry.places_per_batch, max_parts)
        leftovers = dict(_logged_subset_leftovers(where, num_shards, min_images, rank, world_size, num_workers,
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
