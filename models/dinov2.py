"""Encoder weights from a local file onto timm's ViT: the official DINOv2 release, or timm's layout.

    path = require_weights_file("weights/dinov2_vitb14_reg4_pretrain.pth", "dinov2_vitb14_reg4_pretrain.pth")
    load_weights_into(encoder, path, dinov2=True)      # every source key used or listed in DROPPED
    tokens = encode_with_mask_token(encoder, images, patch_mask)   # DINOv2's own masking, [B, P + N, C]

Nothing is downloaded: a missing file fails with where to get it and where to put it.

The official layout is what `dinov2/hub/backbones.py` (facebookresearch/dinov2) loads with
strict=True into `dinov2/models/vision_transformer.py`'s DinoVisionTransformer, files named
`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` (trained at 518 px, a 37 x 37 patch grid):

    cls_token [1, 1, C]   pos_embed [1, 1 + 37 * 37, C] (class position first)   mask_token [1, C]
    register_tokens [1, 4, C] (the _reg4 files)   patch_embed.proj.{weight, bias}   norm.{weight, bias}
    blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, ls2.gamma}
    blocks.i.mlp.{fc1, fc2} (S, B, L)  or  blocks.i.mlp.{w12, w3} (g: SwiGLUFFNFused, w12 = [gate; value])

timm's DINOv2 files (`vit_*_patch14[_reg4]_dinov2` safetensors) name blocks the same, call the
registers `reg_token`, the SwiGLU layers `mlp.fc1` / `mlp.fc2`, and have no mask token; with
registers their `pos_embed` holds patch positions only and the class position is added into
`cls_token` (timm's `no_embed_class`: class and register tokens get no position).

Loss-free: every key of the file is either placed in the encoder or named in DROPPED with its
reason, and every encoder tensor is filled, except the mask token from a timm file (timm drops
it; MISSING_FROM_TIMM).  Anything else raises ValueError naming the keys.  The official model
adds its class position to the class token in every forward, so folding it into `cls_token`
gives the same outputs exactly.

Position embeddings are resized once, at load, to the encoder's grid, as the official
`interpolate_pos_encoding` would resize them in every forward: bicubic to the grid size with
antialiasing for the register models (the hub builds them with interpolate_antialias=True,
interpolate_offset=0.0, which is also timm's `resample_abs_pos_embed`), and bicubic with
scale factor (grid + 0.1) / 37 and no antialiasing for the others (the hub's defaults).  Which
rule applies depends on the encoder preset, not on the file, so the official file and timm's
file of the same weights give the same encoder.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from placeforge.config import ConfigError
from placeforge.models.recompute import run_blocks

log = logging.getLogger(__name__)

RELEASE_URL = "https://dl.fbaipublicfiles.com/dinov2"  # dinov2/hub/utils.py _DINOV2_BASE_URL
RELEASE_PAGE = "https://github.com/facebookresearch/dinov2"
# The official model's offset for the register-free models (dinov2/hub/backbones.py defaults).
OFFICIAL_INTERPOLATE_OFFSET = 0.1

# Source keys that are read but not placed in the encoder, and why.
DROPPED: dict[str, str] = {
    "head.weight": "the source model's ImageNet classifier; the encoder has none (num_classes=0)",
    "head.bias": "the source model's ImageNet classifier; the encoder has none (num_classes=0)",
}
# Encoder tensors a file may lack, and what they keep instead.
MISSING_FROM_TIMM: dict[str, str] = {
    "mask_token": "timm's DINOv2 files drop it: the encoder keeps zeros (the official init); load the "
                  "official .pth for Pair-VPR stage 1, which masks with DINOv2's trained mask token",
}


def release_url(release_file: str) -> str:
    """Where the official file is published: dinov2_vitb14_reg4_pretrain.pth ->
    https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth."""
    folder = "_".join(release_file.split("_")[:2])  # dinov2_vitb14
    return f"{RELEASE_URL}/{folder}/{release_file}"


def require_weights_file(path: str | os.PathLike, release_file: str | None = None) -> Path:
    """`path` resolved against the working directory; it must be a readable file.

    Raises:
        ConfigError: the file is not there; the message says which file to download and where to put it.
    """
    resolved = Path(path).expanduser().absolute()
    if resolved.is_file() and os.access(resolved, os.R_OK):
        return resolved
    where = f"(a relative path is resolved against the working directory {Path.cwd()})"
    if release_file is None:
        raise ConfigError(f"encoder weights not found at {resolved}: put the weights file there, or set "
                          f"encoder.weights (--encoder.weights) to your copy {where}")
    raise ConfigError(
        f"DINOv2 weights not found at {resolved}: download {release_file} from the official release "
        f"({release_url(release_file)}, listed at {RELEASE_PAGE}) and put it there, or set encoder.weights "
        f"(--encoder.weights) to your copy {where}; training never starts from random weights instead")


def add_mask_token(encoder: VisionTransformer) -> None:
    """Give a timm ViT DINOv2's mask token, [1, C] zeros (the official init) until weights are loaded.

    Frozen: Pair-VPR stage 1 replaces masked patches with it under frozen early blocks, so it
    never receives a gradient there either; a stage 1 that trains the embeddings trains it too
    (trainer.train_models.freeze_mim_encoder_except_last).
    """
    encoder.mask_token = nn.Parameter(torch.zeros(1, encoder.embed_dim), requires_grad=False)


def encode_with_mask_token(encoder: VisionTransformer, images: torch.Tensor, patch_mask: torch.Tensor | None,
                           mask_token: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """The encoder's tokens with masked patches replaced by its mask token, over the full grid
    (DINOv2's `prepare_tokens_with_masks`: the token replaces the patch embedding, positions
    are added after).  Without a mask it is timm's `forward_features`, through models.recompute's
    block loop.

    Args:
        encoder: a timm ViT with `mask_token` (`add_mask_token`), or any timm ViT with `mask_token` given.
        images: [B, 3, H, W].
        patch_mask: [B, N] bool, True where a patch is masked; None: no mask.
        mask_token: [1, C] to use instead of `encoder.mask_token` (an encoder that has none).
        recompute: activation checkpointing of the blocks that train (models.recompute).
    Returns:
        [B, P + N, C] after the final norm; P prefix tokens (class, then registers) first.
    """
    x = encoder.patch_embed(images)  # [B, gh, gw, C] with dynamic_img_size, else [B, N, C]
    if patch_mask is not None:
        token = encoder.mask_token if mask_token is None else mask_token  # [1, C]
        mask = patch_mask.reshape(*x.shape[:-1], 1)
        x = torch.where(mask, token.to(x.dtype).reshape(1, -1), x)
    x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
    return encoder.norm(run_blocks(encoder.blocks, x, recompute=recompute))


def fit_position_embedding(pos_embed: torch.Tensor, encoder: VisionTransformer,
                           official_offset: bool = False) -> torch.Tensor:
    """A position embedding of another grid resized to the encoder's grid.

    Args:
        pos_embed: [1, M * M, C] patch positions, or [1, 1 + M * M, C] with the class position
            first (kept as it is).
        encoder: the timm ViT whose `pos_embed` shape is the target.
        official_offset: resize as the official register-free DINOv2 models do (scale factor
            (grid + 0.1) / M, no antialiasing); else bicubic to the grid size with antialiasing.
    Returns:
        [1, (1 +) gh * gw, C]; the class position travels unchanged.
    """
    gh, gw = encoder.patch_embed.grid_size
    rows = pos_embed.shape[1]
    prefix = _class_rows(rows)
    side = math.isqrt(rows - prefix)
    if side * side != rows - prefix:
        raise ValueError(f"pos_embed of {rows} rows is not a square patch grid (with or without a class position)")
    if (side, side) == (gh, gw):
        return pos_embed
    patches = pos_embed[:, prefix:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, M, M]
    if official_offset:
        scale = ((gh + OFFICIAL_INTERPOLATE_OFFSET) / side, (gw + OFFICIAL_INTERPOLATE_OFFSET) / side)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    else:
        patches = F.interpolate(patches, size=(gh, gw), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos_embed.dtype)  # [1, gh * gw, C]
    return torch.cat([pos_embed[:, :prefix], patches], dim=1)


def is_official_layout(state: dict[str, torch.Tensor]) -> bool:
    """Official DINOv2 keys (mask_token, register_tokens or SwiGLU w12 / w3) rather than timm's."""
    return any(k in ("mask_token", "register_tokens") or re.search(r"\.mlp\.w(12|3)\.", k) for k in state)


