"""Learning-rate and weight-decay schedules as pure functions of the step, and layer-wise
LR decay groups for timm ViTs.

    groups = layer_decay_groups(model, base_lr=lr, layer_decay=0.9, weight_decay=0.04)
    optimizer = torch.optim.AdamW(groups)
    for step in range(total):
        set_optimizer_values(optimizer,
                             lr=cosine_with_warmup(step, total, warmup, lr, 1e-6),
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


def encoder_layer_id(name: str, depth: int, encoder_prefix: str = "encoder.") -> int:
    """Layer of a parameter for layer-wise LR decay: 0 for the encoder's embeddings (patch,
    position, class and register tokens), b + 1 for encoder block b, depth + 1 for
    everything else (encoder final norm, heads, decoders)."""
    if not name.startswith(encoder_prefix):
        return depth + 1
    local = name[len(encoder_prefix):]
    match = re.match(r"blocks\.(\d+)\.", local)
    if match:
        return int(match.group(1)) + 1
    if local.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")):
        return 0
    return depth + 1


def layer_decay_groups(model: nn.Module, base_lr: float, layer_decay: float, weight_decay: float,
                       encoder_prefix: str = "encoder.",
                       no_decay_names: tuple[str, ...] = NO_DECAY_NAMES) -> list[dict]:
    """Optimizer parameter groups with layer-wise LR decay over a timm ViT inside `model`.

    A parameter at layer l (`encoder_layer_id`) gets lr_scale = layer_decay ** (depth + 1 - l):
    encoder block b (0-based) layer_decay ** (depth - b), the embeddings
    layer_decay ** (depth + 1), everything after the encoder 1.  Biases, norm weights and
    any 1-D parameter, and tokens / position embeddings (`no_decay_names`), get no weight
    decay (wd_scale 0).  Frozen parameters (requires_grad False) are left out.

    Args:
        model: a module whose ViT encoder lives at `encoder_prefix` (e.g. GlobalDescriptorModel,
            SiameseMIM); the encoder itself with encoder_prefix="".
        base_lr: LR of the top layer.
        layer_decay: per-layer factor (Pair-VPR: 0.9 for ViT-B, 0.95 for L and G).
        weight_decay: initial weight decay of the decayed groups.
    Returns:
        list of {"params", "lr", "lr_scale", "weight_decay", "wd_scale", "layer_id"}, one per
        (layer, decay or not) that has parameters.
    """
    encoder = model.get_submodule(encoder_prefix.rstrip(".")) if encoder_prefix else model
    depth = len(encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = encoder_layer_id(name, depth, encoder_prefix)
        decay = param.ndim > 1 and name.rsplit(".", 1)[-1] not in no_decay_names
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, decay), {
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
