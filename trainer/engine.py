"""One training step of each stage, as a function of (model, batch, cfg) -> loss terms.

    terms = pretrain_step(engine, batch, cfg, generator)   # {"loss", "mim"}
    terms = finetune_step(engine, batch, cfg)               # {"loss", "ms", "pair_bce", "cosface"}
    engine.backward(terms["loss"]); engine.step()

`model` is the DeepSpeed engine (or the bare module in unit tests): both are called like
the module.  The caller moves nothing: batches are moved to the model's device here.
Also here: the AdamW the engine wraps, and growing the CosFace head with the optimizer
state kept, which the loop needs after a reclustering round.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from placeforge.models.decoder import patchify, random_patch_mask
from placeforge.models.heads import CosFaceClassifier
from placeforge.trainer.augment import model_input
from placeforge.trainer.batches import GroupBatch, PairBatch
from placeforge.trainer.losses import far_apart, masked_patch_mse, multi_similarity_loss, pair_bce_loss, positive_keys
from placeforge.trainer.mining import MiningGroup, gather_rows, mining_group
from placeforge.trainer.schedules import layer_decay_groups
from placeforge.trainer.train_config import TrainConfig


def step_generator(seed: int, rank: int, global_step: int) -> torch.Generator:
    """The CPU generator of one step's random masks: a pure function of (seed, rank, step),
    so a resumed run draws exactly the masks the uninterrupted run would have."""
    state = np.random.SeedSequence([seed, rank, global_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def pretrain_step(model: nn.Module, batch: PairBatch, cfg: TrainConfig, generator: torch.Generator,
                  device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Stage 1: mask image 1, encode it (its visible patches, or the full grid with masked
    patches hidden by the mask token: the model's `masking`), decode with all of image 2's
    tokens; MSE on per-patch-normalised pixels of the masked patches.

    Args:
        batch: PairBatch, img_a / img_b [B, 3, S, S] of the same place row for row.
    Returns:
        {"loss": scalar to backpropagate, "mim": the same value}.
    """
    img_a = model_input(batch.img_a, device, dtype)
    img_b = model_input(batch.img_b, device, dtype)
    patch = _patch_size(model)
    num_patches = (img_a.shape[-2] // patch) * (img_a.shape[-1] // patch)
    mask, keep_idx = random_patch_mask(img_a.shape[0], num_patches, cfg.mask_ratio, generator, device)
    pred = model(img_a, img_b, keep_idx)  # [B, N, p * p * 3]
    loss = masked_patch_mse(pred.float(), patchify(img_a.float(), patch), mask)
    return {"loss": loss, "mim": loss.detach()}


def finetune_step(model: nn.Module, batch: GroupBatch, cfg: TrainConfig, device: torch.device,
                  dtype: torch.dtype = torch.float32, group: MiningGroup | None = None) -> dict[str, torch.Tensor]:
    """Stage 2: MS loss on global descriptors + BCE of the pair classifier on each anchor's
    hardest positive and negative + CosFace over view classes (class id -1 ignored).
    Positives are images of the same place, or of the same view class (`cfg.positives`);
    the pair classifier's negatives are images of other places, with
    cfg.pair_negative_min_distance_m > 0 only those that far away (`trainer.losses.far_apart`);
    cfg.ms_negative_min_distance_m does the same for the MS loss's negatives.

    With a mining group (cfg.mining_scope "global" on several ranks) each rank's images are
    anchors mined against the global batch, and the MS and pair terms are scaled so that their
    mean over ranks, and DeepSpeed's mean of the gradients, are those of one process on the
    whole batch (trainer.mining).  CosFace stays a mean over this rank's labelled images.

    Args:
        batch: GroupBatch, images [P*K, 3, S, S] place-major, place_ids / class_ids [P*K].
        group: None: `cfg.mining_scope` over torch.distributed's default process group (the one
            DeepSpeed initialised; none: one process).
    Returns:
        {"loss": weighted sum, "ms", "pair_bce", "cosface": unweighted terms (detached)}.
    """
    if group is None:
        group = default_mining_group(cfg)
    images = model_input(batch.images, device, dtype)
    place_ids = batch.place_ids.to(device)
    class_ids = batch.class_ids.to(device)
    keys = positive_keys(place_ids, class_ids, cfg.positives)  # [B]: equal keys are positives
    positions = None if batch.positions is None else batch.positions.to(device)  # [B, 3]
    anchors = None
    if group is not None:
        anchors = group.rows(len(keys))
        keys = gather_rows(keys, group)  # [R*B]
        if cfg.pair_negative_min_distance_m > 0 or cfg.ms_negative_min_distance_m > 0:
            if positions is None:  # NaN: far from every image, as no positions at all (every rank gathers)
                positions = torch.full((len(place_ids), 3), float("nan"), dtype=torch.float64, device=device)
            positions = gather_rows(positions, group)  # [R*B, 3]
    far, ms_far = None, None
    if positions is not None:
        if cfg.pair_negative_min_distance_m > 0:
            far = far_apart(positions, cfg.pair_negative_min_distance_m)  # [B, B] (global: [R*B, R*B])
        if cfg.ms_negative_min_distance_m > 0:
            ms_far = far_apart(positions, cfg.ms_negative_min_distance_m)  # [B, B] (global: [R*B, R*B])
    out = model(images, keys, class_ids, far, group)
    ms = multi_similarity_loss(out["all_descriptors"].float(), keys, far=ms_far, anchors=anchors)
    if "pair_pos" not in out:  # no pair classifier (MutualVPR): no pair term at all
        bce = torch.zeros((), device=device)
    elif out["has_pairs"]:
        # Global: sum over this rank's pairs / mean pair count per rank, so the ranks' mean is the global mean.
        per_rank = None if group is None else out["pair_logits_total"] / group.world_size
        bce = pair_bce_loss(out["pair_pos"].float(), out["pair_neg"].float(), per_rank)
    else:  # no anchor with both a positive and a negative: keep the graph, add nothing
        bce = (out["pair_pos"].float().sum() + out["pair_neg"].float().sum()) * 0.0
    if out["cosface_targets"].numel():
        cosface = F.cross_entropy(out["cosface"].float(), out["cosface_targets"])
    else:  # no labelled image in this batch
        cosface = out["cosface"].float().sum() * 0.0
    loss = cfg.ms_weight * ms + cfg.pair_bce_weight * bce + cfg.cosface_weight * cosface
    return {"loss": loss, "ms": ms.detach(), "pair_bce": bce.detach(), "cosface": cosface.detach()}


def default_mining_group(cfg: TrainConfig) -> MiningGroup | None:
    """`cfg.mining_scope` over torch.distributed's default process group (None without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return mining_group(cfg.mining_scope, torch.distributed.get_rank(), torch.distributed.get_world_size())


def _patch_size(model: nn.Module) -> int:
    module = getattr(model, "module", model)  # DeepSpeed engine -> the SiameseMIM
    return module.encoder.patch_embed.patch_size[0]


# AdamW betas when `adam_betas` is not set: MAE's in stage 1 (placeforge's until the option existed),
# Pair-VPR's in stage 2 (pairvpr/training/train_stagetwo.py uses torch's defaults).
DEFAULT_ADAM_BETAS = {"pretrain": (0.9, 0.95), "finetune": (0.9, 0.999)}


def adam_betas(cfg: TrainConfig) -> tuple[float, float]:
    """(beta1, beta2) of the stage's AdamW: `cfg.optimizer.adam_betas`, else DEFAULT_ADAM_BETAS."""
    return tuple(cfg.optimizer.adam_betas) if cfg.optimizer.adam_betas is not None else DEFAULT_ADAM_BETAS[cfg.stage]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over layer-decay groups; the LR / weight decay in them are overwritten every step.

    Stage 1 with `layer_decay_over: encoder_decoder` counts the decoder's blocks in the depth
    (trainer.schedules.encoder_decoder_layer_id, Pair-VPR's rule)."""
    opt = cfg.optimizer
    prefix = "global_model.encoder." if hasattr(model, "global_model") else "encoder."  # FinetuneModel / SiameseMIM
    decoder_prefix = "decoder." if opt.layer_decay_over == "encoder_decoder" else None
    groups = layer_decay_groups(model, base_lr=opt.base_lr, layer_decay=opt.layer_decay, weight_decay=opt.weight_decay,
                                encoder_prefix=prefix, decoder_prefix=decoder_prefix,
                                patch_embed_lr_scale=opt.patch_embed_lr_scale)
    if opt.classifier_lr is not None or cfg.cosface_groups:
        groups = classifier_groups(model, groups, cfg)
    return torch.optim.AdamW(groups, lr=opt.base_lr, betas=adam_betas(cfg))


def cosface_parameters(model: nn.Module) -> list[tuple[int | None, nn.Parameter]]:
    """(CosPlace group or None, weight) of each CosFace classifier of a FinetuneModel."""
    if getattr(model, "cosface_groups", None) is not None:
        return [(g, head.weight) for g, head in enumerate(model.cosface_groups.classifiers)]
    head = getattr(model, "cosface", None)
    return [] if head is None else [(None, head.weight)]


def classifier_groups(model: nn.Module, groups: list[dict], cfg: TrainConfig) -> list[dict]:
    """`groups` with each CosFace classifier's weight moved into a parameter group of its own, at
    lr_scale classifier_lr / base_lr, so its LR follows the run's schedule at its own peak
    (MutualVPR: Adam at 1e-2 for the classifiers, 1e-5 for the model).  A CosPlace group's
    classifier is tagged with its group: `activate_cosface_group` zeroes the LR of the others."""
    heads = cosface_parameters(model)
    moved = {id(param) for _, param in heads}
    kept = [{**g, "params": [p for p in g["params"] if id(p) not in moved]} for g in groups]
    kept = [g for g in kept if g["params"]]
    opt = cfg.optimizer
    scale = (opt.classifier_lr if opt.classifier_lr is not None else opt.base_lr) / opt.base_lr
    for cosface_group, param in heads:
        if not param.requires_grad:
            continue
        kept.append({"params": [param], "lr": opt.base_lr * scale, "lr_scale": scale, "classifier_lr_scale": scale,
                     "weight_decay": opt.weight_decay, "wd_scale": 1.0, "layer_id": -1,
                     "cosface_group": -1 if cosface_group is None else cosface_group})
    return kept


def activate_cosface_group(model: nn.Module, optimizer: torch.optim.Optimizer, group: int) -> None:
    """Train CosPlace group `group`'s classifier only: the others get requires_grad off (no
    gradient, so torch's AdamW leaves them and their moments as they are) and LR 0 in `optimizer`
    (DeepSpeed's bf16 wrapper gives a parameter without a gradient a zero one; at LR 0 its step
    moves nothing).  Call before an epoch's first step; `set_optimizer_values` keeps the LR 0."""
    heads = model.cosface_groups
    if not 0 <= group < len(heads.classifiers):
        raise ValueError(f"group {group} has no classifier (0 .. {len(heads.classifiers) - 1})")
    heads.active = group
    for g, head in enumerate(heads.classifiers):
        head.weight.requires_grad_(g == group)
        if g != group:
            head.weight.grad = None
    for param_group in optimizer.param_groups:
        if param_group.get("cosface_group", -1) >= 0:
            on = param_group["cosface_group"] == group
            param_group["lr_scale"] = param_group["classifier_lr_scale"] if on else 0.0


def grow_cosface(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 num_classes: int) -> torch.optim.AdamW:
    """Grow `model.cosface` to `num_classes` rows and return a new AdamW over the model.

    Adam moments and step counts carry over for every parameter (the CosFace weight's new
    rows start with zero moments), so growing does not reset training.  This works when
    `optimizer` holds the real parameters (ZeRO 0); a ZeRO-1/2 optimizer keeps flat
    partitions instead, so pass None there and the new AdamW starts with fresh moments.
    """
    head: CosFaceClassifier = model.cosface
    old_weight = head.weight
    old_state = {} if optimizer is None else {id(p): s for p, s in optimizer.state.items()}
    head.grow(num_classes)
    new_optimizer = build_optimizer(model, cfg)
    for group in new_optimizer.param_groups:
        for param in group["params"]:
            source = old_weight if param is head.weight else param
            state = old_state.get(id(source))
            if not state:
                continue
            state = dict(state)
            if param is head.weight:
                rows = param.shape[0] - source.shape[0]
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.cat([state[key], state[key].new_zeros(rows, *state[key].shape[1:])])
            new_optimizer.state[param] = state
    return new_optimizer


def regroup_cosface(model: nn.Module, optimizer: torch.optim.Optimizer | None, cfg: TrainConfig,
                    group_class_ids: list) -> torch.optim.AdamW:
    """Give each CosPlace group's classifier the rows of a new label version's classes
    (models.heads.CosFaceGroups.regroup) and return a new AdamW over the model, the active group
    kept.  Adam moments and step counts carry over for every parameter and every kept row (new
    rows start with zero moments) when `optimizer` holds the real parameters (ZeRO 0, fp32), as
    `grow_cosface`; None: fresh moments."""
    heads = model.cosface_groups
    old_weights = [head.weight for head in heads.classifiers]
    old_state = {} if optimizer is None else {id(p): s for p, s in optimizer.state.items()}
    sources = heads.regroup(group_class_ids)
    for head in heads.classifiers:  # the optimizer is built over requires_grad parameters: all of them first
        head.weight.requires_grad_(True)
    new_optimizer = build_optimizer(model, cfg)
    replaced = {id(head.weight): (old, source) for head, old, source in zip(heads.classifiers, old_weights, sources)}
    for group in new_optimizer.param_groups:
        for param in group["params"]:
            old, source = replaced.get(id(param), (param, None))
            state = old_state.get(id(old))
            if not state:
                continue
            state = dict(state)
            if source is not None:
                kept = source >= 0
                for key in ("exp_avg", "exp_avg_sq"):
                    moments = state[key].new_zeros(param.shape)
                    moments[kept] = state[key][source[kept]]
                    state[key] = moments
            new_optimizer.state[param] = state
    activate_cosface_group(model, new_optimizer, heads.active)
    return new_optimizer
