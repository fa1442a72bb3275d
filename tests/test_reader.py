"""Shard-to-reader arithmetic (simulated, no processes) and the reader's generator stages."""

import json
import random
from collections import Counter

import pytest

from placeforge.shards.reader import (
    PlaceSample,
    ReaderSlot,
    check_enough_shards,
    place_groups,
    same_place_pairs,
    shards_for_slot,
    to_place_samples,
)


def all_slots(nodes, ranks_per_node, workers):
    world = nodes * ranks_per_node
    return [ReaderSlot(r, world, w, workers) for r in range(world) for w in range(workers)]


@pytest.mark.parametrize("num_shards", [1408, 1500, 2000])
def test_every_shard_read_exactly_once_on_22_nodes_x_8_ranks_x_8_workers(num_shards):
    slots = all_slots(22, 8, 8)
    seen = Counter()
    loads = []
    for slot in slots:
        mine = shards_for_slot(num_shards, slot, epoch=3, seed=11)
        seen.update(mine)
        loads.append(len(mine))
    assert sorted(seen) == list(range(num_shards)) and set(seen.values()) == {1}
    assert max(loads) - min(loads) <= 1


def test_epochs_reshuffle_but_each_epoch_is_reproducible():
    slot = ReaderSlot(1, 4, 0, 2)
    assert shards_for_slot(100, slot, 0, 0) == shards_for_slot(100, slot, 0, 0)
    assert shards_for_slot(100, slot, 0, 0) != shards_for_slot(100, slot, 1, 0)


def test_too_few_shards_is_reported_with_a_fix():
    with pytest.raises(ValueError, match="--min-shards 16"):
        check_enough_shards(10, world_size=4, num_workers=4)
    check_enough_shards(16, world_size=4, num_workers=4)


def sample(place, n, key=None):
    return PlaceSample(
        key=key or f"s{place:09d}",
        place_id=place,
        place_key=f"p{place}",
        image_ids=tuple(place * 100 + i for i in range(n)),
        jpegs=tuple(bytes([place % 256, i]) for i in range(n)),
        meta=tuple({} for _ in range(n)),
    )


def test_to_place_samples_orders_members_and_reads_ids():
    raw = {
        "__key__": "s000000001",
        "json": json.dumps(
            {"place_id": 9, "place_key": "k", "images": [{"member": "001.jpg", "image_id": 22}, {"member": "000.jpg", "image_id": 11}]}
        ).encode(),
        "001.jpg": b"b",
        "000.jpg": b"a",
    }
    (out,) = list(to_place_samples([raw]))
    assert out.image_ids == (11, 22) and out.jpegs == (b"a", b"b") and out.place_id == 9


def test_same_place_pairs_are_distinct_images_of_one_place():
    pairs = list(same_place_pairs([sample(1, 5), sample(2, 1), sample(3, 2)], random.Random(0)))
    assert [p.place_id for p in pairs] == [1, 3]  # the one-image sample cannot make a pair
    for p in pairs:
        assert p.image_ids[0] != p.image_ids[1]
        assert all(i // 100 == p.place_id for i in p.image_ids)


def test_place_groups_are_p_distinct_places_by_k_distinct_images():
    src = [sample(1, 6), sample(2, 3), sample(3, 4), sample(1, 5, key="s1b"), sample(4, 8), sample(5, 4)]
    groups = list(place_groups(src, places_per_group=2, images_per_place=4, rng=random.Random(0)))
    assert len(groups) == 2
    for g in groups:
        assert len(set(g.place_ids)) == 2
        for place, ids in zip(g.place_ids, g.image_ids):
            assert len(ids) == 4 and len(set(ids)) == 4 and all(i // 100 == place for i in ids)
    used = [p for g in groups for p in g.place_ids]
    assert 2 not in used  # 3 images < K
    assert used.count(1) == 2  # the second part of place 1 waited for the next group
