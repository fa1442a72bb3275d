"""MulConv adapters (MutualVPR): a small convolutional path beside every ViT block's MLP.

    encoder = encoder_spec("vit_base_patch14_dinov2").build(504)
    load_weights_into(encoder, "weights/dinov2_vitb14_pretrain.pth", dinov2=True)  # plain DINOv2 first
    add_mulconv_adapters(encoder)     # blocks.i.mlp gains .adapter; everything else of the encoder is frozen
    set_patch_grid(encoder, (36, 36))  # before a forward: the convolutions need the patch grid (rows, columns)

models.encoders.build_model does all of this for `EncoderConfig(adapter="mulconv")`, and
GlobalDescriptorModel sets the grid before every forward.

MutualVPR (Gucci233/MutualVPR at bd373c6, backbone/dinov2/block.py) changes the second
residual of every DINOv2 block to

    x + ls2(mlp(n) + 0.2 * adapter(n)),   n = norm2(x)

so the block's layer scale applies to the adapter too.  The adapter (`MulConvAdapter(768, 384,
192, 24, 96, 24, 96)` there), for a token width C:

    h = ReLU(Linear C -> C/2 (x))                                   [B, P + N, C/2]
    patch tokens of h as a grid [B, C/2, rows, columns], three branches, each convolution
    followed by BatchNorm (eps 1e-3) and ReLU:
        1x1 -> C/4;   1x1 -> C/32, 3x3 -> C/8;   1x1 -> C/32, 5x5 -> C/8     (C 768: 192; 24, 96; 24, 96)
    the three concatenated (C/2 channels) plus h; prefix tokens skip the convolutions, so theirs is h + h
    Linear C/2 -> C                                                 [B, P + N, C]

MutualVPR's encoder is ViT-B (C = 768) with one prefix token, the class token, and a square
grid.  Here the branch widths keep those ratios for any C divisible by 32, every prefix token
(class and registers) is treated as the class token is, and the grid may be any rows x columns.

Initialisation as MutualVPR's train.py leaves it: the down Linear trunc-normal (std 0.02) with
zero bias (DINOv2's init of every Linear), the up Linear all zeros (a new adapter adds nothing,
so training starts from DINOv2's outputs), every convolution weight and bias 1e-5, BatchNorm as
PyTorch builds it.  train.py then trains only parameters named `adapter` in the backbone;
`add_mulconv_adapters` freezes the rest of the encoder the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

ADAPTER_SCALE = 0.2  # block.py: self.drop_path(0.2 * self.adapter(self.norm2(x)))
CONV_INIT = 1e-5  # train.py: nn.init.constant_(conv weight and bias, 0.00001)


class Fp32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d computed in float32 whatever the dtype of its input and weights, its output
    in the input's dtype: what torch.autocast does for batch norm (MutualVPR trains in fp32).

    DeepSpeed's bf16 engine casts parameters to bf16 but keeps buffers, so a plain BatchNorm2d
    would get a bf16 input and weight with float32 running statistics, which torch refuses.
    The running statistics are updated in float32.
    """

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if grid.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(grid)
        for name in ("running_mean", "running_var"):  # a whole-module .bfloat16() casts them too
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(grid.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                           self.training, self.momentum, self.eps)  # (built with affine and running statistics)
        return out.to(grid.dtype)


class ConvBnRelu(nn.Module):
    """Conv2d (with bias) -> BatchNorm2d (eps 1e-3, computed in float32) -> ReLU, MutualVPR's BasicConv2d.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel; padding keeps the grid size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = Fp32BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, in, H, W] -> [B, out, H, W]."""
        return torch.relu(self.bn(self.conv(grid)))


