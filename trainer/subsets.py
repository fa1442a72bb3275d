"""Which subset each place belongs to, for stage-2 groups whose places all come from one subset.

`batch_places_from: one_subset` (trainer.data.make_loader) takes every P x K group's places
from one subset of the catalog, as Pair-VPR's stage 2 takes a batch from one GSV-Cities city
(its loader reads city after city, pairvpr/training/train_stagetwo.py).  Shard samples do not
record a subset, so it comes from the shard set's catalog by place id (`place_subsets`); the
step arithmetic per subset is trainer.data_plan's, and what it leaves out is counted and
logged here (`log_subset_leftovers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from placeforge.shards.layout import CATALOG_FILE
from placeforge.shards.reader import PlaceSample
from placeforge.trainer.data_plan import subset_leftovers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlaceSubsets:
    """Which subset each place belongs to (`place_subsets`)."""

    place_ids: np.ndarray  # [N] int64, sorted
    codes: np.ndarray  # [N] int32: the subset of each place, an index into `names`
    names: tuple[str, ...]  # [C] "dataset/subset", sorted

    def codes_of(self, place_ids: np.ndarray) -> np.ndarray:
        """[M] subset code of each of [M] place ids.
        Raises:
            ValueError: a place the catalog does not hold (a catalog of another shard set).
        """
        place_ids = np.asarray(place_ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.place_ids, place_ids), max(0, len(self.place_ids) - 1))
        found = (self.place_ids[at] == place_ids) if len(self.place_ids) else np.zeros(len(place_ids), dtype=bool)
        if not found.all():
            raise ValueError(f"{int((~found).sum())} place(s) of the shards are not in the catalog, e.g. place_id "
                             f"{int(place_ids[~found][0])}; the shard set's {CATALOG_FILE} is not the one it was built "
                             "with")
        return self.codes[at]

    def sample_subset(self, sample: PlaceSample) -> int:
        """The subset code of a shard sample's place (`shards.reader.place_groups`'s `subset_of`)."""
        return int(self.codes_of(np.array([sample.place_id]))[0])


def place_subsets(catalog: pa.Table) -> PlaceSubsets:
    """The subset of every place: the catalog's (dataset, subset) that most of the place's images are in.

    `subset` is what the ingest puts there: a GSV-Cities city, an MSLS "<split>/<city>/<side>",
    GLDv2's "train_clean", an @-named set's folder relative to its root (null for images at
    the root).  It is named within its dataset ("gsv_cities/London"; the dataset alone where
    subset is null), as two datasets may name a folder alike.  A place with images in several
    subsets (a UTM cell over two folders) takes the one holding most of them, ties to the first name.
    Args:
        catalog: rows with at least place_id, dataset and subset (placeforge.catalog).
    """
    catalog = catalog.filter(pc.is_valid(catalog.column("place_id")))
    dataset, subset = catalog.column("dataset").combine_chunks(), catalog.column("subset").combine_chunks()
    name = pc.if_else(pc.is_null(subset), dataset, pc.binary_join_element_wise(dataset, subset, "/"))
    encoded = pc.dictionary_encode(name)
    dictionary = np.array(encoded.dictionary.to_pylist(), dtype=object)
    by_name = np.argsort(dictionary, kind="stable")
    code = np.argsort(by_name)[encoded.indices.to_numpy()]  # [R] codes in name order
    names = tuple(dictionary[by_name].tolist())
    if catalog.num_rows == 0:
        return PlaceSubsets(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), names)
    place = catalog.column("place_id").to_numpy()
    order = np.lexsort((code, place))
    place, code = place[order], code[order]
    start = np.flatnonzero(np.r_[True, (place[1:] != place[:-1]) | (code[1:] != code[:-1])])  # runs of (place, code)
    run_place, run_code, run_images = place[start], code[start], np.diff(np.r_[start, len(place)])
    best = np.lexsort((run_code, -run_images, run_place))  # per place: most images first, then first name
    first = best[np.r_[True, run_place[best][1:] != run_place[best][:-1]]]
    return PlaceSubsets(run_place[first].astype(np.int64), run_code[first].astype(np.int32), names)


def subset_samples(usable: pa.Table, num_shards: int, subsets: PlaceSubsets) -> tuple[np.ndarray, np.ndarray]:
    """Usable samples by shard and their place's subset, and those of split places.

    Args:
        usable: one row per usable sample (shard_index, place_id, ...; trainer.sample_counts' `_usable_sample_rows`).
    Returns:
        ([num_shards, num_subsets] usable samples, [num_shards, num_subsets] of them whose place
        has other usable samples: the only ones that can wait for a later group, `trainer.data_plan.slot_batches`).
    """
    shard = usable.column("shard_index").to_numpy().astype(np.int64)
    place = usable.column("place_id").to_numpy()
    code = subsets.codes_of(place)
    _, at, parts = np.unique(place, return_inverse=True, return_counts=True)
    counts = np.zeros((num_shards, len(subsets.names)), dtype=np.int64)
    split = np.zeros_like(counts)
    np.add.at(counts, (shard, code), 1)
    np.add.at(split, (shard, code), (parts[at] > 1).astype(np.int64))
    return counts, split


def log_subset_leftovers(counts: np.ndarray, split: np.ndarray, names: tuple[str, ...], rank: int, world_size: int,
                         num_workers: int, places_per_group: int, epoch: int, seed: int,
                         reserve: int) -> dict[str, int]:
    """Count and log the samples of `rank` that this epoch's one-subset groups leave out; {subset: samples}.

    One line per rank and epoch, and a warning naming any subset with fewer than P usable
    samples in the whole shard set, as it never fills a group.
    """
    read, left = subset_leftovers(counts, rank, world_size, num_workers, places_per_group, epoch, seed, reserve,
                                  split)
    worst = [i for i in np.argsort(-left, kind="stable")[:5] if left[i]]
    log.info("epoch %d rank %d: one-subset groups leave out %d of the %d usable place samples this rank reads "
             "(a subset's samples on a worker beyond its full groups of %d)%s", epoch, rank, int(left.sum()),
             int(read.sum()), places_per_group,
             ": " + ", ".join(f"{names[i]} {left[i]} of {read[i]}" for i in worst) if worst else "")
    total = np.asarray(counts).sum(axis=0)  # [C]
    small = [f"{names[i]} ({total[i]})" for i in np.flatnonzero((total > 0) & (total < places_per_group))]
    if small and rank == 0:
        log.warning("epoch %d: %d subset(s) have fewer usable place samples than the %d places of a group and "
                    "never fill one: %s", epoch, len(small), places_per_group, ", ".join(small))
    return {names[i]: int(left[i]) for i in np.flatnonzero(left)}
