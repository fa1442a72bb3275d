"""Training loaders: step arithmetic on simulated ranks (no processes), generator stages on
lists, and the real loader on tiny shard sets written with the real shard writer.

The shard sets are written with `shards.writer.write_shard` + `write_manifest` rather than a
Ray build: it takes milliseconds instead of seconds, and it lets a test choose exactly
which places go into which shard (deliberately uneven shards, solid-colour places).
"""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from placeforge.clustering.labels import label_table, write_label_set
from placeforge.shards.reader import PlaceSample, ReaderSlot, place_groups, shard_order, shards_for_slot
from placeforge.trainer.augment import random_resized_crop_box
from placeforge.trainer.batches import batched
from placeforge.trainer.data import BatchGeometry, make_loader
from placeforge.trainer.data_plan import group_reserve, rank_worker_capacities, steps_per_epoch, worker_quotas
from placeforge.trainer.sample_counts import usable_samples
from tests.shardsets import write_shard_set as write_shards

# ---- pure step arithmetic ----


def brute_force_steps(counts, world_size, num_workers, items, epoch, seed):
    """The same quantity computed the other way round: deal the epoch order to slots, then add up."""
    total = world_size * num_workers
    order = shard_order(len(counts), epoch, seed)
    samples_of_slot = np.zeros(total, dtype=np.int64)
    for position, shard in enumerate(order):
        samples_of_slot[position % total] += counts[shard]
    per_rank = (samples_of_slot // items).reshape(world_size, num_workers).sum(axis=1)
    return int(per_rank.min()), per_rank


@pytest.mark.parametrize("num_shards,items", [(1408, 1), (1500, 32), (2000, 16)])
def test_steps_on_22_nodes_x_8_ranks_x_8_workers_fit_every_rank(num_shards, items):
    world_size, num_workers = 22 * 8, 8
    rng = np.random.default_rng(num_shards)
    counts = rng.integers(0, 200, num_shards).tolist()  # very uneven, some empty shards
    steps = steps_per_epoch(counts, world_size, num_workers, items, epoch=2, seed=7)
    expected, per_rank = brute_force_steps(counts, world_size, num_workers, items, 2, 7)
    assert steps == expected
    assert steps <= per_rank.min() and per_rank.max() > steps  # uneven: some rank could do more
    for rank in (0, 77, world_size - 1):
        capacities = rank_worker_capacities(counts, rank, world_size, num_workers, items, 2, 7)
        assert sum(capacities) == per_rank[rank] >= steps
        quotas = worker_quotas(capacities, steps)
        assert sum(quotas) == steps and all(0 <= q <= c for q, c in zip(quotas, capacities))


def test_steps_change_with_the_epoch_and_follow_the_reader_assignment():
    counts = list(range(1, 65))
    a = steps_per_epoch(counts, 4, 2, 3, epoch=0, seed=0)
    assert a == brute_force_steps(counts, 4, 2, 3, 0, 0)[0]
    # the arithmetic reads exactly the shards the reader would
    slot = ReaderSlot(1, 4, 1, 2)
    mine = sum(counts[s] for s in shards_for_slot(64, slot, 0, 0)) // 3
    assert rank_worker_capacities(counts, 1, 4, 2, 3, 0, 0)[1] == mine


def test_worker_quotas_fill_evenly_then_by_capacity():
    assert worker_quotas([10, 10, 10], 9) == [3, 3, 3]
    assert worker_quotas([1, 10, 10], 9) == [1, 4, 4]
    assert worker_quotas([0, 5], 5) == [0, 5]
    with pytest.raises(ValueError):
        worker_quotas([1, 1], 3)


def sample(place, n, key):
    return PlaceSample(key, place, f"p{place}", tuple(range(n)), tuple(b"x" for _ in range(n)), tuple({} for _ in range(n)))


@pytest.mark.parametrize("trial", range(40))
def test_group_reserve_bounds_what_place_groups_leaves_unused(trial):
    rng = random.Random(trial)
    p = rng.randint(2, 6)
    places = rng.randint(p, 3 * p)
    parts = {place: rng.choice([1, 1, 2, 3, 8]) for place in range(places)}
    stream = [sample(place, 4, f"{place}-{i}") for place, n in parts.items() for i in range(n)]
    rng.shuffle(stream)
    if trial % 4 == 0:  # adversarial: all parts of each place in a row
        stream.sort(key=lambda s: s.place_id)
    groups = list(place_groups(stream, p, 4, random.Random(0)))
    reserve = group_reserve(p, max(parts.values()))
    assert len(groups) >= max(0, len(stream) - reserve) // p


# ---- generator stages ----


def test_batched_yields_only_full_batches():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]


