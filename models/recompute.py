"""Activation checkpointing: transformer blocks that recompute their activations during backward.

    x = run_blocks(encoder.blocks, x, recompute=True)      # encoder blocks: x [B, T, C] -> [B, T, C]
    x = run_blocks(decoder.blocks, x, y, recompute=True)   # decoder blocks: x [B, N, D] also attends y [B, M, D]
    set_activation_checkpointing(model, True)              # every block loop of a training model

Every block loop of the training models (the encoder passes in models.encoders and
models.decoder, the decoder's blocks, the pair classifier's in models.heads) goes through
`run_blocks`, and the module that owns the loop carries an `activation_checkpointing` switch
(`set_activation_checkpointing` sets them all; trainer.train_models does it from TrainConfig).

With the switch on, a block that builds a graph (gradients enabled, the block in training mode,
and its parameters train or an input needs a gradient) runs under torch.utils.checkpoint
(non-reentrant): autograd keeps only the block's inputs, and the backward pass runs the block's
forward again, one block at a time, before going back through it.  The cost is one more forward
of those blocks per step; the gradients are the same (dropout draws the same random numbers
again).  A block that builds no graph (a frozen early block whose input needs no gradient;
evaluation; torch.no_grad) runs as it is: it keeps nothing either way.  With the switch off,
the encoder's `blocks` (an nn.Sequential) is called as timm calls it; with it on, its blocks are
called one by one, so a hook on the container itself no longer fires.

timm's own `set_grad_checkpointing` is not used: its loop (`checkpoint_seq`) wraps every block,
frozen ones too, whatever the training mode, and only `forward_features` reads it, while stage 1
runs the encoder's blocks from its own functions (models.decoder.encode_visible,
models.dinov2.encode_with_mask_token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def builds_graph(block: nn.Module, *inputs: torch.Tensor) -> bool:
    """Whether `block(*inputs)` is kept for a backward pass: gradients enabled, the block in
    training mode, and a parameter of it trains or an input needs a gradient."""
    return (torch.is_grad_enabled() and block.training
            and (any(t.requires_grad for t in inputs) or any(p.requires_grad for p in block.parameters())))


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, *context: torch.Tensor,
               recompute: bool = False) -> torch.Tensor:
    """`x` through each block in turn, each called as `block(x, *context)`.

    Args:
        blocks: the blocks, in order (an nn.Sequential or nn.ModuleList).
        x: [B, T, C] tokens.
        context: tensors every block also reads (the decoder's cross-attended tokens [B, M, D]).
        recompute: checkpoint each block that builds a graph (module docstring).
    Returns:
        [B, T, C] the last block's output.
    """
    if not recompute and isinstance(blocks, nn.Sequential) and not context:
        return blocks(x)  # the encoder's own call, as before the option: hooks on `blocks` still fire
    for block in blocks:
        if recompute and builds_graph(block, x, *context):
            x = checkpoint(block, x, *context, use_reentrant=False, context_fn=_contexts_for(block))
        else:
            x = block(x, *context)
    return x


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn recomputation on or off in every block loop of `model` (each submodule with an
    `activation_checkpointing` switch); returns how many loops were set.

    Raises:
        ValueError: `model` has no block loop that can recompute.
    """
    owners = [module for module in model.modules() if hasattr(module, "activation_checkpointing")]
    if not owners:
        raise ValueError(f"{type(model).__name__} has no block loop with an activation_checkpointing switch")
    for module in owners:
        module.activation_checkpointing = bool(enabled)
    return len(owners)


def _contexts_for(block: nn.Module) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """checkpoint's `context_fn`: the forward as it is, and a recomputation that leaves BatchNorm's
    running statistics (MulConv adapters, models.adapters) as the first forward left them; without
    it every training step would move them twice."""
    norms = [m for m in block.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not norms:
        return noop_context_fn
    return lambda: (nullcontext(), _running_statistics_kept(norms))


@contextmanager
def _running_statistics_kept(norms: list[nn.Module]) -> Iterator[None]:
    """Restore the running mean, variance and batch count of `norms` on leaving: in training mode
    BatchNorm normalises with the batch's own statistics, so the recomputed outputs do not depend
    on them, only the buffers would change."""
    saved = [(buffer, buffer.clone()) for norm in norms for buffer in norm.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
