"""Stage-2 mining over the global batch (trainer.mining): one batch split between 2 gloo ranks
must mine the same (anchor, positive, negative) triples, and give the same loss terms and
gradients, as one process on the whole batch.

The ranks are plain torch.distributed processes (no DeepSpeed): each rank's gradients are
averaged with an all-reduce, which is what DeepSpeed does after `engine.backward`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from placeforge.models.encoders import EncoderConfig
from placeforge.trainer.batches import GroupBatch
from placeforge.trainer.engine import finetune_step
from placeforge.trainer.mining import MiningGroup, mining_group
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model

PLACES, IMAGES_PER_PLACE, RANKS = 6, 4, 2
CPU = torch.device("cpu")

# Place-id positives, pair and MS negatives beyond 25 m, and a gradient through the partner's
# tokens (the remote rows travel with a gradient); then view-class positives with detached tokens.
SETTINGS = {
    "place_far_trains_encoder": dict(positives="place", pair_negative_min_distance_m=25.0,
                                     ms_negative_min_distance_m=25.0, pair_trains_encoder=True),
    "view_class_detached": dict(positives="view_class", pair_trains_encoder=False),
}


def tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig(stage="finetune", encoder=EncoderConfig("vit_tiny_test", 56, 32), decoder="dec64d2b",
                       trainable_last_blocks=2, mining_scope="global", **overrides)


def whole_batch() -> GroupBatch:
    """6 places x 4 images, place-major.  Places 2 and 3 are 15 m apart (one on each rank once
    split), place 5 has no position; view classes split each place in two."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (PLACES * IMAGES_PER_PLACE, 3, 56, 56), dtype=torch.uint8, generator=generator)
    place = torch.arange(PLACES).repeat_interleave(IMAGES_PER_PLACE)  # [24]
    east = torch.tensor([0.0, 200.0, 400.0, 415.0, 800.0, float("nan")], dtype=torch.float64)[place]
    positions = torch.stack([torch.full_like(east, 10.0), 550_000.0 + east, torch.full_like(east, 4_180_000.0)], 1)
    return GroupBatch(images=images, place_ids=place + 100, image_ids=torch.arange(len(place)),
                      class_ids=place * 2 + torch.arange(len(place)) % 2, positions=positions)


def rows_of(batch: GroupBatch, rows: slice) -> GroupBatch:
    return GroupBatch(*(field[rows] for field in batch))


class Recording(nn.Module):
    """The model, keeping its last output (the mined triples) for the test to read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out: dict = {}

    def forward(self, *args) -> dict:
        self.out = self.model(*args)
        return self.out


def one_step(cfg: TrainConfig, batch: GroupBatch, group: MiningGroup | None = None) -> dict:
    """Terms, mined triples and parameter gradients of one finetune_step from fixed weights."""
    torch.manual_seed(0)
    model = Recording(build_finetune_model(cfg, num_classes=2 * PLACES))
    terms = finetune_step(model, batch, cfg, CPU, group=group)
    terms["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.model.named_parameters() if p.grad is not None}
    return {"terms": {k: v.detach() for k, v in terms.items()}, "pairs": model.out["pairs"], "grads": grads}


def _rank_main(rank: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    try:
        size = PLACES * IMAGES_PER_PLACE // RANKS
        batch = rows_of(whole_batch(), slice(rank * size, (rank + 1) * size))
        for name, overrides in SETTINGS.items():
            got = one_step(tiny_cfg(**overrides), batch)  # the group comes from the process group
            for value in [*got["terms"].values(), *got["grads"].values()]:  # DeepSpeed's mean over ranks
                dist.all_reduce(value)
                value /= RANKS
            pairs = [torch.empty(0)] * RANKS
            dist.all_gather_object(pairs, got["pairs"])
            if rank == 0:
                results[name] = {**got, "pairs": torch.cat(pairs)}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Each setting's step on 2 ranks of 12 images: terms and gradients averaged over ranks,
    triples of both ranks concatenated."""
    init_file = tmp_path_factory.mktemp("gloo") / "init"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(str(init_file), results), nprocs=RANKS, join=True)
        return dict(results)


def assert_same_step(got: dict, expected: dict) -> None:
    for name in ("loss", "ms", "pair_bce", "cosface"):
        torch.testing.assert_close(got["terms"][name], expected["terms"][name], rtol=1e-5, atol=1e-5, msg=name)
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_ranks_mine_and_learn_as_one_process_on_the_whole_batch(two_ranks, setting):
    cfg = tiny_cfg(**SETTINGS[setting])
    expected = one_step(cfg, whole_batch())  # one process: mining_scope is moot
    got = two_ranks[setting]
    anchor, positive, negative = expected["pairs"].T
    half = PLACES * IMAGES_PER_PLACE // RANKS
    # The check has teeth: some hardest negative (mined per rank, it could not be) lives on the other rank.
    assert len(anchor) > 0 and ((anchor < half) != (negative < half)).any()
    assert torch.equal(got["pairs"], expected["pairs"])
    assert_same_step(got, expected)
    assert float(expected["terms"]["ms"]) > 0 and float(expected["terms"]["pair_bce"]) > 0


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_global_mining_on_one_process_equals_rank_mining(setting):
    """The global path (gathers that are identities, anchors as a slice of rows) on one process
    reproduces the micro-batch path; and one process never gets a group at all."""
    cfg = tiny_cfg(**SETTINGS[setting])
    batch = whole_batch()
    rank_scope = one_step(dataclasses.replace(cfg, mining_scope="rank"), batch)
    global_path = one_step(cfg, batch, group=MiningGroup(rank=0, world_size=1))
    assert torch.equal(global_path["pairs"], rank_scope["pairs"])
    assert_same_step(global_path, rank_scope)
    assert mining_group("global", 0, 1) is None and mining_group("rank", 1, 8) is None
    assert mining_group("global", 3, 8) == MiningGroup(3, 8)
    assert mining_group("global", 3, 8).rows(50) == slice(150, 200)
    with pytest.raises(ValueError, match="mining_scope"):
        mining_group("batch", 0, 2)