def test_random_resized_crop_stays_inside_and_covers_the_scale():
    rng = np.random.default_rng(0)
    for width, height in [(64, 48), (48, 64), (40, 40), (400, 20)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, rng, (0.7, 1.0), (3 / 4, 4 / 3))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            if 0.5 < width / height < 2:
                assert (right - left) * (bottom - top) >= 0.65 * width * height


def test_usable_samples_counts_samples_with_enough_images():
    index = pa.table({
        "image_id": list(range(9)),
        "place_id": [1, 1, 1, 2, 2, 1, 1, 3, 3],
        "shard_index": [0, 0, 0, 0, 0, 1, 1, 1, 1],
        "sample_key": ["a", "a", "a", "b", "b", "c", "c", "d", "d"],
    })
    assert usable_samples(index, 3, 2) == ([2, 2, 0], 2)  # place 1 has two usable parts
    assert usable_samples(index, 3, 3) == ([1, 0, 0], 1)


# ---- real shards ----

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]  # place p is colour p % 3: survives the jitter


def place_jpeg(place: int, i: int) -> bytes:
    pixels = np.full((40, 52, 3), COLOURS[place % 3], dtype=np.uint8)
    pixels[i % 40, :, :] = 128  # a distinct line per image: no two images have the same bytes
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


ID_STRIDE = 100_000  # image id = place * ID_STRIDE + a serial, so a test can read the place off the id


def image_id_of(place: int, i: int) -> int:
    return place * ID_STRIDE + i


def write_shard_set(root, layout: list[list[tuple[int, int]]]):
    """A complete shard set: layout[shard] = [(place, images), ...], one sample per entry."""

    def image(place: int, sample_index: int, i: int) -> tuple[int, bytes]:
        return image_id_of(place, sample_index * 50 + i), place_jpeg(place, sample_index * 50 + i)

    write_shards(root, layout, image, short_side=40)
    return root


def all_image_ids(layout):
    ids, sample_index = [], 0
    for entries in layout:
        for place, n in entries:
            ids += [image_id_of(place, sample_index * 50 + i) for i in range(n)]
            sample_index += 1
    return ids


def dominant_colour(images: torch.Tensor) -> list[int]:
    """[B, 3, S, S] -> [B] index of the strongest channel."""
    return images.float().mean(dim=(2, 3)).argmax(dim=1).tolist()


@pytest.fixture
def four_shards(tmp_path):
    layout = [
        [(p, 4) for p in range(0, 12)],  # 12 places
        [(p, 5) for p in range(12, 20)],  # 8 places
        [(p, 4) for p in range(20, 23)] + [(3, 4)],  # 4 samples, one a second part of place 3
        [(p, 6) for p in range(23, 25)] + [(25, 1)],  # 2 usable samples and a 1-image sample
    ]
    return write_shard_set(tmp_path / "set", layout), layout


