"""Activation checkpointing (TrainConfig.activation_checkpointing, models.recompute) on the tiny presets.

Both stages' models are built as the trainer builds them (trainer.train_models) and run through
the trainer's own steps (trainer.engine): with the option on, the loss and every gradient are
those without it, autograd keeps far fewer bytes, trained blocks run twice (forward, then again
in backward) and frozen ones once.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from placeforge.config import add_config_arguments, config_from_args, from_mapping
from placeforge.models.adapters import ConvBnRelu
from placeforge.models.decoder import DecoderBlock
from placeforge.models.encoders import encoder_spec
from placeforge.models.recompute import builds_graph
from placeforge.trainer.batches import GroupBatch, PairBatch
from placeforge.trainer.engine import finetune_step, pretrain_step
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model, build_pretrain_model

# The CPU demo's encoder and the tiny DINOv2 layouts with and without registers (models.encoders).
PRESETS = ("vit_w128_d4_patch8", "vit_tiny_reg4_dinov2_test", "vit_tiny_dinov2_test")
NUM_CLASSES = 4
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest, and more stall whenever another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(stage: str, encoder: str, checkpointing: bool, **values) -> TrainConfig:
    """A small training config: 8 x 8 or 4 x 4 patches, the tests' decoder, the last encoder
    block(s) trained and at least one frozen."""
    spec = encoder_spec(encoder)
    frozen = spec.depth // 2  # blocks that run without gradients
    base = {"stage": stage, "encoder.name": encoder, "encoder.image_size": 64 if spec.patch_size == 8 else 56,
            "decoder": "dec64d2b", "encoder.descriptor_dim": 32, "mask_ratio": 0.75, "batch.pairs_per_batch": 3,
            "batch.places_per_batch": 3, "batch.images_per_place": 2, "activation_checkpointing": checkpointing}
    if stage == "pretrain":
        base["mim_trainable_last_blocks"] = spec.depth - frozen
    else:
        base["trainable_last_blocks"] = spec.depth - frozen
    return from_mapping(TrainConfig, {**base, **values})


def build(cfg: TrainConfig, weights_from: nn.Module | None = None) -> nn.Module:
    """The trainer's model for `cfg`, in training mode; with the weights of `weights_from` if given."""
    if cfg.stage == "pretrain":
        model = build_pretrain_model(cfg, load_encoder_weights=False)
    else:
        model = build_finetune_model(cfg, NUM_CLASSES)
    if weights_from is not None:
        model.load_state_dict(weights_from.state_dict())
    return model.train()


def batch_for(cfg: TrainConfig) -> PairBatch | GroupBatch:
    g = torch.Generator().manual_seed(1)
    size = cfg.encoder.image_size

    def images(count: int) -> torch.Tensor:
        return torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8)

    if cfg.stage == "pretrain":
        pairs = cfg.batch.pairs_per_batch
        return PairBatch(images(pairs), images(pairs), torch.arange(pairs))
    count = cfg.batch.places_per_batch * cfg.batch.images_per_place
    place_ids = torch.arange(cfg.batch.places_per_batch).repeat_interleave(cfg.batch.images_per_place)
    return GroupBatch(images(count), place_ids, torch.arange(count), place_ids % NUM_CLASSES)


def loss_of(model: nn.Module, cfg: TrainConfig, batch: PairBatch | GroupBatch) -> torch.Tensor:
    """The trainer's step loss (same masks every call)."""
    if cfg.stage == "pretrain":
        return pretrain_step(model, batch, cfg, torch.Generator().manual_seed(2), CPU)["loss"]
    return finetune_step(model, batch, cfg, CPU)["loss"]


