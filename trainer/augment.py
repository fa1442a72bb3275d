"""Training-time decode and augmentation, one of `AUGMENTS`, then ImageNet normalisation on the device.

    crop_jitter          random resized crop + colour jitter (Pair-VPR stage 1; placeforge's stage-2 default)
    squash_randaugment   the whole view squashed to S x S + RandAugment with 3 ops (Pair-VPR stage 2)

Every random draw comes from an explicit `numpy.random.Generator`, so a loader worker seeded
by (seed, epoch, rank, worker) gives the same images on every run: crop_jitter draws from it
directly; torchvision's RandAugment draws from torch's global RNG, so it runs under
`torch.random.fork_rng` with a seed taken from the generator.
No horizontal flip: a mirrored street is a different place (left and right swap).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from placeforge.models.encoders import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class AugmentConfig:
    """How training images are augmented: `TrainConfig.augment`, the `augment:` section of a recipe."""

    pipeline: Literal["crop_jitter", "squash_randaugment"] = field(
        default="crop_jitter", metadata={"help": "crop_jitter: random resized crop + colour jitter (Pair-VPR stage 1; "
                                                 "placeforge's stage-2 default); squash_randaugment: the whole view "
                                                 "squashed to image_size + RandAugment (Pair-VPR stage 2). Stage 1 "
                                                 "takes the defaults only"})
    scale: tuple[float, ...] = field(
        default=(0.7, 1.0), metadata={"help": "crop_jitter: the crop covers this share of the image area, low,high "
                                              "(MutualVPR 0.5,1)"})
    ratio: tuple[float, ...] = field(
        default=(3 / 4, 4 / 3), metadata={"help": "crop_jitter: the crop's width / height, low,high"})
    brightness: float = field(
        default=0.4, metadata={"help": "crop_jitter: brightness factor drawn from [1 - b, 1 + b] (MutualVPR 0.7)"})
    contrast: float = field(default=0.4, metadata={"help": "crop_jitter: as brightness, for contrast"})
    saturation: float = field(default=0.4, metadata={"help": "crop_jitter: as brightness, for saturation"})
    hue: float = field(
        default=0.0, metadata={"help": "crop_jitter: hue shift drawn from [-h, h] of a turn, 0-0.5, after the other "
                                       "three (MutualVPR 0.5; 0: none)"})
    # squash_randaugment: T.RandAugment(num_ops=3, interpolation=BILINEAR), magnitude left at torchvision's
    # 9 (of 31 bins) (csiro-robotics/Pair-VPR, pairvpr/datasets/gsvcities_dataset.py, load_train_dataset)
    randaugment_ops: int = field(default=3, metadata={"help": "squash_randaugment: RandAugment's num_ops"})
    randaugment_magnitude: int = field(
        default=9, metadata={"help": "squash_randaugment: RandAugment's magnitude, 0-30"})

    def validate(self) -> None:
        for name in ("scale", "ratio"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"augment.{name} must be two numbers 0 < low <= high, got {low_high}")
        if self.scale[1] > 1:
            raise ValueError(f"augment.scale must be in (0, 1], got {self.scale}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("augment.brightness, contrast and saturation must be >= 0")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue must be in [0, 0.5], got {self.hue}")
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise ValueError("augment.randaugment_ops must be >= 0 and randaugment_magnitude in [0, 30]")


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of a crop covering `scale` of the area at aspect `ratio`.

    Same sampling as torchvision's RandomResizedCrop: ten tries, then the largest centred
    crop whose aspect ratio is inside `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L"


def color_jitter(images: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig,
                 max_value: float = 1.0) -> torch.Tensor:
    """Per-image brightness, contrast and saturation (in that order, as torchvision's factors).

    [B, 3, S, S] float in [0, max_value] -> same, clipped (max_value 255: pixel units).  Each step is affine per pixel, so the three
    compose into one 3 x 3 matrix and one offset per image, applied in a single pass (half
    the loader's time went to running them one by one):
        brightness  x -> b x
        contrast    y -> c y + (1 - c) m,     m = mean luma of b x = b (w . mean(x))
        saturation  z -> s z + (1 - s) (w . z) 1 = M_s z,  M_s 1 = 1 since sum(w) = 1
        => x -> c b M_s x + (1 - c) m 1
    """
    b = images.shape[0]

    def factors(strength: float) -> torch.Tensor:  # [B]
        return torch.from_numpy(rng.uniform(1 - strength, 1 + strength, b).astype(np.float32))

    brightness, contrast, saturation = factors(cfg.brightness), factors(cfg.contrast), factors(cfg.saturation)
    luma = torch.tensor(LUMA, dtype=images.dtype)  # [3] = w
    mean_luma = brightness * (images.mean(dim=(2, 3)) @ luma)  # [B]
    s = saturation.view(b, 1, 1)
    sat = s * torch.eye(3, dtype=images.dtype) + (1 - s) * luma.view(1, 1, 3)  # [B, 3, 3], row i: s e_i + (1-s) w
    matrix = (contrast * brightness).view(b, 1, 1) * sat  # [B, 3, 3]
    offset = ((1 - contrast) * mean_luma).view(b, 1, 1).expand(b, 3, 1)  # [B, 3, 1]
    flat = images.reshape(b, 3, images.shape[2] * images.shape[3])  # [B, 3, S*S]
    return torch.baddbmm(offset, matrix, flat).clamp_(0.0, max_value).view_as(images)


def decode_augment(jpegs: list[bytes], image_size: int, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Decode and augment a batch with `cfg.pipeline` (AUGMENTS); uint8.

    Normalisation is left to the training step (`model_input`), on the device: a uint8 batch
    is a quarter of the bytes a float32 one moves from the loader workers (and over PCIe).

    Args:
        jpegs: B encoded images.
        image_size: S, pixels.
        rng: the worker's generator; every random draw of the batch comes from it.
    Returns:
        [B, 3, S, S] uint8.
    """
    if cfg.pipeline not in AUGMENTS:
        raise ValueError(f"unknown augment pipeline {cfg.pipeline!r}; valid: {', '.join(AUGMENTS)}")
    return AUGMENTS[cfg.pipeline](jpegs, image_size, rng, cfg)


def crop_jitter(jpegs: list[bytes], image_size: int, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Decode, random-resized-crop to S x S, colour-jitter. -> [B, 3, S, S] uint8."""
    pixels = np.empty((len(jpegs), image_size, image_size, 3), dtype=np.uint8)  # [B, S, S, 3]
    for i, data in enumerate(jpegs):
        with Image.open(io.BytesIO(data)) as image:
            # libjpeg DCT scaling: decode at the smallest 1/2^k size still >= S x S; the crop is
            # drawn in relative terms, so only the pixels it is cut from change, not its extent.
            image.draft("RGB", (image_size, image_size))
            image = image.convert("RGB")
            box = random_resized_crop_box(image.width, image.height, rng, cfg.scale, cfg.ratio)
            pixels[i] = np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()  # [B, 3, S, S] in pixel units
    images = color_jitter(images, rng, cfg, max_value=255.0)
    if cfg.hue > 0:
        images = hue_jitter(images.div_(255.0), rng, cfg.hue).mul_(255.0)
    return images.round_().to(torch.uint8)


def hue_jitter(images: torch.Tensor, rng: np.random.Generator, hue: float) -> torch.Tensor:
    """Per-image hue shift by a factor drawn from [-hue, hue] (torchvision's `adjust_hue`: a
    turn of the HSV hue circle, so 0.5 reaches the opposite hue).  [B, 3, S, S] float in [0, 1] -> same."""
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}")
    shifts = rng.uniform(-hue, hue, images.shape[0])
    return torch.stack([transforms.functional.adjust_hue(image, float(shift)) for image, shift in zip(images, shifts)])


def randaugment(cfg: AugmentConfig) -> transforms.RandAugment:
    """torchvision's RandAugment as Pair-VPR stage 2 builds it (bilinear for its geometric ops)."""
    return transforms.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude,
                                  interpolation=transforms.InterpolationMode.BILINEAR)


def squash_randaugment(jpegs: list[bytes], image_size: int, rng: np.random.Generator,
                       cfg: AugmentConfig) -> torch.Tensor:
    """Decode, squash the whole view to S x S (bilinear, no crop), then RandAugment. -> [B, 3, S, S] uint8.

    Pair-VPR stage 2, in its order: T.Resize((S, S), BILINEAR), T.RandAugment(num_ops=3,
    interpolation=BILINEAR), then ToTensor + Normalize, no colour jitter
    (pairvpr/datasets/gsvcities_dataset.py).  One difference: a JPEG at least 2 S on both sides is
    decoded at a reduced DCT scale (`draft`) before the resize, as crop_jitter does.  RandAugment
    picks its ops and signs with torch's global RNG; here that runs in a forked RNG seeded from
    `rng`, so the worker's generator alone decides the batch and the caller's torch RNG is untouched.
    """
    augment = randaugment(cfg)
    seed = int(rng.integers(2**63))
    pixels = np.empty((len(jpegs), image_size, image_size, 3), dtype=np.uint8)  # [B, S, S, 3]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, data in enumerate(jpegs):
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (image_size, image_size))
                squashed = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels[i] = np.asarray(augment(squashed))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


# Pipelines by name (AugmentConfig.pipeline, a recipe's augment.pipeline).
AUGMENTS = {"crop_jitter": crop_jitter, "squash_randaugment": squash_randaugment}


def model_input(images: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A loader batch [B, 3, S, S] uint8 -> ImageNet-normalised `dtype` on `device`."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std).to(dtype)
