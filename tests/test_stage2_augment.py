"""Pair-VPR's stage-2 images (trainer.augment squash_randaugment): the whole view squashed to
322 x 322 with no crop, then torchvision's RandAugment with 3 ops, as
pairvpr/datasets/gsvcities_dataset.py (csiro-robotics/Pair-VPR) builds them; the same images for
the same worker seed, and the recipes that ask for it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, autoaugment

from placeforge.config import ConfigError, from_mapping, load_file
from placeforge.shards.reader import PlaceGroup
from placeforge.trainer.augment import AugmentConfig, decode_augment, randaugment
from placeforge.trainer.batches import group_batches
from placeforge.trainer.train_config import TrainConfig

S = 322
SQUASH = AugmentConfig(pipeline="squash_randaugment")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def marked_image(width: int = 640, height: int = 480) -> np.ndarray:
    """[H, W, 3] grey with a red top-left and a blue bottom-right corner, each 1/10 of a side."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    h, w = height // 10, width // 10
    pixels[:h, :w] = (255, 0, 0)
    pixels[-h:, -w:] = (0, 0, 255)
    return pixels


def textured_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [jpeg(rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)) for _ in range(count)]


def corners_marked(image: torch.Tensor) -> tuple[bool, bool]:
    """[3, S, S] uint8 -> (top-left is red, bottom-right is blue), judged 8 px inside each corner."""
    top_left = image[:, 8, 8].int()
    bottom_right = image[:, -9, -9].int()
    return bool(top_left[0] - top_left[1:].max() > 100), bool(bottom_right[2] - bottom_right[:2].max() > 100)


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    jpegs = textured_jpegs(3)
    state = torch.get_rng_state()
    first = decode_augment(jpegs, S, np.random.default_rng(7), SQUASH)
    assert torch.equal(torch.get_rng_state(), state)  # RandAugment ran on a forked RNG: the caller's is untouched
    torch.manual_seed(12345)  # the global torch RNG has no say in the images
    again = decode_augment(jpegs, S, np.random.default_rng(7), SQUASH)
    other = decode_augment(jpegs, S, np.random.default_rng(8), SQUASH)
    assert first.shape == (3, 3, S, S) and first.dtype == torch.uint8 and first.is_contiguous()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_whole_view_is_squashed_to_322_without_a_crop():
    pixels = marked_image()  # 640 x 480: squashing changes the aspect ratio, a crop would cut the sides
    blob = jpeg(pixels)
    no_ops = AugmentConfig(pipeline="squash_randaugment", randaugment_ops=0)
    out = decode_augment([blob], S, np.random.default_rng(0), no_ops)[0]  # [3, S, S]
    assert out.shape == (3, S, S)
    assert corners_marked(out) == (True, True)
    with Image.open(io.BytesIO(blob)) as image:  # Pair-VPR's T.Resize((322, 322), BILINEAR) on the decoded image
        expected = np.asarray(image.convert("RGB").resize((S, S), Image.Resampling.BILINEAR))
    assert np.array_equal(out.permute(1, 2, 0).numpy(), expected)

    # The check can fail: the random resized crop (scale 0.7-1) of crop_jitter loses a corner.
    crops = [decode_augment([blob], S, np.random.default_rng(seed), AugmentConfig())[0] for seed in range(8)]
    assert any(corners_marked(crop) != (True, True) for crop in crops)


def test_three_randaugment_ops_per_image_and_nothing_else(monkeypatch):
    transform = randaugment(SQUASH)
    assert (transform.num_ops, transform.magnitude, transform.num_magnitude_bins) == (3, 9, 31)
    assert transform.interpolation == InterpolationMode.BILINEAR
    applied = []

    def record(img, op_name, magnitude, interpolation, fill):  # RandAugment's op, counted and skipped
        applied.append(op_name)
        return img

    monkeypatch.setattr(autoaugment, "_apply_op", record)
    jpegs = textured_jpegs(4)
    out = decode_augment(jpegs, S, np.random.default_rng(3), SQUASH)
    assert len(applied) == 3 * len(jpegs)
    assert set(applied) <= set(transform._augmentation_space(31, (S, S)))
    # With the ops skipped what is left is the squash alone: no colour jitter on top.
    plain = decode_augment(jpegs, S, np.random.default_rng(3), AugmentConfig("squash_randaugment", randaugment_ops=0))
    assert torch.equal(out, plain)


def test_an_unknown_pipeline_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="crop_jitter, squash_randaugment"):
        decode_augment(textured_jpegs(1), S, np.random.default_rng(0), AugmentConfig(pipeline="squash"))


def test_stage2_batches_are_decoded_with_the_configured_pipeline():
    jpegs = textured_jpegs(4)
    group = PlaceGroup(place_ids=(10, 11), image_ids=((1, 2), (3, 4)), jpegs=(tuple(jpegs[:2]), tuple(jpegs[2:])),
                       positions=(((10.0, 1.0, 2.0),) * 2,) * 2)  # [P][K] (zone, east, north)
    lookup = (np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1]))
    batch = next(group_batches([group], lookup, S, np.random.default_rng(5), SQUASH))
    assert torch.equal(batch.images, decode_augment(jpegs, S, np.random.default_rng(5), SQUASH))
    assert batch.images.shape == (4, 3, S, S)


@pytest.mark.parametrize("recipe,expected", [("finetune_vitb", "squash_randaugment"),
                                             ("finetune_vitl", "squash_randaugment"),
                                             ("finetune_vitg", "squash_randaugment"),
                                             ("finetune_vitb_joint", "crop_jitter"),
                                             ("demo_finetune", "crop_jitter")])
def test_the_pair_vpr_recipes_ask_for_the_published_images(recipe, expected):
    cfg = from_mapping(TrainConfig, load_file(CONFIGS / f"{recipe}.yaml"))
    assert cfg.augment.pipeline == expected


def test_augment_is_a_stage_2_setting():
    assert TrainConfig().augment == AugmentConfig()  # stage 1: crop and jitter
    with pytest.raises(ValueError, match="augment settings need stage finetune"):
        TrainConfig(augment=AugmentConfig(pipeline="squash_randaugment")).validate()
    with pytest.raises(ValueError, match="augment settings need stage finetune"):
        from_mapping(TrainConfig, {"augment": {"hue": 0.1}})
    with pytest.raises(ConfigError, match="augment.pipeline: 'randaugment' is not one of"):
        from_mapping(TrainConfig, {"stage": "finetune", "augment": {"pipeline": "randaugment"}})
    with pytest.raises(ValueError, match="augment.hue must be in"):
        from_mapping(TrainConfig, {"stage": "finetune", "augment": {"hue": 0.6}})


def test_the_flat_keys_of_older_recipes_are_read_at_their_new_place(caplog):
    flat = {"stage": "finetune", "finetune_augment": "crop_jitter", "finetune_crop_scale_min": 0.5,
            "finetune_color_jitter": 0.7, "finetune_hue": 0.5}
    cfg = from_mapping(TrainConfig, flat, where="old.yaml")
    assert cfg.augment == AugmentConfig(scale=(0.5, 1.0), brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5)
    assert "old.yaml: 'finetune_hue' is now 'augment.hue'" in caplog.text
    assert "'finetune_color_jitter' is now 'augment.brightness' and 'augment.contrast'" in caplog.text
    with pytest.raises(ConfigError, match="given twice"):  # the old and the new name of one setting
        from_mapping(TrainConfig, {"stage": "finetune", "finetune_hue": 0.5, "augment": {"hue": 0.2}})
