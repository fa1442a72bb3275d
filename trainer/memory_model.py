"""GPU memory per rank, on paper: model states under ZeRO 0-3 and an activation estimate.

    model = build_on_meta(cfg, num_classes=67_000)         # no allocation, any size (ViT-G too)
    params = count_parameters(model)                       # ParamCounts(total, trainable)
    states = model_state_bytes(params, zero_stage=2, gpus=8)
    per_item = activation_bytes_per_item(model, cfg)       # stage 1: per pair; stage 2: per image
    split = activation_elements_per_item(model, cfg)       # kept through the step + one block recomputed

A model, not a measurement.  Model states follow the ZeRO paper's accounting for mixed
precision with Adam: bf16 weights 2 bytes per parameter, bf16 gradients 2 bytes per
trainable parameter, fp32 master weights + the two Adam moments 12 bytes per trainable
parameter.  ZeRO-1 partitions the optimizer states over the N ranks, ZeRO-2 also the
gradients, ZeRO-3 also the weights (frozen ones included); a partition is ceil(count / N).
Not counted: DeepSpeed's communication buckets, BF16_Optimizer's fp32 gradient buffer where
DeepSpeed uses one, the CUDA context, and the allocator's fragmentation.

Activations are the tensors autograd keeps for the backward pass, counted per transformer
block from its layers, in bf16 (2 bytes per element), with fused attention (no T x T
matrix is kept).  Per token, C the block's width and H its MLP hidden width:
  * encoder block (timm): LayerNorm inputs and outputs 4C, q/k/v 3C, attention output C
    (fused attention returns it token-major, so the projection reads it without a copy),
    MLP 2H (fc1 output, GELU output) or 4H for SwiGLU (ViT-G: fc1's 2H output, SiLU output,
    product), layer scale 2C (DINOv2): 10C + 2H, 36 C bytes at H = 4C (Korthikanti et al.
    2022 count 34 C bytes without layer scale and with dropout masks);
  * decoder block (models.decoder): 12D + 2H per token of the attending image and 3D per
    token of the image it cross-attends (its normed copy and keys / values).
On the tiny presets (fp32, CPU) this is within 5 % of the bytes autograd actually saves
inside the blocks (tests/test_bench_gpu.py measures it with saved-tensor hooks).
Only blocks whose parameters train keep anything (stage 2's frozen encoder blocks run
without a graph).  Embeddings, heads and losses are left out (a few per cent at ViT-B).
Peak memory in the backward pass adds the working buffers of one block on top.

With `activation_checkpointing` (models.recompute) every trained block keeps only its input
through the step, T x C elements (a decoder block its N x D input; the M x D tokens it
cross-attends are one tensor for all blocks of a pass, counted once), and the backward pass
recomputes one block at a time: the largest trained block's full count comes on top while its
backward runs (`ActivationElements.recomputed`).  tests/test_bench_gpu.py checks the kept part
against saved-tensor hooks too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from placeforge.models.decoder import SiameseMIM
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import FinetuneModel, build_finetune_model, build_pretrain_model

WEIGHT_BYTES = 2  # bf16 copy the forward pass runs on
GRADIENT_BYTES = 2  # bf16 gradients
OPTIMIZER_BYTES = 12  # fp32 master weights + Adam's two fp32 moments
ACTIVATION_BYTES = 2  # bf16


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes one rank holds for the model's weights, gradients and optimizer states."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def build_on_meta(cfg: TrainConfig, num_classes: int = 1) -> nn.Module:
    """The stage's training model (trainer.train_models) on the meta device: shapes only, no
    memory, no weights read (neither `encoder.weights` nor stage 2's `init_from`)."""
    with torch.device("meta"):
        if cfg.stage == "pretrain":
            return build_pretrain_model(cfg, load_encoder_weights=False)
        return build_finetune_model(cfg, num_classes, load_weights=False)


def count_parameters(model: nn.Module) -> ParamCounts:
    params = list(model.parameters())
    return ParamCounts(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def model_state_bytes(params: ParamCounts, zero_stage: int, gpus: int) -> ModelStateBytes:
    """Per-rank bytes of weights, gradients and optimizer states under ZeRO `zero_stage` (0-3)
    over `gpus` ranks (the module docstring gives the accounting)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")

    def share(count: int, partitioned: bool) -> int:
        return math.ceil(count / gpus) if partitioned else count

    return ModelStateBytes(weights=WEIGHT_BYTES * share(params.total, zero_stage >= 3),
                           gradients=GRADIENT_BYTES * share(params.trainable, zero_stage >= 2),
                           optimizer=OPTIMIZER_BYTES * share(params.trainable, zero_stage >= 1))


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def mlp_elements_per_token(mlp: nn.Module) -> int:
    """Saved elements per token of a timm MLP: 2H (GELU) or 4H (a gated one, fc1 of width 2H)."""
    hidden = mlp.fc2.in_features
    gated = mlp.fc1.out_features == 2 * hidden
    return 4 * hidden if gated else 2 * hidden


def encoder_block_elements_per_token(block: nn.Module) -> int:
    """Saved elements per token of one timm ViT block: 8C + MLP, plus 2C with layer scale."""
    width = block.norm1.normalized_shape[0]
    layer_scale = 0 if isinstance(block.ls1, nn.Identity) else 2 * width
    return 8 * width + layer_scale + mlp_elements_per_token(block.mlp)


@dataclass(frozen=True)
class BlockElements:
    """Per training item, what one trained block keeps for the backward pass: `full` without
    activation checkpointing, `checkpointed` (its inputs) with it."""

    full: int
    checkpointed: int


@dataclass(frozen=True)
class ActivationElements:
    """Per training item: `kept` through the whole step; `recomputed`, with activation
    checkpointing, one block's full count on top while that block's backward runs (else 0)."""

    kept: int
    recomputed: int

    @property
    def total(self) -> int:
        return self.kept + self.recomputed


def decoder_pass_blocks(blocks: nn.ModuleList, tokens: int, context_tokens: int) -> list[BlockElements]:
    """One pass through decoder `blocks`: `tokens` attend to themselves and cross-attend
    `context_tokens` (models.decoder.DecoderBlock).  Checkpointed, a block keeps its input; the
    cross-attended tokens are one tensor for the whole pass, counted with the first block."""
    out = []
    for index, block in enumerate(blocks):
        width = block.norm1.normalized_shape[0]
        full = tokens * (12 * width + mlp_elements_per_token(block.mlp)) + context_tokens * 3 * width
        out.append(BlockElements(full, tokens * width + (context_tokens * width if index == 0 else 0)))
    return out


def encoder_pass_blocks(encoder: nn.Module, tokens: int) -> list[BlockElements]:
    """One encoder pass over `tokens` tokens, its trained blocks only (frozen ones keep nothing);
    checkpointed, a block keeps its input [T, C]."""
    return [BlockElements(tokens * encoder_block_elements_per_token(block), tokens * block.norm1.normalized_shape[0])
            for block in encoder.blocks if _trains(block)]


def decoder_pass_elements(blocks: nn.ModuleList, tokens: int, context_tokens: int) -> int:
    """Saved elements of one pass through decoder `blocks` without checkpointing."""
    return sum(block.full for block in decoder_pass_blocks(blocks, tokens, context_tokens))


def encoder_pass_elements(encoder: nn.Module, tokens: int) -> int:
    """Saved elements of one encoder pass over `tokens` tokens without checkpointing; frozen blocks keep nothing."""
    return sum(block.full for block in encoder_pass_blocks(encoder, tokens))


def activation_elements_per_item(model: nn.Module, cfg: TrainConfig) -> ActivationElements:
    """Activation elements of one training item, with or without `cfg.activation_checkpointing`.

    Stage 1 (SiameseMIM): one place pair, i.e. image 1's visible tokens (its full grid with
    mim_masking mask_token) and image 2's full grid through the encoder, and the decoder over
    image 1's grid cross-attending image 2's.
    Stage 2 (FinetuneModel): one image, i.e. its encoder pass and, as an anchor, two pair-
    classifier passes (hardest positive and hardest negative) over 1 + N tokens attending N
    (none without a pair classifier).
    """
    encoder = model_encoder(model)
    patches = (cfg.encoder.image_size // encoder.patch_embed.patch_size[0]) ** 2  # N, square images
    prefix = encoder.num_prefix_tokens
    if isinstance(model, SiameseMIM):
        # mask_token: the encoder runs over the full grid; drop: over the visible patches only
        dropped = round(patches * cfg.mask_ratio)  # as models.decoder.random_patch_mask
        visible = patches if model.masking == "mask_token" else max(1, patches - dropped)
        blocks = (encoder_pass_blocks(encoder, prefix + visible) + encoder_pass_blocks(encoder, prefix + patches)
                  + decoder_pass_blocks(model.decoder.blocks, patches, patches))
    elif isinstance(model, FinetuneModel):
        pair = model.pair is not None and _trains(model.pair)
        blocks = encoder_pass_blocks(encoder, prefix + patches)
        blocks += 2 * decoder_pass_blocks(model.pair.blocks, 1 + patches, patches) if pair else []
    else:
        raise TypeError(f"expected a SiameseMIM or FinetuneModel, got {type(model).__name__}")
    if not cfg.activation_checkpointing:
        return ActivationElements(kept=sum(block.full for block in blocks), recomputed=0)
    return ActivationElements(kept=sum(block.checkpointed for block in blocks),
                              recomputed=max((block.full for block in blocks), default=0))


def activation_bytes_per_item(model: nn.Module, cfg: TrainConfig, bytes_per_element: int = ACTIVATION_BYTES) -> int:
    """Activation bytes of one training item at the backward pass's peak: what it keeps, plus,
    with activation checkpointing, the largest block recomputed (module docstring)."""
    return bytes_per_element * activation_elements_per_item(model, cfg).total


def model_encoder(model: nn.Module) -> nn.Module:
    """The ViT encoder of a stage-1 or stage-2 training model."""
    return model.global_model.encoder if isinstance(model, FinetuneModel) else model.encoder
