"""Learning-rate and weight-decay schedules as pure functions of the step, and layer-wise
LR decay groups for timm ViTs.

    peak = LR_SCALINGS["sqrt_places"](3e-4, images_per_step, places_per_step)   # 512 places: 2.12e-4
    groups = layer_decay_groups(model, base_lr=peak, layer_decay=0.9, weight_decay=0.04)
    optimizer = torch.optim.AdamW(groups)
    for step in range(total):
        set_optimizer_values(optimizer,
                             lr=cosine_with_warmup(step, total, warmup, peak, 1e-6),
                             weight_decay=weight_decay_schedule(step, total, 0.04, 0.4))

The maths (the first two functions) never touches an optimizer; `set_optimizer_values`
is the one place that writes into one.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token", "class_token")


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, base: float, final: float) -> float:
    """Linear warm-up from 0 to `base` over `warmup_steps`, then half a cosine from `base`
    down to `final` at `total_steps` (and `final` after it)."""
    if step < warmup_steps:
        return base * step / warmup_steps
    if step >= total_steps:
        return final
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_with_warmup(step: int, total_steps: int, warmup_steps: int, base: float, final: float) -> float:
    """Linear warm-up from 0 to `base` over `warmup_steps`, then a straight line from `base` down
    to `final` at `total_steps` (and `final` after it): Pair-VPR's stage 2 (torch LinearLR from
    factor 1 to 0.2, pairvpr/training/train_stagetwo.py) with final = 0.2 x base."""
    if step < warmup_steps:
        return base * step / warmup_steps
    if step >= total_steps:
        return final
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base + (final - base) * progress


# lr_schedule name -> f(step, total_steps, warmup_steps, base, final)
LR_SCHEDULES = {"cosine": cosine_with_warmup, "linear": linear_with_warmup}


def weight_decay_schedule(step: int, total_steps: int, start: float = 0.04, end: float = 0.4) -> float:
    """Half a cosine from `start` at step 0 to `end` at `total_steps` (DINO / Pair-VPR: 0.04 -> 0.4)."""
    progress = min(max(step / max(1, total_steps), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def base_lr_for_batch(base_per_1024: float, global_batch: int) -> float:
    """Linear scaling rule: the LR for `global_batch` images given the LR per 1024 images."""
    return base_per_1024 * global_batch / 1024


def sqrt_lr_for_places(base_per_1024: float, places: int) -> float:
    """Square-root scaling rule: the LR for `places` places per step given the LR per 1024
    places (Pair-VPR's `sqrt_wrt_1024`, pairvpr/utilities/config.py: 3e-4 at 512 -> 2.12e-4)."""
    return base_per_1024 * math.sqrt(places / 1024)


# lr_scaling name -> f(base_lr, images per optimizer step, places per optimizer step), all ranks together.
LR_SCALINGS = {
    "linear": lambda base, images, places: base_lr_for_batch(base, images),
    "sqrt_places": lambda base, images, places: sqrt_lr_for_places(base, places),
    "none": lambda base, images, places: base,
}


def encoder_layer_id(name: str, depth: int, encoder_prefix: str = "encoder.") -> int:
    """Layer of a parameter for layer-wise LR decay: 0 for the encoder's embeddings (patch,
    position, class, register and mask tokens; also a stage-1 model's own `mask_token`, which
    stands in for an encoder's), b + 1 for encoder block b, depth + 1 for everything else
    (encoder final norm, heads, decoders)."""
    if name == "mask_token":  # models.decoder.SiameseMIM's, for an encoder without DINOv2's
        return 0
    if not name.startswith(encoder_prefix):
        return depth + 1
    local = name[len(encoder_prefix):]
    match = re.match(r"blocks\.(\d+)\.", local)
    if match:
        return int(match.group(1)) + 1
    if local.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token", "norm_pre")):
        return 0
    return depth + 1


def encoder_decoder_layer_id(name: str, encoder_depth: int, decoder_depth: int, encoder_prefix: str = "encoder.",
                             decoder_prefix: str = "decoder.") -> int:
    """Layer of a stage-1 parameter when layer decay runs over encoder + decoder depth, as
    Pair-VPR's `get_vit_lr_decay_rate` (pairvpr/utilities/param_groups.py) numbers them for
    its stage-1 model:

        encoder embeddings and mask tokens             0
        encoder block b                                b + 1
        encoder final norm, decoder input projection   encoder_depth (with the top encoder block)
        decoder block d                                encoder_depth + d + 1
        decoder final norm                             encoder_depth + decoder_depth (with the top decoder block)
        pixel head                                     encoder_depth + decoder_depth + 1

    The decoder's own mask token counts as 0 (Pair-VPR's `mask_token`; it is used only under
    drop masking).  The decoder's positions are fixed, not parameters, in both codes.

    Raises:
        ValueError: a decoder parameter this rule does not place (a new one must be placed here).
    """
    if name == "mask_token" or not name.startswith(decoder_prefix):
        return min(encoder_layer_id(name, encoder_depth, encoder_prefix), encoder_depth)
    local = name[len(decoder_prefix):]
    match = re.match(r"blocks\.(\d+)\.", local)
    if match:
        return encoder_depth + int(match.group(1)) + 1
    if local.startswith("embed."):
        return encoder_depth
    if local.startswith("norm."):
        return encoder_depth + decoder_depth
    if local.startswith("pixel_head."):
        return encoder_depth + decoder_depth + 1
    if local == "mask_token":
        return 0
    raise ValueError(f"no layer for the decoder parameter {name!r}")


def layer_decay_groups(model: nn.Module, base_lr: float, layer_decay: float, weight_decay: float,
                       encoder_prefix: str = "encoder.",
                       no_decay_names: tuple[str, ...] = NO_DECAY_NAMES,
                       decoder_prefix: str | None = None, patch_embed_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer parameter groups with layer-wise LR decay over a timm ViT inside `model`.

    Over the encoder (decoder_prefix None): a parameter at layer l (`encoder_layer_id`) gets
    lr_scale = layer_decay ** (depth + 1 - l): encoder block b (0-based)
    layer_decay ** (depth - b), the embeddings layer_decay ** (depth + 1), everything after
    the encoder 1.  Over encoder + decoder (a decoder at `decoder_prefix`, Pair-VPR's stage 1):
    depth = encoder blocks + decoder blocks and l = `encoder_decoder_layer_id`, so decoder
    block d gets layer_decay ** (decoder depth - d), encoder block b
    layer_decay ** (encoder depth + decoder depth - b), the pixel head 1.  The patch
    embedding's scale is also multiplied by `patch_embed_lr_scale` (Pair-VPR: 0.2).  Biases,
    norm weights and any 1-D parameter, and tokens / position embeddings (`no_decay_names`),
    get no weight decay (wd_scale 0).  Frozen parameters (requires_grad False) are left out.

    Args:
        model: a module whose ViT encoder lives at `encoder_prefix` (e.g. GlobalDescriptorModel,
            SiameseMIM); the encoder itself with encoder_prefix="".
        base_lr: LR of the top layer.
        layer_decay: per-layer factor (Pair-VPR: 0.9 for ViT-B, 0.95 for L and G).
        weight_decay: initial weight decay of the decayed groups.
        decoder_prefix: where a SiameseMIMDecoder lives whose blocks count in the depth; None: the encoder's only.
        patch_embed_lr_scale: extra factor on the patch embedding's LR.
    Returns:
        list of {"params", "lr", "lr_scale", "weight_decay", "wd_scale", "layer_id"}, one per
        (layer, patch embedding or not, decay or not) that has parameters.
    """
    encoder = model.get_submodule(encoder_prefix.rstrip(".")) if encoder_prefix else model
    encoder_depth = len(encoder.blocks)
    decoder_depth = len(model.get_submodule(decoder_prefix.rstrip(".")).blocks) if decoder_prefix else 0
    depth = encoder_depth + decoder_depth
    groups: dict[tuple[int, bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if decoder_prefix:
            layer = encoder_decoder_layer_id(name, encoder_depth, decoder_depth, encoder_prefix, decoder_prefix)
        else:
            layer = encoder_layer_id(name, encoder_depth, encoder_prefix)
        patch_embed = name.startswith(f"{encoder_prefix}patch_embed.")
        decay = param.ndim > 1 and name.rsplit(".", 1)[-1] not in no_decay_names
        scale = layer_decay ** (depth + 1 - layer) * (patch_embed_lr_scale if patch_embed else 1.0)
        group = groups.setdefault((layer, patch_embed, decay), {
            "params": [], "lr": base_lr * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0, "wd_scale": 1.0 if decay else 0.0, "layer_id": layer,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def set_optimizer_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Write this step's LR (times each group's lr_scale) and weight decay (times wd_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
