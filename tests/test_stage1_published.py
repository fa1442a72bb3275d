"""Pair-VPR's stage 1 as published, piece by piece (csiro-robotics/Pair-VPR, commit fd764f9):

  * masking with the encoder's mask token over the full grid (pairvpr/models/dinov2.py calls
    DINOv2's prepare_tokens_with_masks; pairvpr/models/pairvpr.py decodes every token of image 1);
  * the last half of the encoder trained, embeddings frozen (num_trainable_blocks);
  * square-root LR scaling over places (pairvpr/utilities/config.py, sqrt_wrt_1024);
  * layer decay over encoder + decoder depth, patch embedding x 0.2 (pairvpr/utilities/param_groups.py);
  * AdamW betas (0.9, 0.999) (adamw_beta1 / adamw_beta2).

The expected values are computed here from those rules, not with the code under test.  The
last test trains with real DeepSpeed (CPU, gloo) in a subprocess, as tests/test_train.py does.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from placeforge.config import from_mapping
from placeforge.models.decoder import patch_grid, random_patch_mask
from placeforge.models.encoders import EncoderConfig
from placeforge.trainer.engine import adam_betas, build_optimizer
from placeforge.trainer.schedules import LR_SCALINGS, set_optimizer_values, sqrt_lr_for_places
from placeforge.trainer.sections import BatchGeometry, OptimizerConfig
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model, build_pretrain_model, load_mim, save_mim
from tests.test_dinov2_weights import VARIANTS, random_reference, write_official
from tests.test_train import data, pretrain_args, steps_of, train  # noqa: F401 - `data` is a fixture


def tiny_encoder(name: str = "vit_tiny_test", weights: str | None = None) -> EncoderConfig:
    return EncoderConfig(name, 56, 16, weights=weights)  # a 4 x 4 patch grid at patch 14


def tiny_stage1(encoder: str = "vit_tiny_test", weights: str | None = None, **overrides) -> TrainConfig:
    return TrainConfig(encoder=tiny_encoder(encoder, weights), decoder="dec64d2b", **overrides)


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def reference_tokens_before_blocks(encoder: nn.Module, x: torch.Tensor, masked: torch.Tensor,
                                   token: torch.Tensor) -> torch.Tensor:
    """DINOv2's prepare_tokens_with_masks on a timm ViT, by hand: patch projection, masked
    patches replaced by `token`, then positions, then prefix tokens.  -> [B, P + N, C]."""
    patches = encoder.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, C] row-major
    patches = torch.where(masked.unsqueeze(-1), token.reshape(1, 1, -1), patches)
    b = x.shape[0]
    cls = encoder.cls_token.expand(b, -1, -1)  # [B, 1, C]
    if encoder.no_embed_class:  # DINOv2 with registers in timm: positions for the patches only
        registers = encoder.reg_token.expand(b, -1, -1)
        return torch.cat([cls, registers, patches + encoder.pos_embed], dim=1)
    return torch.cat([cls + encoder.pos_embed[:, :1], patches + encoder.pos_embed[:, 1:]], dim=1)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("encoder", ["vit_tiny_test", "vit_tiny_reg4_dinov2_test"])
def test_mask_token_masking_equals_the_reference(encoder):
    torch.manual_seed(0)
    mim = build_pretrain_model(tiny_stage1(encoder, mim_masking="mask_token")).eval()
    token = mim.patch_mask_token()
    assert token is not None and torch.equal(token, torch.zeros_like(token))  # DINOv2's init: zeros
    with torch.no_grad():
        token.normal_()  # tell it apart from a zero patch
    x1, x2 = images(seed=1), images(seed=2)
    mask, keep_idx = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(3))
    enc = mim.encoder
    prefix = enc.num_prefix_tokens

    captured: list[torch.Tensor] = []
    hook = enc.blocks.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        pred = mim(x1, x2, keep_idx)
    hook.remove()

    with torch.no_grad():
        before = reference_tokens_before_blocks(enc, x1, mask, token)  # [B, P + N, C]
        positions = enc.pos_embed[0, -16:]  # [N, C] patch positions
        b, i = torch.nonzero(mask)[0].tolist()  # a masked patch: mask token + its position, nothing of the image
        torch.testing.assert_close(before[b, prefix + i], token[0] + positions[i])
        assert any(c.shape == before.shape and torch.allclose(c, before, atol=1e-6) for c in captured)
        tokens_1 = enc.norm(enc.blocks(before))[:, prefix:]  # [B, N, C], every patch
        tokens_2 = enc.forward_features(x2)[:, prefix:]  # image 2 whole
        dec = mim.decoder
        pos = dec.positions(patch_grid(enc, x1), x1.device)
        expected = dec.pixel_head(dec.run_blocks(dec.embed(tokens_1) + pos, dec.embed(tokens_2) + pos))
    torch.testing.assert_close(pred, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masking", ["drop", "mask_token"])
def test_masked_pixels_of_image_1_never_reach_the_prediction(masking):
    torch.manual_seed(0)
    mim = build_pretrain_model(tiny_stage1(mim_masking=masking)).eval()
    x1, x2 = images(seed=1), images(seed=2)
    mask, keep_idx = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(3))
    pixel_mask = mask.reshape(2, 1, 4, 1, 4, 1).expand(-1, 3, -1, 14, -1, 14).reshape(2, 3, 56, 56)
    with torch.no_grad():
        pred = mim(x1, x2, keep_idx)
        torch.testing.assert_close(mim(torch.where(pixel_mask, images(seed=4), x1), x2, keep_idx), pred)
        assert not torch.allclose(mim(torch.where(pixel_mask, x1, images(seed=4)), x2, keep_idx), pred)


def test_mask_token_comes_from_the_official_dinov2_file(tmp_path):
    assert VARIANTS["vit_tiny_reg4_dinov2_test"] == (4, False)  # Pair-VPR's layout: registers, no SwiGLU
    ref = random_reference("vit_tiny_reg4_dinov2_test")
    path = write_official(ref, tmp_path / "official.pth")
    cfg = tiny_stage1("vit_tiny_reg4_dinov2_test", weights=str(path), mim_masking="mask_token")
    mim = build_pretrain_model(cfg)
    assert mim.patch_mask_token() is mim.encoder.mask_token  # DINOv2's, not a new one
    assert torch.equal(mim.encoder.mask_token, ref.mask_token) and not torch.equal(ref.mask_token, 0 * ref.mask_token)
    assert "mask_token" not in dict(mim.named_parameters())


def test_a_stage1_mask_token_of_its_own_does_not_block_stage2(tmp_path):
    stage1 = tiny_stage1(mim_masking="mask_token")  # a plain ViT: the model carries the token
    mim = build_pretrain_model(stage1)
    assert "mask_token" in mim.state_dict() and not hasattr(mim.encoder, "mask_token")
    export = save_mim(mim, stage1, tmp_path / "mim_epoch0000.pt")
    stage2 = TrainConfig(stage="finetune", encoder=tiny_encoder(), decoder="dec64d2b", init_from=str(export))
    model = build_finetune_model(stage2, num_classes=1)
    assert torch.equal(model.global_model.encoder.blocks[0].attn.qkv.weight, mim.encoder.blocks[0].attn.qkv.weight)
    load_mim(build_pretrain_model(stage1), export)  # and a stage-1 model of the same recipe takes it whole


# ---------------------------------------------------------------- trained blocks


@pytest.mark.parametrize("masking", ["drop", "mask_token"])
def test_last_blocks_train_and_nothing_before_them_gets_a_gradient(masking):
    torch.manual_seed(0)
    mim = build_pretrain_model(tiny_stage1(mim_masking=masking, mim_trainable_last_blocks=2))  # 2 of 4
    mask, keep_idx = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(3))
    mim(images(seed=1), images(seed=2), keep_idx).square().mean().backward()
    expected = {n for n, _ in mim.named_parameters()
                if n.startswith(("encoder.blocks.2.", "encoder.blocks.3.", "encoder.norm.", "decoder."))}
    if masking == "mask_token":
        expected.discard("decoder.mask_token")  # not read when the encoder masks
    trainable = {n for n, p in mim.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in mim.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == expected
    assert with_grad == expected  # every trained parameter learns; nothing frozen gets a gradient


@pytest.mark.parametrize("masking", ["drop", "mask_token"])
def test_every_parameter_trains_by_default(masking):
    torch.manual_seed(0)
    mim = build_pretrain_model(tiny_stage1(mim_masking=masking))
    mask, keep_idx = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(3))
    mim(images(seed=1), images(seed=2), keep_idx).square().mean().backward()
    trainable = {n for n, p in mim.named_parameters() if p.requires_grad}
    unused = {"decoder.mask_token"} if masking == "mask_token" else set()
    assert trainable == {n for n, _ in mim.named_parameters()} - unused
    assert all(mim.get_parameter(n).grad is not None for n in trainable)
    if masking == "mask_token":
        assert "mask_token" in trainable  # the model's own token trains with the embeddings


# ---------------------------------------------------------------- LR scaling, layer decay, betas


def test_sqrt_scaling_over_places():
    assert sqrt_lr_for_places(3e-4, 512) == pytest.approx(3e-4 / math.sqrt(2))  # 2.12e-4, Pair-VPR's 512
    assert sqrt_lr_for_places(3e-4, 1024) == pytest.approx(3e-4)
    cfg = tiny_stage1(batch=BatchGeometry(pairs_per_batch=64), optimizer=OptimizerConfig(lr_scaling="sqrt_places"))
    assert cfg.peak_lr(world_size=8) == pytest.approx(3e-4 * math.sqrt(64 * 8 / 1024))  # places, not images
    assert cfg.peak_lr(world_size=2) == pytest.approx(3e-4 * math.sqrt(128 / 1024))
    linear = tiny_stage1(batch=BatchGeometry(pairs_per_batch=64))  # the default: images, linearly
    assert linear.peak_lr(world_size=8) == pytest.approx(3e-4 * 2 * 64 * 8 / 1024)
    stage2 = TrainConfig(stage="finetune", batch=BatchGeometry(places_per_batch=20),
                         optimizer=OptimizerConfig(base_lr=1e-4, lr_scaling="sqrt_places"))
    assert stage2.peak_lr(world_size=5) == pytest.approx(1e-4 * math.sqrt(100 / 1024))
    assert TrainConfig(optimizer=OptimizerConfig(lr_scaling="none", base_lr=5e-4)).peak_lr(world_size=8) == 5e-4


def test_every_lr_scaling_name_is_a_config_choice():
    from typing import get_args, get_type_hints

    assert set(get_args(get_type_hints(OptimizerConfig)["lr_scaling"])) == set(LR_SCALINGS)
    assert TrainConfig().optimizer.lr_scaling == "linear"  # what older runs trained with


def pair_vpr_lr_scale(local: str, part: str, enc_depth: int, dec_depth: int, decay: float) -> float:
    """Pair-VPR's get_vit_lr_decay_rate (param_groups.py) written out for one parameter name."""
    if part == "encoder":
        if local.startswith("blocks."):
            layer = int(local.split(".")[1]) + 1
        elif local.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
            layer = 0
        else:  # final norm
            layer = enc_depth
    elif local.startswith("blocks."):
        layer = enc_depth + int(local.split(".")[1]) + 1
    else:
        layer = {"embed": enc_depth, "norm": enc_depth + dec_depth, "pixel_head": enc_depth + dec_depth + 1,
                 "mask_token": 0}[local.split(".")[0]]
    scale = decay ** (enc_depth + dec_depth + 1 - layer)
    return scale * 0.2 if local.startswith("patch_embed") else scale