class MulConvAdapter(nn.Module):
    """MutualVPR's MulConv adapter for tokens of width C (module docstring).

    Args:
        width: token width C; a multiple of 32.
        prefix_tokens: P, the tokens before the patches (class, registers), which skip the convolutions.
    """

    def __init__(self, width: int, prefix_tokens: int = 1) -> None:
        super().__init__()
        if width % 32:
            raise ValueError(f"a MulConv adapter needs a token width divisible by 32, got {width}")
        hidden, reduced = width // 2, width // 32
        self.prefix_tokens = prefix_tokens
        self.down = nn.Linear(width, hidden)
        self.branch_1x1 = ConvBnRelu(hidden, width // 4, 1)
        self.branch_3x3 = nn.Sequential(ConvBnRelu(hidden, reduced, 1), ConvBnRelu(reduced, width // 8, 3))
        self.branch_5x5 = nn.Sequential(ConvBnRelu(hidden, reduced, 1), ConvBnRelu(reduced, width // 8, 5))
        self.up = nn.Linear(hidden, width)
        # The patch grid of the current input (rows, columns), set by `set_patch_grid`; None: square.
        self.patch_grid: tuple[int, int] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.constant_(module.weight, CONV_INIT)
                nn.init.constant_(module.bias, CONV_INIT)

    def grid_of(self, patches: int) -> tuple[int, int]:
        """(rows, columns) of `patches` patch tokens: the grid set last, else a square."""
        if self.patch_grid is not None:
            rows, cols = self.patch_grid
            if rows * cols != patches:
                raise ValueError(f"MulConv adapter: {patches} patch tokens do not fill the patch grid "
                                 f"{rows} x {cols} set by set_patch_grid")
            return rows, cols
        side = round(patches ** 0.5)
        if side * side != patches:
            raise ValueError(f"MulConv adapter: {patches} patch tokens are not a square grid; "
                             f"call set_patch_grid(encoder, (rows, columns)) before the forward")
        return side, side

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P + N, C] (prefix tokens first, patches row-major) -> [B, P + N, C]."""
        hidden = torch.relu(self.down(tokens))  # [B, P + N, C/2]
        prefix, patches = hidden[:, :self.prefix_tokens], hidden[:, self.prefix_tokens:]
        batch, count, channels = patches.shape
        rows, cols = self.grid_of(count)
        grid = patches.transpose(1, 2).reshape(batch, channels, rows, cols)  # [B, C/2, rows, cols]
        mixed = torch.cat([self.branch_1x1(grid), self.branch_3x3(grid), self.branch_5x5(grid)], dim=1)
        mixed = mixed.flatten(2).transpose(1, 2)  # [B, N, C/2], row-major again
        # MutualVPR puts the prefix tokens' h before the branches' output, then adds h to all tokens.
        return self.up(torch.cat([prefix + prefix, mixed + patches], dim=1))  # [B, P + N, C]


class MlpWithAdapter(nn.Module):
    """timm's ViT `Mlp` with a MulConv adapter beside it: mlp(x) + 0.2 * adapter(x).

    The MLP's layers are moved here under their own names, so the encoder's DINOv2 keys stay
    `blocks.i.mlp.fc1` / `fc2` and only `blocks.i.mlp.adapter.*` is new.

    Args:
        mlp: the block's timm `Mlp` (not SwiGLU: MutualVPR's ViT-B has GELU MLPs).
        adapter: the adapter for the block's token width.
        scale: the adapter's weight in the sum (MutualVPR: 0.2).
    """

    def __init__(self, mlp: Mlp, adapter: MulConvAdapter, scale: float = ADAPTER_SCALE) -> None:
        super().__init__()
        if type(mlp) is not Mlp:
            raise ValueError(f"MulConv adapters go beside timm's plain Mlp, not {type(mlp).__name__} "
                             f"(a SwiGLU encoder such as ViT-g has no MutualVPR counterpart)")
        self.fc1, self.act, self.drop1, self.norm, self.fc2, self.drop2 = (
            mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2)
        self.adapter = adapter
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P + N, C] -> [B, P + N, C]; the MLP's part computed as timm's Mlp.forward does."""
        mlp = self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
        return mlp + self.scale * self.adapter(x)


def add_mulconv_adapters(encoder: nn.Module) -> None:
    """Put a new MulConv adapter beside the MLP of every block of a timm ViT, in place, and freeze
    every other parameter of the encoder (MutualVPR trains only the adapters of its backbone).

    Load the encoder's pre-trained weights before: the adapters are new.

    Raises:
        ValueError: a block's MLP is not timm's plain Mlp, or the width is not divisible by 32.
    """
    for block in encoder.blocks:
        reference = block.mlp.fc1.weight
        adapter = MulConvAdapter(encoder.embed_dim, encoder.num_prefix_tokens)
        block.mlp = MlpWithAdapter(block.mlp, adapter.to(reference.device, reference.dtype))
    for name, param in encoder.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


def is_adapter_parameter(name: str) -> bool:
    """A parameter name (of the encoder or of a model around it) that belongs to a MulConv adapter."""
    return ".mlp.adapter." in name


def set_patch_grid(encoder: nn.Module, grid: tuple[int, int] | None) -> None:
    """Tell every MulConv adapter of `encoder` the patch grid (rows, columns) of the next input
    (None: take it to be square)."""
    for module in encoder.modules():
        if isinstance(module, MulConvAdapter):
            module.patch_grid = grid