def test_pair_batches_have_the_right_shapes_and_one_place_per_pair(four_shards):
    root, _ = four_shards
    loader, steps = make_loader(root, "pairs", rank=0, world_size=1, num_workers=2,
                                geometry=BatchGeometry(pairs_per_batch=3), image_size=24, epoch=0, seed=1)
    batches = list(loader)
    assert len(batches) == steps == len(loader) > 0
    for img_a, img_b, place_ids, pair_kinds in batches:
        assert img_a.shape == img_b.shape == (3, 3, 24, 24) and img_a.dtype == torch.uint8
        assert place_ids.shape == (3,) and place_ids.dtype == torch.int64
        assert pair_kinds.tolist() == [0, 0, 0]  # trainer.pairs.PairKind.RANDOM: no pair rule asked for
        expected = [p % 3 for p in place_ids.tolist()]
        assert dominant_colour(img_a) == dominant_colour(img_b) == expected


def test_same_seed_same_batches_other_epoch_other_batches(four_shards):
    root, _ = four_shards

    def first(epoch):
        loader, _ = make_loader(root, "pairs", rank=0, world_size=1, num_workers=0,
                                geometry=BatchGeometry(pairs_per_batch=2), image_size=16, epoch=epoch, seed=3)
        return next(iter(loader))

    assert torch.equal(first(0).img_a, first(0).img_a)
    assert not torch.equal(first(0).img_a, first(1).img_a)


def write_labels(root, image_ids, version, class_of):
    ids = [i for i in image_ids if class_of(i) is not None]
    n = len(ids)
    table = label_table(ids, np.zeros(n), np.array(["c"] * n, dtype=object), np.zeros(n), np.zeros(n),
                        [class_of(i) for i in ids], None, version)
    write_label_set(root, table, k=1, seed=0, cell_size_m=15.0, previous_version=version - 1 if version else None,
                    retired_class_ids=[], next_class_id=100_000, images_changed_class=None, images_new=n)


def group_class_ids(root, labels, label_version):
    geometry = BatchGeometry(places_per_batch=3, images_per_place=4)
    loader, steps = make_loader(root, "groups", rank=0, world_size=1, num_workers=2, geometry=geometry,
                                image_size=16, epoch=0, seed=0, labels_dir=labels, label_version=label_version)
    batches = list(loader)
    assert len(batches) == steps > 0
    return loader.dataset.label_version, batches


