"""Encoders and the global-descriptor model: a registry of ViT presets, a head, preprocessing.

    cfg = EncoderConfig(name="vit_base_patch14_reg4_dinov2", image_size=322,
                        weights="weights/dinov2_vitb14_reg4_pretrain.pth")
    model = build_model(cfg)                       # encoder + head; weights from cfg.weights if set
    descriptors = model(preprocess(jpegs, cfg.image_size))   # [B, 512], unit length

Presets are named after their architecture (`ENCODERS`); `vit_tiny_test` is a ViT small
enough to train on a laptop CPU and exists for tests and the demo.  The DINOv2 presets
are timm's ViTs with patch 14, with or without 4 registers (`_reg4_`, what Pair-VPR
uses), plus DINOv2's mask token; their weights come only from a local file
(`EncoderConfig.weights`: the official release .pth or timm's safetensors, models.dinov2),
never from the network.  Tokens are [class, registers..., patches]: P = 1 + registers prefix
tokens (`encoder.num_prefix_tokens`) come first, and everything that wants patches skips P.

Global head (Pair-VPR): class token -> Linear -> descriptor_dim -> L2 normalise.  With
`pooling="gem"` (MutualVPR): patch tokens -> L2 normalise -> GeM (p = 3, learnable)
-> Linear -> descriptor_dim -> L2 normalise.  With `pooling="gem_grid"` (not in either
paper; the CPU demo's choice): the patch grid is cut into `pooling_grid` x `pooling_grid`
cells, each cell GeM-pooled and projected by one shared Linear to descriptor_dim / cells^2,
each cell's vector L2-normalised, then all concatenated and L2-normalised, so the cosine of
two descriptors is the mean of their cells' cosines: the descriptor keeps where in the view
things are (the 16 x 16-thumbnail baseline's strength), which one GeM over the whole view
throws away.  Register tokens feed none of them.

`adapter="mulconv"` (MutualVPR, models.adapters): a MulConv adapter beside every block's MLP,
added after the encoder's weights are loaded; the encoder's own parameters are then frozen, so
only the adapters, GeM's exponent and the head train.  MutualVPR's model is
`EncoderConfig("vit_base_patch14_dinov2", 504, 512, "gem", resize="squash", adapter="mulconv")`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from placeforge.config import Moved, moved
from placeforge.models.adapters import add_mulconv_adapters, set_patch_grid
from placeforge.models.dinov2 import add_mask_token, encode_with_mask_token, load_weights_into, require_weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("cls", "gem", "gem_grid")
# How an encoder sees its (ImageNet-normalised) input.  "per_image" standardises each image's
# channels by their own mean and std first: a night or foggy query and a daylight database
# image of one facade then differ far less (the 16 x 16-thumbnail baseline removes the mean
# for the same reason); it has no weights, so it costs nothing to store or load.
INPUT_NORMS = ("imagenet", "per_image")
# How an image becomes the encoder's input at inference: "crop" resizes the short side to S and
# cuts the centre S x S (a 4:3 image loses a quarter of its width); "squash" resizes the whole
# view to S x S (Pair-VPR's 322 x 322, MutualVPR's 504), which is also what training's random
# resized crops of a 4:3 image look like; "short_side" resizes the short side to S and keeps the
# aspect ratio, no crop (gmberton/VPR-methods-evaluation), with the long side rounded to the
# nearest multiple of the patch as that tool's DINOv2 wrapper does: a 4:3 image at 322 is
# 322 x 434 (H x W), a non-square patch grid of 23 x 31.
RESIZES = ("crop", "squash", "short_side")
# What sits beside each encoder block's MLP: nothing, or MutualVPR's MulConv adapter (models.adapters).
ADAPTERS = ("none", "mulconv")


def normalize_input(images: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, 3, H, W] ImageNet-normalised -> what the encoder sees under `mode` (INPUT_NORMS)."""
    if mode == "imagenet":
        return images
    mean = images.mean(dim=(2, 3), keepdim=True)  # [B, 3, 1, 1]
    std = images.std(dim=(2, 3), keepdim=True)
    return (images - mean) / (std + 1e-3)


