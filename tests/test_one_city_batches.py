"""Stage-2 groups whose places all come from one subset (`batch_places_from: one_subset`).

Pure parts on lists and integers (the per-subset group former, the per-subset step arithmetic,
each place's subset from catalog rows), then the real loader on a shard set written with the
real shard writer, with a catalog of three cities of different sizes beside it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from placeforge.catalog import catalog_table
from placeforge.shards.layout import CATALOG_FILE
from placeforge.shards.reader import PlaceSample, ReaderSlot, place_groups, shards_for_slot
from placeforge.trainer.data import BatchGeometry, make_loader
from placeforge.trainer.data_plan import (
    rank_worker_capacities,
    slot_batches,
    steps_per_epoch,
    subset_leftovers,
    waiting_reserve,
    worker_capacity,
)
from placeforge.trainer.subsets import place_subsets
from placeforge.trainer.train_config import TrainConfig
from tests.test_data import ID_STRIDE, all_image_ids, write_labels, write_shard_set

# ---- the group former ----


def sample(place, key, n=4):
    return PlaceSample(key, place, f"p{place}", tuple(range(n)), tuple(b"x" for _ in range(n)), tuple({} for _ in range(n)))


def city_of(place: int) -> int:
    return place % 3


@pytest.mark.parametrize("trial", range(40))
def test_every_group_is_one_subset_and_each_subset_forms_its_certain_groups(trial):
    rng = random.Random(trial)
    p = rng.randint(2, 5)
    parts = {place: rng.choice([1, 1, 1, 2, 3]) for place in range(rng.randint(p, 8 * p))}
    stream = [sample(place, f"{place}-{i}") for place, n in parts.items() for i in range(n)]
    rng.shuffle(stream)
    if trial % 4 == 0:  # adversarial: all parts of each place in a row
        stream.sort(key=lambda s: s.place_id)
    groups = list(place_groups(stream, p, 4, random.Random(0), subset_of=lambda s: city_of(s.place_id)))
    for group in groups:
        assert len({city_of(place) for place in group.place_ids}) == 1
        assert len(set(group.place_ids)) == p
    per_city = Counter(city_of(s.place_id) for s in stream)
    split = Counter(city_of(s.place_id) for s in stream if parts[s.place_id] > 1)  # only these can wait
    formed = Counter(city_of(g.place_ids[0]) for g in groups)
    for city, n in per_city.items():
        reserve = min(waiting_reserve(p, max(parts.values())), split[city])  # trainer.data_plan.slot_batches
        assert formed[city] >= max(0, n - reserve) // p  # what the step count relies on, per subset


def test_one_subset_for_every_sample_forms_the_groups_of_no_subsets():
    rng = random.Random(3)
    stream = [sample(place, f"{place}-{i}") for place in range(40) for i in range(1 + place % 3)]
    rng.shuffle(stream)

    def run(subset_of):
        groups = place_groups(stream, 4, 3, random.Random(7), subset_of=subset_of)
        return [(g.place_ids, g.image_ids) for g in groups]

    assert run(None) == run(lambda s: "everything")  # the same groups and the same random draws


# ---- step arithmetic per subset ----


def test_subset_steps_on_22_nodes_x_8_ranks_x_8_workers_count_full_groups_of_each_subset():
    world_size, num_workers, p, reserve = 22 * 8, 8, 16, 31
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 40, (1500, 5))  # [shards, subsets]
    total = world_size * num_workers
    per_slot = np.zeros((total, 5), dtype=np.int64)  # deal the epoch's order to slots, then add up
    for slot in range(total):
        s = ReaderSlot(slot // num_workers, world_size, slot % num_workers, num_workers)
        per_slot[slot] = counts[shards_for_slot(1500, s, 3, 9)].sum(axis=0)
    groups = np.maximum(0, per_slot - reserve) // p  # [slots, subsets]
    per_rank = groups.sum(axis=1).reshape(world_size, num_workers).sum(axis=1)
    assert steps_per_epoch(counts, world_size, num_workers, p, 3, 9, reserve) == per_rank.min()
    for rank in (0, 100):
        capacities = rank_worker_capacities(counts, rank, world_size, num_workers, p, 3, 9, reserve)
        assert sum(capacities) == per_rank[rank]
        read, left = subset_leftovers(counts, rank, world_size, num_workers, p, 3, 9, reserve)
        mine = per_slot[rank * num_workers:(rank + 1) * num_workers]
        assert (read == mine.sum(axis=0)).all()
        assert (left == read - p * groups[rank * num_workers:(rank + 1) * num_workers].sum(axis=0)).all()
    mixed = steps_per_epoch(counts.sum(axis=1), world_size, num_workers, p, 3, 9, reserve)
    assert steps_per_epoch(counts, world_size, num_workers, p, 3, 9, reserve) < mixed  # per-subset rounding costs


def test_a_workers_reserve_is_at_most_its_samples_of_split_places():
    counts = np.array([[7, 4], [5, 0]])  # [shards, subsets]
    split = np.array([[2, 0], [0, 0]])
    slot = ReaderSlot(0, 1, 0, 1)
    samples, batches = slot_batches(counts, slot, 3, 0, 0, reserve=5, split_sample_counts=split)
    assert samples.tolist() == [12, 4] and batches.tolist() == [3, 1]  # reserves 2 and 0, not 5
    assert slot_batches(counts, slot, 3, 0, 0, reserve=5)[1].tolist() == [2, 0]


def test_one_subset_column_counts_like_the_per_shard_counts():
    counts = np.random.default_rng(1).integers(0, 30, 64)
    for rank in range(4):
        assert (rank_worker_capacities(counts[:, None], rank, 4, 2, 5, 0, 0, 7)
                == rank_worker_capacities(counts.tolist(), rank, 4, 2, 5, 0, 0, 7))
    assert worker_capacity(10, 5, waiting_reserve(5, 1)) == 2  # one part per place: every full group counts


# ---- each place's subset ----


def test_a_place_takes_the_subset_most_of_its_images_are_in():
    table = pa.table({
        "place_id": pa.array([7, 7, 7, 3, 3, 9, 9, 5, None], pa.int64()),
        "dataset": ["sf", "sf", "sf", "sf", "sf", "gsv", "gsv", "other", "sf"],
        "subset": ["queries", "database", "database", "b", "a", "Rome", "Rome", None, "x"],
    })
    subsets = place_subsets(table)
    assert subsets.names == ("gsv/Rome", "other", "sf/a", "sf/b", "sf/database", "sf/queries")  # "sf/x": no place
    assert subsets.place_ids.tolist() == [3, 5, 7, 9]
    named = [subsets.names[c] for c in subsets.codes_of(np.array([7, 3, 9, 5]))]
    assert named == ["sf/database", "sf/a", "gsv/Rome", "other"]  # majority; a tie to the first name; null: dataset
    with pytest.raises(ValueError, match="not in the catalog"):
        subsets.codes_of(np.array([4]))


# ---- the real loader ----

CITIES = {"Lyon": 22, "Oslo": 10, "Rome": 2}  # places per city; Rome's 2 never fill a group of 3
P, K = 3, 4


@pytest.fixture
def three_cities(tmp_path):
    """8 shards with the cities' places dealt round-robin, place 0 split over two samples; labels; a catalog."""
    places, place = [], 0
    for city, n in CITIES.items():
        places += [(place + i, city) for i in range(n)]
        place += n
    layout = [[] for _ in range(8)]
    for i, (place, _) in enumerate(places):
        layout[i % 8].append((place, K + place % 3))
    layout[5].append((0, K))  # a second part of place 0
    root = write_shard_set(tmp_path / "set", layout)
    ids = all_image_ids(layout)
    city_of_place = dict(places)
    rows = {
        "image_id": ids, "source": ["gsv_cities"] * len(ids), "dataset": ["gsv_cities"] * len(ids),
        "path": [f"/x/{i}.jpg" for i in ids], "relpath": [f"{i}.jpg" for i in ids],
        "subset": [city_of_place[i // ID_STRIDE] for i in ids], "place_id": [i // ID_STRIDE for i in ids],
        "place_key": [f"p{i // ID_STRIDE}" for i in ids],
    }  # fmt: skip
    pq.write_table(catalog_table(rows), root / CATALOG_FILE)
    write_labels(tmp_path / "labels", ids, 0, lambda i: i % 5)
    return root, tmp_path / "labels", city_of_place


def groups_of(root, labels, rank, epoch, batch_places_from="one_subset", seed=2, world_size=2):
    loader, steps = make_loader(root, "groups", rank=rank, world_size=world_size, num_workers=2,
                                geometry=BatchGeometry(places_per_batch=P, images_per_place=K), image_size=16,
                                epoch=epoch, seed=seed, labels_dir=labels, label_version=0,
                                batch_places_from=batch_places_from)
    return loader, steps, list(loader)


def test_every_group_holds_one_city_and_both_ranks_take_the_same_steps(three_cities):
    root, labels, city_of_place = three_cities
    for epoch in (0, 1):
        steps_seen = []
        for rank in (0, 1):
            _, steps, batches = groups_of(root, labels, rank, epoch)
            assert len(batches) == steps > 0
            steps_seen.append(steps)
            for batch in batches:
                places = batch.place_ids.view(P, K)[:, 0].tolist()
                assert len(set(places)) == P  # no place twice, though place 0 has two samples
                assert len({city_of_place[p] for p in places}) == 1
                assert "Rome" not in {city_of_place[p] for p in places}
        assert steps_seen[0] == steps_seen[1]


def test_same_seed_same_batches(three_cities):
    root, labels, _ = three_cities

    def digest(seed):
        h = hashlib.sha256()
        for batch in groups_of(root, labels, 1, 0, seed=seed)[2]:
            for tensor in batch:
                h.update(tensor.numpy().tobytes())
        return h.hexdigest()

    assert digest(2) == digest(2)
    assert digest(2) != digest(3)


def test_places_no_group_can_hold_are_counted_and_logged(three_cities, caplog):
    root, labels, _ = three_cities
    caplog.set_level(logging.INFO, logger="placeforge.trainer.subsets")
    left = Counter()
    for rank in (0, 1):
        loader, steps, _ = groups_of(root, labels, rank, 0)
        left.update(loader.dataset.subset_leftovers)
    assert left["gsv_cities/Rome"] == CITIES["Rome"]  # every Rome sample, whichever rank reads it
    assert sum(left.values()) >= CITIES["Rome"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("never fill one: gsv_cities/Rome (2)" in line for line in lines)
    assert sum("one-subset groups leave out" in line for line in lines) == 2  # one line per rank and epoch


def test_any_mixes_cities(three_cities):
    root, labels, city_of_place = three_cities
    _, steps, batches = groups_of(root, labels, 0, 0, batch_places_from="any", world_size=1)
    assert len(batches) == steps > 0
    assert any(len({city_of_place[p] for p in b.place_ids.tolist()}) > 1 for b in batches)


def test_one_subset_needs_groups_a_catalog_and_stage_finetune(tmp_path):
    layout = [[(p, 4) for p in range(s * 3, s * 3 + 3)] for s in range(4)]
    root = write_shard_set(tmp_path / "nocat", layout)
    write_labels(tmp_path / "labels", all_image_ids(layout), 0, lambda i: 0)
    with pytest.raises(FileNotFoundError, match="batch_places_from any"):
        groups_of(root, tmp_path / "labels", 0, 0)
    with pytest.raises(ValueError, match="needs stage 'groups'"):
        make_loader(root, "pairs", rank=0, world_size=1, num_workers=0, geometry=BatchGeometry(), image_size=16,
                    epoch=0, seed=0, batch_places_from="one_subset")
    with pytest.raises(ValueError, match="one of"):
        make_loader(root, "groups", rank=0, world_size=1, num_workers=0, geometry=BatchGeometry(), image_size=16,
                    epoch=0, seed=0, labels_dir=tmp_path / "labels", batch_places_from="one_city")
    with pytest.raises(ValueError, match="needs stage finetune"):
        TrainConfig(stage="pretrain", batch_places_from="one_subset").validate()
    TrainConfig(stage="finetune", batch_places_from="one_subset").validate()


@pytest.mark.slow
def test_a_training_run_takes_its_batches_from_one_city(three_cities, tmp_path):
    from tests.test_train import TINY, steps_of, train

    root, labels, _ = three_cities
    out = tmp_path / "fine"
    done = train(["--stage", "finetune", "--shards", str(root), "--labels", str(labels), "--out", str(out),
                  "--batch.places-per-batch", str(P), "--batch.images-per-place", str(K), "--batch-places-from", "one_subset",
                  "--epochs", "1", "--max-steps-per-epoch", "2", *TINY])
    assert "one-subset groups leave out" in done.stderr  # trainer.train handed the option to the loader
    assert len(steps_of(out)) == 2


@pytest.mark.parametrize("recipe,expected", [("finetune_vitb", "one_subset"), ("finetune_vitl", "one_subset"),
                                             ("finetune_vitg", "one_subset"), ("demo_finetune", "any")])
def test_the_pair_vpr_recipes_take_a_batch_from_one_city(recipe, expected):
    from tests.test_recipes import load_recipe

    assert load_recipe(recipe).batch_places_from == expected