def test_group_batches_are_p_places_by_k_images_with_their_classes(four_shards, tmp_path):
    root, layout = four_shards
    labels = tmp_path / "labels"
    # every image labelled except those of place 5, which must come back as -1
    write_labels(labels, all_image_ids(layout), 0, lambda i: None if i // ID_STRIDE == 5 else 7 * i % 991)
    version, batches = group_class_ids(root, labels, None)
    assert version == 0
    seen_places = Counter()
    for images, place_ids, image_ids, class_ids, positions in batches:
        assert images.shape == (12, 3, 16, 16) and place_ids.shape == image_ids.shape == class_ids.shape == (12,)
        assert positions.shape == (12, 3) and (positions[:, 0] == 10).all()  # UTM zone, east, north per image
        assert ((positions[:, 1] // 100).long() == place_ids).all()  # tests.shardsets: place p at 100 p m east
        places = place_ids.view(3, 4)
        assert (places == places[:, :1]).all() and len(set(places[:, 0].tolist())) == 3  # P distinct x K
        assert len(set(image_ids.tolist())) == 12
        assert (image_ids // ID_STRIDE == place_ids).all()
        expected = [-1 if i // ID_STRIDE == 5 else 7 * i % 991 for i in image_ids.tolist()]
        assert class_ids.tolist() == expected
        assert dominant_colour(images) == [p % 3 for p in place_ids.tolist()]
        seen_places.update(places[:, 0].tolist())
    assert 25 not in seen_places  # a 1-image sample cannot give K = 4


def test_a_new_label_version_changes_the_class_ids(four_shards, tmp_path):
    root, layout = four_shards
    labels = tmp_path / "labels"
    ids = all_image_ids(layout)
    write_labels(labels, ids, 0, lambda i: i % 5)
    assert group_class_ids(root, labels, None)[0] == 0
    write_labels(labels, ids, 1, lambda i: 1000 + i % 5)
    version, batches = group_class_ids(root, labels, None)  # the next epoch's loader picks up v1
    assert version == 1 and all((b.class_ids >= 1000).all() for b in batches)
    version, batches = group_class_ids(root, labels, 0)  # or pins an older one
    assert version == 0 and all((b.class_ids < 5).all() for b in batches)


def test_two_ranks_x_two_workers_on_uneven_shards_take_the_same_steps(tmp_path):
    sizes = [1, 2, 9, 3, 14, 2, 6, 1]  # samples per shard, deliberately uneven
    layout, place = [], 0
    for n in sizes:
        layout.append([(place + j, 2 + j % 3) for j in range(n)])
        place += n
    root = write_shard_set(tmp_path / "uneven", layout)
    geometry = BatchGeometry(pairs_per_batch=2)
    delivered, steps_seen = [], []
    for epoch in (0, 1):
        for rank in (0, 1):
            loader, steps = make_loader(root, "pairs", rank=rank, world_size=2, num_workers=2, geometry=geometry,
                                        image_size=16, epoch=epoch, seed=5)
            delivered.append(sum(1 for _ in loader))
            steps_seen.append(steps)
            assert steps == steps_per_epoch(sizes, 2, 2, 2, epoch, 5)
    assert delivered == steps_seen and steps_seen[0] == steps_seen[1] and steps_seen[2] == steps_seen[3]
    assert min(steps_seen) > 0
    capacity = {(e, r): sum(rank_worker_capacities(sizes, r, 2, 2, 2, e, 5)) for e in (0, 1) for r in (0, 1)}
    assert capacity[1, 0] != capacity[1, 1]  # without the step limit the ranks would disagree


def test_too_few_shards_and_unknown_stage_fail_with_a_message(four_shards, tmp_path):
    root, _ = four_shards
    with pytest.raises(ValueError, match="--min-shards 6"):
        make_loader(root, "pairs", rank=0, world_size=3, num_workers=2, geometry=BatchGeometry(), image_size=16,
                    epoch=0, seed=0)
    with pytest.raises(ValueError, match="pairs"):
        make_loader(root, "triplets", rank=0, world_size=1, num_workers=1, geometry=BatchGeometry(), image_size=16,
                    epoch=0, seed=0)
    with pytest.raises(FileNotFoundError, match="no complete label version"):
        make_loader(root, "groups", rank=0, world_size=1, num_workers=1, geometry=BatchGeometry(), image_size=16,
                    epoch=0, seed=0, labels_dir=tmp_path / "none")


def test_fused_colour_jitter_equals_the_three_steps_one_by_one():
    import numpy as np

    from placeforge.trainer.augment import AugmentConfig, color_jitter

    def grey(x):  # [B, 1, H, W]
        return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]

    def reference(images, rng, cfg):  # brightness, contrast, saturation as separate passes
        b = images.shape[0]
        f = [torch.from_numpy(rng.uniform(1 - s, 1 + s, b).astype(np.float32)).view(b, 1, 1, 1)
             for s in (cfg.brightness, cfg.contrast, cfg.saturation)]
        images = images * f[0]
        mean = grey(images).mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * f[1] + mean
        g = grey(images)
        return ((images - g) * f[2] + g).clamp(0.0, 1.0)

    images = torch.rand(5, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig()
    fused = color_jitter(images.clone(), np.random.default_rng(7), cfg)
    expected = reference(images.clone(), np.random.default_rng(7), cfg)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, images)  # it did change the images


def test_loader_batches_are_uint8_and_model_input_normalises_like_evaluation():
    from placeforge.models.encoders import imagenet_normalize, to_unit_tensor
    from placeforge.trainer.augment import model_input

    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)  # [B, H, W, 3]
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # what decode_augment returns
    torch.testing.assert_close(model_input(batch, torch.device("cpu")), imagenet_normalize(to_unit_tensor(pixels)))