@dataclass(frozen=True)
class EncoderSpec:
    """The shape of one ViT preset.

    `timm_name` builds timm's architecture of that name (layer scale, registers, SwiGLU as
    timm defines it) at this width and depth; None builds a plain ViT here.  `release_file`
    names the official DINOv2 weights file the preset is meant to start from.
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str | None = None
    release_file: str | None = None

    @property
    def dinov2(self) -> bool:
        """A DINOv2 architecture: it has a mask token, and DINOv2's position-resize rule."""
        return self.timm_name is not None and self.timm_name.endswith("_dinov2")

    def build(self, image_size: int) -> VisionTransformer:
        """The encoder with random weights, for images of `image_size` pixels (any size works)."""
        if self.timm_name is not None:
            import timm

            encoder = timm.create_model(
                self.timm_name, pretrained=False, img_size=image_size, num_classes=0, dynamic_img_size=True,
                embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            )
            if self.dinov2:
                add_mask_token(encoder)
            return encoder
        return VisionTransformer(
            img_size=image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            # No layer scale: DINOv2 starts it at 1e-5 because its weights are pre-trained; from random
            # weights it keeps the class token almost independent of the image, and global
            # descriptors of every image start out identical (MS loss stalls).
            init_values=None,
            num_classes=0,
            dynamic_img_size=True,
        )


ENCODERS: dict[str, EncoderSpec] = {
    # 8 x 8 patches at 112 px, ~0.2 M parameters: the unit tests' encoder.
    "vit_tiny_test": EncoderSpec(patch_size=14, embed_dim=64, depth=4, num_heads=2),
    # The CPU demo's encoder: 8 x 8 patches of 8 px at 64 px, width 128, 4 blocks, ~0.9 M
    # parameters (docs/benchmarks.md, "Making it learn": the variants measured).
    "vit_w128_d4_patch8": EncoderSpec(patch_size=8, embed_dim=128, depth=4, num_heads=4),
    # 2 blocks of width 64 in DINOv2's register layout (4 registers, layer scale, mask token):
    # the tests' encoder for every path that must skip class and register tokens.
    "vit_tiny_reg4_dinov2_test": EncoderSpec(14, 64, 2, 2, timm_name="vit_base_patch14_reg4_dinov2"),
    # The same in the register-free layout (layer scale, mask token, class token only): MutualVPR's.
    "vit_tiny_dinov2_test": EncoderSpec(14, 64, 2, 2, timm_name="vit_base_patch14_dinov2"),
}

# DINOv2 (facebookresearch/dinov2, dinov2/hub/backbones.py): size -> (letter of its release
# file, width, depth, heads); ViT-g is "vit_giant2" there, width 1536, 40 blocks, SwiGLU MLP.
# Each size comes as released (dinov2_vit?14) and with 4 register tokens (dinov2_vit?14_reg),
# named after the timm model of the same weights, with the official file name it loads.
_DINOV2_SIZES = {"small": ("s", 384, 12, 6), "base": ("b", 768, 12, 12), "large": ("l", 1024, 24, 16),
                 "giant": ("g", 1536, 40, 24)}
ENCODERS.update({
    f"vit_{size}_patch14{registers}_dinov2": EncoderSpec(
        14, width, depth, heads, f"vit_{size}_patch14{registers}_dinov2", f"dinov2_vit{letter}14{registers}_pretrain.pth")
    for registers in ("", "_reg4") for size, (letter, width, depth, heads) in _DINOV2_SIZES.items()
})