def test_encoder_decoder_layer_decay_follows_pair_vpr_for_every_parameter():
    torch.manual_seed(0)
    cfg = tiny_stage1(optimizer=OptimizerConfig(layer_decay=0.8, layer_decay_over="encoder_decoder",
                                                patch_embed_lr_scale=0.2))
    mim = build_pretrain_model(cfg)  # everything trains: embeddings too
    optimizer = build_optimizer(mim, cfg)
    set_optimizer_values(optimizer, lr=1.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in mim.named_parameters():
        part, local = name.split(".", 1)
        expected = pair_vpr_lr_scale(local, part, 4, 2, 0.8)
        assert lr_of[id(param)] == pytest.approx(expected, rel=1e-12), name
    assert lr_of[id(mim.decoder.pixel_head.weight)] == 1.0
    assert lr_of[id(mim.decoder.blocks[1].mlp.fc1.weight)] == pytest.approx(0.8)  # top decoder block
    assert lr_of[id(mim.encoder.blocks[3].mlp.fc1.weight)] == pytest.approx(0.8 ** 3)  # top encoder block
    assert lr_of[id(mim.encoder.patch_embed.proj.weight)] == pytest.approx(0.2 * 0.8 ** 7)


def test_layer_decay_over_the_encoder_stays_as_before():
    torch.manual_seed(0)
    cfg = tiny_stage1(optimizer=OptimizerConfig(layer_decay=0.8))
    mim = build_pretrain_model(cfg)
    optimizer = build_optimizer(mim, cfg)
    set_optimizer_values(optimizer, lr=1.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(mim.decoder.blocks[0].mlp.fc1.weight)] == 1.0
    assert lr_of[id(mim.encoder.norm.weight)] == 1.0
    assert lr_of[id(mim.encoder.blocks[3].mlp.fc1.weight)] == pytest.approx(0.8)
    assert lr_of[id(mim.encoder.patch_embed.proj.weight)] == pytest.approx(0.8 ** 5)


def test_betas_reach_the_optimizer():
    published = tiny_stage1(optimizer=OptimizerConfig(adam_betas=(0.9, 0.999)))
    model = build_pretrain_model(published)
    assert all(g["betas"] == (0.9, 0.999) for g in build_optimizer(model, published).param_groups)
    assert adam_betas(tiny_stage1()) == (0.9, 0.95)  # unset: stage 1 as before the option
    assert adam_betas(TrainConfig(stage="finetune")) == (0.9, 0.999)
    from_yaml = from_mapping(TrainConfig, {"optimizer": {"adam_betas": [0.9, 0.98]}})  # a YAML list
    assert from_yaml.optimizer.adam_betas == (0.9, 0.98)
    with pytest.raises(ValueError, match="optimizer.adam_betas"):
        from_mapping(TrainConfig, {"optimizer": {"adam_betas": "0.9"}})
    with pytest.raises(ValueError, match="encoder_decoder needs stage pretrain"):
        TrainConfig(stage="finetune", optimizer=OptimizerConfig(layer_decay_over="encoder_decoder")).validate()


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_stage1_as_published_trains_with_deepspeed(data, tmp_path):  # noqa: F811 - the fixture
    """mask_token masking, the last 2 of 4 blocks, layer decay over encoder + decoder, betas
    (0.9, 0.999), no clipping: the loss is finite, the frozen blocks end as they started and
    the trained ones moved; the checkpoint's AdamW carries the betas."""
    out = tmp_path / "pre"
    train(pretrain_args(data, out, "--epochs", "1", "--max-steps-per-epoch", "3", "--mim-masking", "mask_token",
                        "--mim-trainable-last-blocks", "2", "--optimizer.layer-decay", "0.9",
                        "--optimizer.layer-decay-over", "encoder_decoder", "--optimizer.patch-embed-lr-scale", "0.2",
                        "--optimizer.adam-betas", "0.9,0.999", "--optimizer.clip-grad", "0"))
    rows = steps_of(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    cfg = from_mapping(TrainConfig, json.loads((out / "train_config.json").read_text()))
    assert (cfg.mim_masking, cfg.mim_trainable_last_blocks, cfg.optimizer.adam_betas) == ("mask_token", 2, (0.9, 0.999))
    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    start = build_pretrain_model(cfg).state_dict()
    end = torch.load(out / "export" / "mim_epoch0000.pt", weights_only=True)["state_dict"]
    for name in ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "encoder.cls_token", "mask_token",
                 "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.1.mlp.fc2.weight", "decoder.mask_token"):
        assert torch.equal(end[name], start[name]), f"{name} is frozen but changed"
    for name in ("encoder.blocks.2.attn.qkv.weight", "encoder.blocks.3.mlp.fc2.weight", "encoder.norm.weight",
                 "decoder.blocks.0.self_attn.q.weight", "decoder.pixel_head.weight"):
        assert not torch.equal(end[name], start[name]), f"{name} trains but did not change"
    states = torch.load(out / "checkpoints" / "epoch0001-step0" / "mp_rank_00_model_states.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in states["optimizer"]["param_groups"]} == {(0.9, 0.999)}