def gradients(model: nn.Module, cfg: TrainConfig, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_of(model, cfg, batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model: nn.Module, cfg: TrainConfig, batch) -> int:
    """Bytes of the tensors autograd keeps for backward during the step's forward (weights excluded)."""
    weights = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in weights:
            total += tensor.nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(model, cfg, batch)
    return total


def block_calls(model: nn.Module, run) -> dict[str, int]:
    """How often each transformer block's forward runs during `run()` (recomputation included)."""
    calls: dict[str, int] = {}

    def counter(name: str):
        def count(*_) -> None:
            calls[name] += 1
        return count

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (Block, DecoderBlock)):
            calls[name] = 0
            handles.append(module.register_forward_pre_hook(counter(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def stage_configs(encoder: str, checkpointing: bool) -> list[TrainConfig]:
    """Stage 1 with both maskings, stage 2 with the pair classifier."""
    return [tiny_config("pretrain", encoder, checkpointing, mim_masking="mask_token"),
            tiny_config("pretrain", encoder, checkpointing, mim_masking="drop"),
            tiny_config("finetune", encoder, checkpointing)]


def describe(cfg: TrainConfig) -> str:
    return f"{cfg.stage} ({cfg.mim_masking})" if cfg.stage == "pretrain" else cfg.stage


@pytest.mark.parametrize("encoder", PRESETS)
def test_same_loss_and_gradients_with_and_without(encoder):
    for plain_cfg, checkpointed_cfg in zip(stage_configs(encoder, False), stage_configs(encoder, True)):
        plain = build(plain_cfg)
        checkpointed = build(checkpointed_cfg, weights_from=plain)
        batch = batch_for(plain_cfg)
        loss, grads = gradients(plain, plain_cfg, batch)
        checkpointed_loss, checkpointed_grads = gradients(checkpointed, checkpointed_cfg, batch)
        where = describe(plain_cfg)
        assert torch.allclose(loss, checkpointed_loss, rtol=1e-6, atol=0), where
        assert grads.keys() == checkpointed_grads.keys()
        assert any(g is not None and g.abs().sum() > 0 for g in grads.values()), where
        for name, grad in grads.items():
            assert grad is not None and checkpointed_grads[name] is not None, f"{where}: {name} has no gradient"
            assert torch.allclose(grad, checkpointed_grads[name], rtol=1e-5, atol=1e-7), f"{where}: {name}"


@pytest.mark.parametrize("encoder", PRESETS)
def test_keeps_far_fewer_bytes_for_backward(encoder):
    for plain_cfg, checkpointed_cfg in zip(stage_configs(encoder, False), stage_configs(encoder, True)):
        batch = batch_for(plain_cfg)
        model = build(plain_cfg)
        plain = saved_bytes(model, plain_cfg, batch)
        checkpointed = saved_bytes(build(checkpointed_cfg, weights_from=model), checkpointed_cfg, batch)
        assert checkpointed < 0.4 * plain, f"{describe(plain_cfg)}: {checkpointed} vs {plain}"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_trained_blocks_run_again_in_backward_and_frozen_ones_do_not(stage):
    encoder = "vit_w128_d4_patch8"  # 4 blocks: the first 2 frozen, the last 2 trained
    plain_cfg, checkpointed_cfg = tiny_config(stage, encoder, False), tiny_config(stage, encoder, True)
    plain = build(plain_cfg)
    checkpointed = build(checkpointed_cfg, weights_from=plain)
    batch = batch_for(plain_cfg)
    once = block_calls(plain, lambda: loss_of(plain, plain_cfg, batch).backward())
    twice = block_calls(checkpointed, lambda: loss_of(checkpointed, checkpointed_cfg, batch).backward())
    encoder_module = checkpointed.encoder if stage == "pretrain" else checkpointed.global_model.encoder
    trains = {name: any(p.requires_grad for p in module.parameters())
              for name, module in checkpointed.named_modules() if name in twice}
    assert sorted(n for n, t in trains.items() if not t and ".blocks." in n) == [
        f"{'encoder' if stage == 'pretrain' else 'global_model.encoder'}.blocks.{i}" for i in (0, 1)]
    assert len(encoder_module.blocks) == 4
    for name, calls in twice.items():
        assert once[name] > 0
        assert calls == (2 * once[name] if trains[name] else once[name]), name

    with torch.no_grad():  # evaluation: nothing to recompute
        assert block_calls(checkpointed, lambda: loss_of(checkpointed, checkpointed_cfg, batch)) == once
    checkpointed.eval()
    assert block_calls(checkpointed, lambda: loss_of(checkpointed, checkpointed_cfg, batch)) == once


def test_only_blocks_that_build_a_graph_are_checkpointed():
    """A frozen block whose input needs no gradient, a block in eval mode and anything under
    no_grad run as they are; a block that trains, or whose input needs a gradient, recomputes."""
    encoder = encoder_spec("vit_tiny_dinov2_test").build(56)
    frozen, trained = encoder.blocks
    frozen.requires_grad_(False)
    tokens = torch.zeros(1, 17, 64)
    assert not builds_graph(frozen, tokens) and builds_graph(trained, tokens)
    assert builds_graph(frozen, tokens.requires_grad_())  # its input's gradient goes through it
    with torch.no_grad():
        assert not builds_graph(trained, tokens)
    assert not builds_graph(trained.eval(), tokens)


def test_mulconv_adapters_same_gradients_and_batchnorm_statistics():
    """MutualVPR's model: every block trains (its adapter); the recomputation must not move
    BatchNorm's running statistics a second time."""
    values = {"encoder.adapter": "mulconv", "trainable_last_blocks": 0, "pair_classifier": False,
              "pair_bce_weight": 0.0, "encoder.pooling": "gem"}
    plain_cfg = tiny_config("finetune", "vit_tiny_dinov2_test", False, **values)
    checkpointed_cfg = tiny_config("finetune", "vit_tiny_dinov2_test", True, **values)
    plain = build(plain_cfg)
    checkpointed = build(checkpointed_cfg, weights_from=plain)
    before = {k: v.clone() for k, v in plain.state_dict().items() if "running_" in k}
    batch = batch_for(plain_cfg)
    loss, grads = gradients(plain, plain_cfg, batch)
    checkpointed_loss, checkpointed_grads = gradients(checkpointed, checkpointed_cfg, batch)
    assert torch.allclose(loss, checkpointed_loss, rtol=1e-6, atol=0)
    assert any("adapter" in name for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, checkpointed_grads[name], rtol=1e-5, atol=1e-7), name
    after, checkpointed_after = plain.state_dict(), checkpointed.state_dict()
    assert any(isinstance(m, ConvBnRelu) for m in checkpointed.modules()) and before
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step did move them
    for key in before:
        assert torch.equal(after[key], checkpointed_after[key]), key
    count = "global_model.encoder.blocks.0.mlp.adapter.branch_1x1.bn.num_batches_tracked"
    assert after[count] == checkpointed_after[count] == 1  # one step, counted once


def test_the_option_reaches_the_model_through_the_trainers_config_path(tmp_path):
    """--config FILE and --activation-checkpointing as train.py parses them, then the trainer's builders."""
    override = tmp_path / "tiny.yaml"
    override.write_text("encoder: vit_tiny_reg4_dinov2_test\nimage_size: 56\ndecoder: dec64d2b\n"
                        "activation_checkpointing: false\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    assert config_from_args(TrainConfig, parser.parse_args(["--config", str(override)])).activation_checkpointing \
        is False
    cfg = config_from_args(TrainConfig, parser.parse_args(["--config", str(override),
                                                           "--activation-checkpointing", "true"]))
    assert cfg.activation_checkpointing is True and TrainConfig().activation_checkpointing is False

    mim = build_pretrain_model(cfg, load_encoder_weights=False)
    switches = {name: m.activation_checkpointing for name, m in mim.named_modules()
                if hasattr(m, "activation_checkpointing")}
    assert switches == {"": True, "decoder": True}  # the encoder's passes and the decoder's blocks
    model = build_finetune_model(from_mapping(TrainConfig, {"stage": "finetune"}, base=cfg), NUM_CLASSES)
    switches = {name: m.activation_checkpointing for name, m in model.named_modules()
                if hasattr(m, "activation_checkpointing")}
    assert switches == {"global_model": True, "pair": True}
    off = build_finetune_model(from_mapping(TrainConfig, {"stage": "finetune", "activation_checkpointing": "no"},
                                            base=cfg), NUM_CLASSES)
    assert not any(getattr(m, "activation_checkpointing", False) for m in off.modules())