def encoder_spec(name: str) -> EncoderSpec:
    """The preset `name`; an unknown name fails with the list of valid names."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(ENCODERS)}")
    return ENCODERS[name]


@dataclass(frozen=True)
class EncoderConfig:
    """The global-descriptor model: what an export records, and a training recipe's `encoder:` section."""

    # Keys of exports written before `checkpoint` was named `weights` (placeforge.config.migrate).
    MOVED: ClassVar[dict[str, Moved]] = {"checkpoint": moved("weights")}
    name: str = field(default="vit_tiny_test", metadata={"help": f"encoder preset: one of {', '.join(ENCODERS)}"})
    image_size: int = field(
        default=112, metadata={"help": "square input side in pixels, a multiple of the patch (Pair-VPR: 224 in "
                                       "stage 1, 322 in stage 2)"})
    descriptor_dim: int = field(default=512, metadata={"help": "global descriptor dimension"})
    pooling: str = field(
        default="cls", metadata={"help": "global head input: cls, the class token (Pair-VPR); gem, GeM over patch "
                                         "tokens (MutualVPR); or gem_grid, GeM per cell of a grid over the view, the "
                                         "cells' descriptors concatenated (not in either paper)"})
    weights: str | None = field(
        default=None, metadata={"help": "local encoder weights to start from: the official DINOv2 .pth or timm's "
                                        "safetensors (never downloaded; a relative path is resolved against the "
                                        "working directory)"})
    input_norm: str = field(
        default="imagenet", metadata={"help": "encoder input: imagenet (ImageNet-normalised) or per_image (each "
                                              "image's channels standardised)"})
    resize: str = field(
        default="crop", metadata={"help": "how exported models (and validation during training) resize images at "
                                          "inference: crop the centre of the short-side resize, squash the whole "
                                          "view to a square, or short_side: resize the short side to image_size and "
                                          "keep the aspect ratio (gmberton/VPR-methods-evaluation)"})
    pooling_grid: int = field(
        default=2, metadata={"help": "gem_grid: cells per side (2: a 2 x 2 grid); descriptor_dim must be a "
                                     "multiple of its square"})
    adapter: str = field(
        default="none", metadata={"help": "none, or mulconv: a MulConv adapter beside every encoder block's MLP, and "
                                          "of the encoder only the adapters train (MutualVPR; models.adapters)"})

    def validate(self) -> None:
        spec = encoder_spec(self.name)
        if self.image_size < spec.patch_size or self.image_size % spec.patch_size:
            raise ValueError(
                f"image_size must be a multiple of the patch size {spec.patch_size}, got {self.image_size}")
        if self.descriptor_dim < 1:
            raise ValueError(f"descriptor_dim must be >= 1, got {self.descriptor_dim}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.pooling == "gem_grid":
            check_grid_fits(self.pooling_grid, self.descriptor_dim)
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {list(RESIZES)}, got {self.resize!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {list(INPUT_NORMS)}, got {self.input_norm!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}")
        if self.adapter == "mulconv" and spec.embed_dim % 32:
            raise ValueError(f"adapter mulconv needs an encoder width divisible by 32; "
                             f"{self.name} has {spec.embed_dim}")


def check_grid_fits(cells_per_side: int, descriptor_dim: int) -> None:
    """gem_grid: at least one cell, and a descriptor that splits evenly over the cells."""
    if cells_per_side < 1:
        raise ValueError(f"pooling_grid must be >= 1, got {cells_per_side}")
    if descriptor_dim % cells_per_side ** 2:
        raise ValueError(f"gem_grid splits the descriptor over {cells_per_side} x {cells_per_side} cells: "
                         f"descriptor_dim must be a multiple of {cells_per_side ** 2}, got {descriptor_dim}")


class GeM(nn.Module):
    """Generalised mean pooling over tokens, with a learnable exponent.

    Args:
        p: initial exponent (3 in CosPlace and MutualVPR; 1 = mean, large = max).
        eps: floor applied before the power, so negative and zero entries stay differentiable.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        # Shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast cannot view a 0-d tensor.
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, C]."""
        return tokens.clamp(min=self.eps).pow(self.p).mean(dim=1).pow(1.0 / self.p)

    def grid(self, tokens: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
        """[B, H * W, C] tokens in row-major grid order -> [B, cells * cells, C], one GeM per cell
        (cells in row-major order; a grid that does not divide evenly gets overlapping cells)."""
        batch, _, channels = tokens.shape
        powered = tokens.clamp(min=self.eps).pow(self.p).transpose(1, 2).reshape(batch, channels, *grid)
        pooled = F.adaptive_avg_pool2d(powered, cells)  # [B, C, cells, cells]: the mean of each cell
        return pooled.flatten(2).transpose(1, 2).pow(1.0 / self.p)


class GlobalDescriptorModel(nn.Module):
    """A ViT encoder and a global head that gives one unit-length descriptor per image.

    Args:
        encoder: a timm VisionTransformer with a class token (first), any number of register
            tokens after it, and no classifier.
        descriptor_dim: output dimension D.
        pooling: "cls" (class token), "gem" (GeM over L2-normalised patch tokens only) or
            "gem_grid" (GeM per cell of a `pooling_grid` x `pooling_grid` grid of them).
        input_norm: INPUT_NORMS, applied to the images before the encoder.
        pooling_grid: cells per side for "gem_grid"; descriptor_dim must split evenly over the cells.
    """

    def __init__(self, encoder: VisionTransformer, descriptor_dim: int = 512, pooling: str = "cls",
                 input_norm: str = "imagenet", pooling_grid: int = 2) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        cells = pooling_grid ** 2 if pooling == "gem_grid" else 1
        if pooling == "gem_grid":
            check_grid_fits(pooling_grid, descriptor_dim)
        if encoder.cls_token is None:
            raise ValueError(f"expected an encoder whose first token is a class token, got "
                             f"{encoder.num_prefix_tokens} prefix token(s) and no class token")
        self.encoder = encoder
        self.pooling = pooling
        self.input_norm = input_norm
        self.pooling_grid = pooling_grid
        self.descriptor_dim = descriptor_dim
        self.gem = GeM() if pooling in ("gem", "gem_grid") else None
        self.head = nn.Linear(encoder.embed_dim, descriptor_dim // cells)  # gem_grid: shared by every cell
        self.activation_checkpointing = False  # recompute trained blocks in backward (models.recompute)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder tokens after the final norm.  [B, 3, H, W] -> [B, P + N, C]: class token, registers, patches."""
        set_patch_grid(self.encoder, self.token_grid(images))  # MulConv adapters, if any, convolve over it
        # timm's forward_features, with placeforge's block loop (no mask)
        return encode_with_mask_token(self.encoder, normalize_input(images, self.input_norm), None,
                                      recompute=self.activation_checkpointing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Global descriptors.  [B, 3, H, W] -> [B, D], each row of unit L2 norm."""
        return self.pool(self.forward_features(images), self.token_grid(images))

    def token_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The patch grid (rows, columns) the encoder makes of `images` [B, 3, H, W]."""
        patch_h, patch_w = self.encoder.patch_embed.patch_size
        return images.shape[-2] // patch_h, images.shape[-1] // patch_w

    def pool(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Encoder tokens [B, P + N, C] -> global descriptors [B, D] (evaluation also keeps the tokens).

        `grid`: the patch grid (rows, columns), `token_grid(images)`; only gem_grid reads it, and
        without it takes the grid to be square (a non-square N then fails)."""
        if self.gem is None:
            return F.normalize(self.head(tokens[:, 0]), dim=-1)  # [B, D] from the class token
        patches = F.normalize(tokens[:, self.encoder.num_prefix_tokens:], dim=-1)  # [B, N, C]: no class, registers
        if self.pooling == "gem":
            return F.normalize(self.head(self.gem(patches)), dim=-1)  # [B, D]
        if grid is None:
            side = round(patches.shape[1] ** 0.5)
            if side * side != patches.shape[1]:
                raise ValueError(f"gem_grid needs the patch grid of {patches.shape[1]} tokens (not a square): pass grid")
            grid = (side, side)
        cells = self.head(self.gem.grid(patches, grid, self.pooling_grid))  # [B, cells^2, D / cells^2]
        return F.normalize(F.normalize(cells, dim=-1).flatten(1), dim=-1)  # [B, D]: cosine = mean over cells


def build_model(cfg: EncoderConfig, load_encoder_weights: bool = True) -> GlobalDescriptorModel:
    """The model `cfg` describes; encoder weights from `cfg.weights` when given and asked for.

    `load_encoder_weights=False` gives the bare architecture, e.g. to load a full model
    checkpoint into (models.checkpoint), where the starting weights do not matter.

    Raises:
        ConfigError: `cfg.weights` names a file that is not there (checked before building).
        ValueError: the file's weights do not fit the preset (models.dinov2 names the keys).
    """
    cfg.validate()
    spec = encoder_spec(cfg.name)
    weights = None
    if load_encoder_weights and cfg.weights is not None:
        weights = require_weights_file(cfg.weights, spec.release_file)
    encoder = spec.build(cfg.image_size)
    if weights is not None:
        load_weights_into(encoder, weights, dinov2=spec.dinov2)
    if cfg.adapter == "mulconv":
        add_mulconv_adapters(encoder)  # after the weights: the file has none for them; freezes the rest
    return GlobalDescriptorModel(encoder, cfg.descriptor_dim, cfg.pooling, cfg.input_norm, cfg.pooling_grid)


def short_side_hw(width: int, height: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """(H, W) of a `width` x `height` image resized so its short side is `image_size` px, aspect
    kept, the long side rounded to the nearest multiple of `patch_size` (at least one patch).

    VPR-methods-evaluation resizes the short side (torchvision Resize(int)), then rounds both
    sides to the nearest multiple of 14 (vpr_models/resizing_wrapper.py); here it is one
    resize straight to the rounded size (the two can differ by one patch column where the
    long side lands within a pixel of a half patch).
    """
    short, long = min(width, height), max(width, height)
    long_px = max(patch_size, round(long * image_size / short / patch_size) * patch_size)
    return (image_size, long_px) if width >= height else (long_px, image_size)


def resize_and_crop(image: Image.Image, size: int | tuple[int, int], mode: str = "crop") -> np.ndarray:
    """One image -> the encoder's pixels, uint8 [H, W, 3].

    `mode` (RESIZES): "crop" resizes the short side to `size` and centre crops; "squash" resizes
    the whole image to size x size; "short_side" resizes the whole image to `size` = (H, W),
    the size `short_side_hw` gives for the images of its batch.
    """
    if mode == "short_side":
        if not isinstance(size, tuple):
            raise ValueError("resize short_side needs the output size (H, W) (short_side_hw), not one side")
        out_h, out_w = size
    elif isinstance(size, tuple):
        raise ValueError(f"resize {mode} makes a square: pass one side, not {size}")
    else:
        out_h = out_w = size
    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is much larger than needed.
    image.draft("RGB", (out_w, out_h))
    image = image.convert("RGB")
    if mode != "crop":
        return np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC))
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def preprocess(jpegs: list[bytes], image_size: int) -> torch.Tensor:
    """Decode, resize the short side to S, centre crop, ImageNet-normalise.

    Args:
        jpegs: B encoded images (any format PIL reads).
        image_size: S, pixels.
    Returns:
        [B, 3, S, S] float32.
    Raises:
        ValueError: an image does not decode.
    """
    images, ok = decode_images(jpegs, image_size)
    if not ok.all():
        raise ValueError(f"image {int(np.flatnonzero(~ok)[0])} of the batch does not decode")
    return images


def decode_images(blobs: list[bytes | None], image_size: int | tuple[int, int], resize: str = "crop"
                  ) -> tuple[torch.Tensor, np.ndarray]:
    """`preprocess` that tolerates bad images (the embedding actor and validation use it).

    Args:
        image_size: S for "crop" and "squash"; (H, W) for "short_side", one size for the whole
            batch (a batch is one tensor), which the caller picks per image set (short_side_hw).
    Returns:
        ([B, 3, H, W] float32, [B] bool ok); a blob that is None or does not decode becomes a
        black image with ok False.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {list(RESIZES)}, got {resize!r}")
    if isinstance(image_size, tuple) != (resize == "short_side"):  # checked here: the loop below keeps going
        raise ValueError(f"resize {resize} takes {'(H, W)' if resize == 'short_side' else 'one side S'}, "
                         f"got {image_size!r}")
    out_h, out_w = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    pixels = np.zeros((len(blobs), out_h, out_w, 3), dtype=np.uint8)  # [B, H, W, 3]
    ok = np.ones(len(blobs), dtype=bool)
    for i, blob in enumerate(blobs):
        try:
            if blob is None:
                raise ValueError("unreadable file")
            with Image.open(io.BytesIO(blob)) as image:
                pixels[i] = resize_and_crop(image, image_size, resize)
        except (OSError, ValueError, Image.DecompressionBombError):
            ok[i] = False
    return imagenet_normalize(to_unit_tensor(pixels)), ok


def to_unit_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> ImageNet mean/std normalised, as every encoder expects."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
