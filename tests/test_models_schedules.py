"""Learning-rate and weight-decay schedules, and the layer-decay parameter groups."""

from __future__ import annotations

import pytest
import torch

from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.trainer.schedules import (
    base_lr_for_batch,
    cosine_with_warmup,
    layer_decay_groups,
    set_optimizer_values,
    weight_decay_schedule,
)


def test_cosine_with_warmup_at_its_landmarks():
    base, final = 1e-3, 1e-6
    assert cosine_with_warmup(0, 100, 10, base, final) == 0.0
    assert cosine_with_warmup(5, 100, 10, base, final) == pytest.approx(5e-4)
    assert cosine_with_warmup(10, 100, 10, base, final) == pytest.approx(base)
    assert cosine_with_warmup(55, 100, 10, base, final) == pytest.approx((base + final) / 2)  # half-way down
    assert cosine_with_warmup(100, 100, 10, base, final) == pytest.approx(final)
    assert cosine_with_warmup(150, 100, 10, base, final) == pytest.approx(final)
    assert cosine_with_warmup(0, 100, 0, base, final) == pytest.approx(base)


def test_weight_decay_schedule_and_batch_scaling():
    assert weight_decay_schedule(0, 1000) == pytest.approx(0.04)
    assert weight_decay_schedule(500, 1000) == pytest.approx(0.22)
    assert weight_decay_schedule(1000, 1000) == pytest.approx(0.4)
    assert base_lr_for_batch(3e-4, 512) == pytest.approx(1.5e-4)


def test_layer_decay_scales_and_no_decay():
    torch.manual_seed(0)
    model = build_model(EncoderConfig(name="vit_tiny_test", image_size=112))  # depth 4
    for p in model.encoder.blocks[0].parameters():
        p.requires_grad_(False)  # frozen blocks are left out
    groups = layer_decay_groups(model, base_lr=1.0, layer_decay=0.5, weight_decay=0.05)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(where)
    scale = {n: where[id(p)]["lr_scale"] for n, p in trainable}
    decay = {n: where[id(p)]["weight_decay"] for n, p in trainable}
    assert scale["encoder.pos_embed"] == scale["encoder.cls_token"] == scale["encoder.patch_embed.proj.weight"]
    assert scale["encoder.cls_token"] == pytest.approx(0.5 ** 5)  # embeddings: decay ** (depth + 1)
    assert scale["encoder.blocks.1.attn.qkv.weight"] == pytest.approx(0.5 ** 3)  # block 1 of 4
    assert scale["encoder.blocks.3.mlp.fc1.bias"] == pytest.approx(0.5)  # last block
    assert scale["encoder.norm.weight"] == scale["head.weight"] == 1.0
    assert decay["encoder.blocks.2.attn.qkv.weight"] == decay["head.weight"] == 0.05
    for name in ("encoder.cls_token", "encoder.pos_embed", "encoder.blocks.2.attn.qkv.bias",
                 "encoder.blocks.2.norm1.weight", "encoder.norm.bias", "head.bias"):
        assert decay[name] == 0.0, name
    optimizer = torch.optim.AdamW(groups)
    set_optimizer_values(optimizer, lr=2e-3, weight_decay=0.3)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-3 * group["lr_scale"])
        assert group["weight_decay"] == (0.3 if group["wd_scale"] else 0.0)
