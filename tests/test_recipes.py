"""Every shipped recipe in configs/: loads as the trainer loads it, builds on the meta device,
and trains what the published method trains, with the LRs and DeepSpeed settings it says.

Models are built as trainer.memory_model builds them (`build_on_meta`: shapes only, no
weights file read), so ViT-g's ~1.1 B parameters cost no memory and the whole file runs in
seconds.  The published numbers are Pair-VPR's official configs (csiro-robotics/Pair-VPR,
commit fd764f9, the paths in PAIR_VPR) and MutualVPR's official code (Gucci233/MutualVPR,
commit bd373c6, the paths in MUTUALVPR); docs/recipes.md puts them beside the recipes.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
from torch import nn

from placeforge.config import config_from_args
from placeforge.models.adapters import is_adapter_parameter
from placeforge.models.encoders import encoder_spec
from placeforge.trainer.engine import build_optimizer
from placeforge.trainer.memory_model import build_on_meta, model_encoder
from placeforge.trainer.schedules import set_optimizer_values
from placeforge.trainer.train import build_parser
from placeforge.trainer.train_config import TrainConfig, deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(path.stem for path in CONFIGS.glob("*.yaml"))
WORLD_SIZE = 8  # the DeepSpeed config is checked for one 8-GPU node

# Encoder parameters as published: DINOv2's README (facebookresearch/dinov2, "# of params":
# ViT-B/14 86 M, ViT-L/14 300 M, ViT-g/14 1,100 M), rounded there, and the meta build differs a
# little more: its position embedding is resized to the recipe's grid (16 x 16 at 224 px, 23 x 23
# at 322 px, not 37 x 37) and it adds 4 registers and the mask token.  The demo preset has no
# published size: 826,496 is counted by hand for a plain ViT, width C = 128, 4 blocks, 8-px patches
# at 64 px: patch projection 3 x 8 x 8 x C + C, class token C, positions 65 C, per block
# 12 C^2 + 13 C (qkv, proj, fc1, fc2 with biases; two LayerNorms), final norm 2 C.
ENCODER_PARAMS = {
    "vit_base_patch14_reg4_dinov2": (86e6, 0.05),
    "vit_large_patch14_reg4_dinov2": (300e6, 0.05),
    "vit_giant_patch14_reg4_dinov2": (1100e6, 0.05),
    "vit_base_patch14_dinov2": (86e6, 0.05),
    "vit_w128_d4_patch8": (826_496, 0.0),
}
# MutualVPR's MulConv adapters at width C = 768, counted by hand per block (models.adapters): Linear C -> C/2
# and C/2 -> C with biases (295,296 + 295,680); 1x1 384 -> 192 (73,920); twice 1x1 384 -> 24 (9,240);
# 3x3 24 -> 96 (20,832); 5x5 24 -> 96 (57,696); a BatchNorm (2 per channel) after each convolution
# (2 x (192 + 24 + 96 + 24 + 96) = 864).  762,768 per block, 12 blocks.
MULCONV_PARAMS_VITB = 12 * 762_768

_ONE = "pairvpr/configs/stageone_default_config.yaml"
_TWO = "pairvpr/configs/stagetwo_default_config.yaml"

# Pair-VPR's published settings where placeforge keeps them (the deviations are in each recipe's
# comments and docs/recipes.md).  `global_items`: places per optimizer step over all GPUs, and
# `gpus` the GPU count the recipe is laid out for (its per-rank batch x gpus = the published batch).
PAIR_VPR = {
    "pretrain_vitb": dict(source=_ONE, encoder="vit_base_patch14_reg4_dinov2", global_items=512, gpus=8,
                          epochs=500, mim_trainable_last_blocks=6, **{"optimizer.layer_decay": 0.9}),
    "pretrain_vitl": dict(source="pairvpr/configs/stageone_vitl_config.yaml",
                          encoder="vit_large_patch14_reg4_dinov2", global_items=512, gpus=4, epochs=1000,
                          mim_trainable_last_blocks=12, **{"optimizer.layer_decay": 0.95}),
    "pretrain_vitg": dict(source="pairvpr/configs/stageone_vitg_config.yaml",
                          encoder="vit_giant_patch14_reg4_dinov2", global_items=512, gpus=8, epochs=1000,
                          mim_trainable_last_blocks=20, **{"optimizer.layer_decay": 0.95}),
    "finetune_vitb": dict(source=_TWO, encoder="vit_base_patch14_reg4_dinov2", global_items=100, gpus=1),
    "finetune_vitl": dict(source="pairvpr/configs/stagetwo_vitl_config.yaml",
                          encoder="vit_large_patch14_reg4_dinov2", global_items=98, gpus=7),
    "finetune_vitg": dict(source="pairvpr/configs/stagetwo_vitg_config.yaml",
                          encoder="vit_giant_patch14_reg4_dinov2", global_items=96, gpus=8),
}
# The same in every size (the size-specific files override only what the table above lists).
STAGE_ONE = {"encoder.image_size": 224, "encoder.descriptor_dim": 512, "decoder": "dec768d12b",  # _ONE
             "mask_ratio": 0.9, "optimizer.base_lr": 3e-4, "optimizer.min_lr": 1e-6, "optimizer.warmup_epochs": 10,
             "optimizer.weight_decay": 0.04, "optimizer.weight_decay_end": 0.4,
             # The mask token over the full grid (pairvpr/models/dinov2.py), sqrt_wrt_1024 over places
             # (pairvpr/utilities/config.py), layer decay over encoder + decoder with patch_embed_lr_mult
             # 0.2 (pairvpr/utilities/param_groups.py), adamw_beta1 / adamw_beta2, and no clipping
             # (train_stageone.py never passes clip_grad to its loss scaler).
             "mim_masking": "mask_token", "optimizer.lr_scaling": "sqrt_places",
             "optimizer.layer_decay_over": "encoder_decoder", "optimizer.patch_embed_lr_scale": 0.2,
             "optimizer.adam_betas": (0.9, 0.999), "optimizer.clip_grad": 0.0}
# The LR of the top trained encoder block at the published 512 places: 3e-4 x sqrt(512 / 1024) x
# layer_decay ** 13 (12 decoder blocks above it, and its own), as docs/recipes.md's table gives it.
TOP_TRAINED_BLOCK_LR = {"pretrain_vitb": 5.4e-5, "pretrain_vitl": 1.09e-4, "pretrain_vitg": 1.09e-4}
STAGE_TWO = {"encoder.image_size": 322, "encoder.descriptor_dim": 512, "encoder.pooling": "cls",  # _TWO
             "decoder": "dec768d12b", "batch.images_per_place": 4, "trainable_last_blocks": 6, "epochs": 10,
             "optimizer.base_lr": 8e-5, "optimizer.lr_scaling": "none", "optimizer.warmup_epochs": 0,
             "optimizer.weight_decay": 0.05, "optimizer.weight_decay_end": 0.05, "optimizer.layer_decay": 1.0,
             "pair_bce_weight": 2.0, "mining_scope": "global",
             # Pair-VPR's losses and schedule (train_stagetwo.py): places as positives, no CosFace, no
             # reclustering, no clipping, LinearLR from 1 to 0.2 x the LR.
             "positives": "place", "cosface_weight": 0.0, "recluster_every_epochs": 0, "optimizer.clip_grad": 0.0,
             "optimizer.lr_schedule": "linear", "optimizer.min_lr": pytest.approx(0.2 * 8e-5)}
# MutualVPR's published settings (Gucci233/MutualVPR at bd373c6) where placeforge keeps them; docs/recipes.md
# ("Recipe against MutualVPR") names the deviations.
_MV_ARGS = "myparser.py (defaults)"
MUTUALVPR = {
    "mutualvpr_vitb": {
        "encoder.name": ("vit_base_patch14_dinov2", "train.py: dinov2_vitb14_pretrain.pth, vit_base, no registers"),
        "encoder.weights": ("weights/dinov2_vitb14_pretrain.pth", "train.py: foundation_model_path"),
        "encoder.adapter": ("mulconv", "backbone/dinov2/block.py; train.py freezes all but 'adapter' parameters"),
        "trainable_last_blocks": (0, "train.py: no DINOv2 weight trains"),
        "encoder.pooling": ("gem", "cosplace_model/cosplace_network.py MutualVPR: L2Norm, GeM, Linear, L2Norm"),
        "encoder.descriptor_dim": (512, f"{_MV_ARGS} --fc_output_dim"),
        "encoder.image_size": (504, f"{_MV_ARGS} --image_size"),
        "pair_classifier": (False, "train.py: CosFace alone"),
        "ms_weight": (0.0, "train.py: CrossEntropyLoss over the classifier's logits only"),
        "pair_bce_weight": (0.0, "train.py"),
        "cosface_weight": (1.0, "train.py"),
        "cosface_scale": (60.0, "cosface_loss.py MarginCosineProduct s=60.0"),
        "cosface_margin": (0.5, "cosface_loss.py MarginCosineProduct m=0.50"),
        "cosface_groups": (8, f"{_MV_ARGS} --groups_num"),
        "batch.places_per_batch": (32, f"{_MV_ARGS} --batch_size"),
        "batch.images_per_place": (1, "datasets/train_dataset.py __getitem__: one image of each sampled class"),
        "augment.pipeline": ("crop_jitter", "train.py gpu_augmentation: ColorJitter, RandomResizedCrop"),
        "augment.scale": ((0.5, 1.0), f"{_MV_ARGS} --random_resized_crop 0.5: scale [0.5, 1]"),
        "augment.brightness": (0.7, f"{_MV_ARGS} --brightness"),
        "augment.contrast": (0.7, f"{_MV_ARGS} --contrast"),
        "augment.saturation": (0.7, f"{_MV_ARGS} --saturation"),
        "augment.hue": (0.5, f"{_MV_ARGS} --hue"),
        "epochs": (50, f"{_MV_ARGS} --epochs_num"),
        "max_steps_per_epoch": (10_000, f"{_MV_ARGS} --iterations_per_epoch"),
        "optimizer.base_lr": (1e-5, f"{_MV_ARGS} --lr"),
        "optimizer.classifier_lr": (1e-2, f"{_MV_ARGS} --classifiers_lr"),
        "optimizer.lr_scaling": ("none", "train.py: Adam(lr=args.lr)"),
        "optimizer.lr_schedule": ("cosine", "train.py: CosineAnnealingLR(T_max=50)"),
        "optimizer.min_lr": (0.0, "train.py: CosineAnnealingLR's eta_min 0"),
        "optimizer.warmup_epochs": (0, "train.py"),
        "optimizer.weight_decay": (0.0, "train.py: torch.optim.Adam, no weight decay"),
        "optimizer.weight_decay_end": (0.0, "train.py"),
        "optimizer.layer_decay": (1.0, "train.py: one LR for the model"),
        "optimizer.adam_betas": ((0.9, 0.999), "train.py: torch's Adam defaults"),
        "optimizer.clip_grad": (0.0, "train.py: no clipping"),
        "recluster_every_epochs": (1, "train.py: K-means before every epoch"),
    },
}
# What the cluster needs (issue 11, item 7), not in Pair-VPR (it trains ViT-g with fp16 autocast
# under DDP / DataParallel): ZeRO-2 for ViT-g.
ZERO_STAGE = {"pretrain_vitg": 2, "finetune_vitg": 2}


def setting(cfg: TrainConfig, path: str):
    """The value at a dotted path (`augment.hue`: cfg.augment.hue)."""
    return functools.reduce(getattr, path.split("."), cfg)


def load_recipe(name: str) -> TrainConfig:
    """The recipe resolved as `trainer/train.py --config configs/NAME.yaml` resolves it (validated)."""
    return config_from_args(TrainConfig, build_parser().parse_args(["--config", str(CONFIGS / f"{name}.yaml")]))


@functools.cache
def built(name: str) -> tuple[TrainConfig, nn.Module]:
    """The recipe's training model on the meta device, as the memory model and bench_gpu build it:
    no file is read, so the DINOv2 files the recipes name need not exist here."""
    cfg = load_recipe(name)
    return cfg, build_on_meta(cfg, num_classes=16)


def trained_blocks(encoder: nn.Module) -> list[int]:
    return [i for i, block in enumerate(encoder.blocks) if any(p.requires_grad for p in block.parameters())]


def test_every_size_of_pair_vpr_ships_and_every_shipped_recipe_is_checked():
    assert set(PAIR_VPR) <= set(RECIPES), f"missing recipes: {sorted(set(PAIR_VPR) - set(RECIPES))}"
    assert {"demo_pretrain", "demo_finetune"} <= set(RECIPES)
    unchecked = [n for n in RECIPES if n.endswith(("_vitb", "_vitl", "_vitg")) and n not in {**PAIR_VPR, **MUTUALVPR}]
    assert not unchecked, f"add the published settings of {unchecked} to PAIR_VPR or MUTUALVPR"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_names_its_weights_file(name, caplog):
    cfg = load_recipe(name)
    assert "is now" not in caplog.text, f"{name} uses an old key: {caplog.text}"  # shipped recipes are current
    release = encoder_spec(cfg.encoder.name).release_file
    if release is not None:  # a DINOv2 preset: the official file, under weights/, never downloaded
        assert cfg.encoder.weights == f"weights/{release}" and cfg.encoder_init == "pretrained"
    if name in PAIR_VPR:
        published = PAIR_VPR[name]
        assert cfg.encoder.name == published["encoder"]
        same = STAGE_ONE if cfg.stage == "pretrain" else STAGE_TWO
        size_specific = {k: published[k] for k in ("epochs", "optimizer.layer_decay", "mim_trainable_last_blocks")
                         if k in published}
        for key, value in {**same, **size_specific}.items():
            assert setting(cfg, key) == value, f"{name}: {key} {setting(cfg, key)!r}, {published['source']}: {value!r}"
        per_rank = cfg.batch.pairs_per_batch if cfg.stage == "pretrain" else cfg.batch.places_per_batch
        assert per_rank * published["gpus"] == published["global_items"]
    for key, (value, source) in MUTUALVPR.get(name, {}).items():
        assert setting(cfg, key) == value, f"{name}: {key} {setting(cfg, key)!r}, MutualVPR {source}: {value!r}"


@pytest.mark.parametrize("name", RECIPES)
def test_encoder_has_its_published_size(name):
    cfg, model = built(name)
    expected, tolerance = ENCODER_PARAMS[cfg.encoder.name]
    params = dict(model_encoder(model).named_parameters())
    count = sum(p.numel() for n, p in params.items() if not is_adapter_parameter(n))
    assert abs(count - expected) <= tolerance * expected, \
        f"{cfg.encoder.name}: {count:,} parameters, expected {expected:,}"
    adapters = sum(p.numel() for n, p in params.items() if is_adapter_parameter(n))
    assert adapters == (MULCONV_PARAMS_VITB if cfg.encoder.adapter == "mulconv" else 0)


@pytest.mark.parametrize("name", RECIPES)
def test_trainable_encoder_blocks(name):
    cfg, model = built(name)
    encoder = model_encoder(model)
    if cfg.encoder.adapter == "mulconv":  # MutualVPR: of the encoder, the adapters and nothing else
        trained = {n for n, p in encoder.named_parameters() if p.requires_grad}
        assert trained and trained == {n for n, _ in encoder.named_parameters() if is_adapter_parameter(n)}
        assert all(".mlp.adapter." in n for n in trained) and len({n.split(".")[1] for n in trained}) == 12
        return
    depth = len(encoder.blocks)
    last = cfg.mim_trainable_last_blocks if cfg.stage == "pretrain" else cfg.trainable_last_blocks
    expected = list(range(depth)) if last < 0 else list(range(max(0, depth - last), depth))
    blocks = trained_blocks(encoder)
    assert blocks == expected
    for block in set(range(depth)) - set(blocks):  # a frozen block is frozen whole
        assert not any(p.requires_grad for p in encoder.blocks[block].parameters())
    if last >= 0:  # embeddings run without gradients; the final norm trains
        embeddings = [p for n, p in encoder.named_parameters() if n.startswith(("patch_embed", "cls_token",
                                                                                "reg_token", "pos_embed", "mask_token"))]
        assert embeddings and not any(p.requires_grad for p in embeddings)
        assert all(p.requires_grad for p in encoder.norm.parameters())
    if name in PAIR_VPR and cfg.stage == "finetune":
        assert len(blocks) == 6  # num_trainable_blocks: 6 for B, L and G (stagetwo_*_config.yaml)
    if name in PAIR_VPR and cfg.stage == "pretrain":
        assert len(blocks) == depth // 2  # num_trainable_blocks: 6 / 12 / 20 of 12 / 24 / 40 (stageone_*)
        assert not model.decoder.mask_token.requires_grad  # the encoder's mask token hides the patches


@pytest.mark.parametrize("name", RECIPES)
def test_deepspeed_config(name):
    cfg = load_recipe(name)
    ds = deepspeed_config(cfg, world_size=WORLD_SIZE, device_type="cuda")
    batch = cfg.batch
    micro = batch.pairs_per_batch if cfg.stage == "pretrain" else batch.places_per_batch * batch.images_per_place
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["train_batch_size"] == micro * WORLD_SIZE and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == ZERO_STAGE.get(name, 0) == cfg.zero_stage
    assert ds["gradient_clipping"] == cfg.optimizer.clip_grad
    if name.endswith("_vitg"):
        assert cfg.precision == "bf16"  # also on a machine where "auto" would not pick it


def parameter_lrs(model: nn.Module, cfg: TrainConfig, peak_lr: float) -> dict[str, float]:
    """Parameter name -> the LR the trainer's AdamW gives it at the schedule's peak."""
    optimizer = build_optimizer(model, cfg)
    set_optimizer_values(optimizer, lr=peak_lr)  # the one place the trainer writes LRs
    group_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters() if id(p) in group_of}


def published_peak_lr(cfg: TrainConfig, gpus: int) -> float:
    """The schedule's peak LR by each rule's own formula: linear over images, Pair-VPR's
    sqrt_wrt_1024 over places (pairvpr/utilities/config.py), or the base LR."""
    if cfg.optimizer.lr_scaling == "linear":
        return cfg.optimizer.base_lr * cfg.images_per_rank_step() * gpus / 1024
    if cfg.optimizer.lr_scaling == "sqrt_places":
        places = (cfg.batch.pairs_per_batch if cfg.stage == "pretrain" else cfg.batch.places_per_batch) * gpus
        return cfg.optimizer.base_lr * math.sqrt(places / 1024)
    return cfg.optimizer.base_lr


def lr_exponent(local: str, part: str, enc_depth: int, dec_depth: int) -> int:
    """layer_decay's exponent of a parameter (`local` name within the encoder or the decoder
    `part`) under decay over encoder + decoder depth, as Pair-VPR numbers layers
    (pairvpr/utilities/param_groups.py): total depth + 1 - layer id."""
    if part == "encoder":
        if local.startswith("blocks."):
            layer = int(local.split(".")[1]) + 1
        elif local.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
            layer = 0
        else:  # the final norm sits with the top block
            layer = enc_depth
    elif local.startswith("blocks."):
        layer = enc_depth + int(local.split(".")[1]) + 1
    else:
        layer = {"embed": enc_depth, "norm": enc_depth + dec_depth, "pixel_head": enc_depth + dec_depth + 1}[
            local.split(".")[0]]
    return enc_depth + dec_depth + 1 - layer


@pytest.mark.parametrize("name", RECIPES)
def test_effective_lr_per_parameter(name):
    """Decay over the encoder: top layer (encoder norm, decoder, heads) the peak LR, encoder
    block b of D peak x layer_decay ** (D - b), embeddings and tokens peak x layer_decay ** (D + 1).
    Over encoder + decoder (Pair-VPR's stage 1): `lr_exponent`.  The patch embedding also x
    patch_embed_lr_scale."""
    cfg, model = built(name)
    gpus = PAIR_VPR[name]["gpus"] if name in PAIR_VPR else 1
    peak = published_peak_lr(cfg, gpus)
    assert cfg.peak_lr(gpus) == pytest.approx(peak, rel=1e-12)  # what the trainer's schedule starts from
    lrs = parameter_lrs(model, cfg, peak)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lrs) == trainable  # frozen parameters are in no group

    prefix = "global_model.encoder." if cfg.stage == "finetune" else "encoder."
    depth = len(model_encoder(model).blocks)
    for param_name, lr in lrs.items():
        local = param_name[len(prefix):] if param_name.startswith(prefix) else None
        if cfg.optimizer.layer_decay_over == "encoder_decoder":
            part, rest = ("encoder", local) if local is not None else param_name.split(".", 1)
            exponent = lr_exponent(rest, part, depth, len(model.decoder.blocks))
        elif local is not None and local.startswith("blocks."):
            exponent = depth - int(local.split(".")[1])
        elif local is not None and local.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed")):
            exponent = depth + 1
        else:
            exponent = 0
        opt = cfg.optimizer
        scale = opt.patch_embed_lr_scale if local is not None and local.startswith("patch_embed") else 1.0
        if param_name.startswith(("cosface.", "cosface_groups.")) and opt.classifier_lr is not None:
            scale = opt.classifier_lr / opt.base_lr  # the classifiers' own peak (MutualVPR: 1e-2 vs 1e-5)
        assert lr == pytest.approx(peak * opt.layer_decay ** exponent * scale, rel=1e-12), param_name

    if name in PAIR_VPR and cfg.stage == "pretrain":
        assert peak == pytest.approx(2.12e-4, rel=1e-3)  # 3e-4 x sqrt(512 / 1024), docs/recipes.md
        top = depth - 1
        assert lrs[f"encoder.blocks.{top}.mlp.fc1.weight"] == pytest.approx(TOP_TRAINED_BLOCK_LR[name], rel=5e-3)
        assert lrs["encoder.norm.weight"] == lrs[f"encoder.blocks.{top}.mlp.fc1.weight"]  # with the top block
        assert lrs["decoder.embed.weight"] == lrs[f"encoder.blocks.{top}.mlp.fc1.weight"]
        assert lrs["decoder.blocks.11.mlp.fc1.weight"] == pytest.approx(peak * cfg.optimizer.layer_decay)  # top block
        assert lrs["decoder.norm.weight"] == pytest.approx(peak * cfg.optimizer.layer_decay)
        assert lrs["decoder.pixel_head.weight"] == pytest.approx(peak)
        first_trained = depth - PAIR_VPR[name]["mim_trainable_last_blocks"]
        assert f"encoder.blocks.{first_trained - 1}.mlp.fc1.weight" not in lrs  # frozen: in no group
        assert "encoder.patch_embed.proj.weight" not in lrs  # x 0.2 in Pair-VPR too, but frozen there and here
    if name in PAIR_VPR and cfg.stage == "finetune":
        assert all(lr == pytest.approx(8e-5) for lr in lrs.values())  # one AdamW LR (train_stagetwo.py)
    if name in MUTUALVPR:  # Adam 1e-5 for the model, 1e-2 for each group's classifier (train.py)
        heads = {n for n in lrs if n.startswith("cosface_groups.")}
        assert len(heads) == 8 and all(lrs[n] == pytest.approx(1e-2) for n in heads)
        assert all(lr == pytest.approx(1e-5) for n, lr in lrs.items() if n not in heads)


@pytest.mark.parametrize("name", RECIPES)
def test_adam_betas(name):
    cfg, model = built(name)
    betas = {tuple(g["betas"]) for g in build_optimizer(model, cfg).param_groups}
    if name in PAIR_VPR:
        assert betas == {(0.9, 0.999)}  # adamw_beta1 / adamw_beta2 (stage 1); torch's defaults (stage 2)
    else:  # the other recipes set none: MAE's in stage 1, as before the option existed
        assert betas == {(0.9, 0.95) if cfg.stage == "pretrain" else (0.9, 0.999)}
