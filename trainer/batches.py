"""Batch assembly: place samples and pairs -> decoded, augmented PairBatch | GroupBatch.

    pairs = batched(stage1_pairs(skip_samples(samples, skip_keys), rule, py_rng), B)
    for img_a, img_b, place_ids, pair_kinds in pair_batches(pairs, 224, np_rng, AugmentConfig()): ...
    for images, place_ids, image_ids, class_ids, positions in group_batches(groups, lookup, 224, np_rng, aug): ...

Each stage is one generator, testable on plain lists; trainer.data.PlaceBatchStream chains
them inside every loader worker.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from placeforge.clustering.labels import classes_of
from placeforge.shards.reader import PlaceGroup, PlaceSample
from placeforge.trainer.augment import AugmentConfig, decode_augment
from placeforge.trainer.pairs import Stage1Pair, view_image


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