def to_timm_keys(state: dict[str, torch.Tensor], no_embed_class: bool) -> dict[str, torch.Tensor]:
    """Official DINOv2 names renamed to timm's; timm names pass through (a new dict, tensors shared).

    `no_embed_class` (timm's register models): a class position in `pos_embed` (1 + M * M
    rows, the official layout) moves into `cls_token`, leaving patch positions only.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "register_tokens":
            out["reg_token"] = value  # [1, R, C]
        elif re.fullmatch(r"blocks\.\d+\.mlp\.w12\.(weight|bias)", key):
            out[key.replace(".w12.", ".fc1.")] = value  # SwiGLU [gate; value], as timm's SwiGLUPacked
        elif re.fullmatch(r"blocks\.\d+\.mlp\.w3\.(weight|bias)", key):
            out[key.replace(".w3.", ".fc2.")] = value
        else:
            out[key] = value
    pos = out.get("pos_embed")
    if no_embed_class and pos is not None and "cls_token" in out and _class_rows(pos.shape[1]):
        out["cls_token"] = out["cls_token"] + pos[:, :1]  # added in every official forward: exact
        out["pos_embed"] = pos[:, 1:]
    return out


def _class_rows(rows: int) -> int:
    """1 if a position embedding of `rows` rows holds a class position (1 + M * M), 0 if only
    patches (M * M): the two are never both squares for M > 0."""
    return 0 if math.isqrt(rows) ** 2 == rows else 1


def load_weights_into(encoder: VisionTransformer, path: str | os.PathLike, dinov2: bool) -> None:
    """Load a local .pth / .safetensors of the official DINOv2 or timm layout into `encoder`.

    Args:
        encoder: the timm ViT of the preset (`models.encoders.ENCODERS`), already built.
        path: an existing file (`require_weights_file`); read with weights_only, so it cannot run code.
        dinov2: the preset is a DINOv2 model: position embeddings resize by the official rule.
    Raises:
        ValueError: the file's keys or shapes do not fit the encoder (the keys are named).
    """
    from timm.models import load_state_dict

    state = load_state_dict(str(path), weights_only=True)  # unwraps {"model" | "state_dict": ...}
    official = is_official_layout(state)
    expected = encoder.state_dict()
    mapped = to_timm_keys(state, encoder.no_embed_class)
    mapped = {k: v for k, v in mapped.items() if k not in DROPPED}
    resized = ""
    if "pos_embed" in mapped and "pos_embed" in expected:
        source_rows = mapped["pos_embed"].shape[1]
        official_offset = dinov2 and encoder.reg_token is None
        mapped["pos_embed"] = fit_position_embedding(mapped["pos_embed"], encoder, official_offset)
        resized = f", position embedding {source_rows} -> {mapped['pos_embed'].shape[1]} rows"
    missing = sorted(set(expected) - set(mapped) - set(MISSING_FROM_TIMM))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = sorted(k for k in set(mapped) & set(expected) if mapped[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} encoder key(s) not in the file {missing[:6]}" if missing else "",
                    f"{len(unexpected)} file key(s) the encoder lacks {unexpected[:6]}" if unexpected else "",
                    "other shapes: " + ", ".join(f"{k} {tuple(mapped[k].shape)} != {tuple(expected[k].shape)}"
                                                 for k in wrong[:4]) if wrong else ""]
        raise ValueError(f"{path}: {'official DINOv2' if official else 'timm'}-layout weights do not fit this "
                         f"encoder ({len(encoder.blocks)} blocks of width {encoder.embed_dim}, "
                         f"{encoder.num_reg_tokens} registers): " + "; ".join(p for p in problems if p))
    kept = {k: expected[k] for k in MISSING_FROM_TIMM if k in expected and k not in mapped}
    encoder.load_state_dict({**mapped, **kept}, strict=True)
    dropped = sorted(set(state) & set(DROPPED))
    log.info("encoder weights: %d tensors from %s (%s layout%s%s%s)", len(mapped), path,
             "official" if official else "timm", resized, f", dropped {dropped}" if dropped else "",
             f", kept initial {sorted(kept)}" if kept else "")
    for key in kept:
        log.warning("encoder weights: %s has no %s: %s", path, key, MISSING_FROM_TIMM[key])
