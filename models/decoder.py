"""Stage 1 of Pair-VPR: Siamese masked image modelling (MIM) with a cross-attending decoder.

    decoder = SiameseMIMDecoder(decoder_config("dec768d12b"), encoder_dim=768, patch_size=14)
    mim = SiameseMIM(encoder, decoder, masking="mask_token")       # or "drop"
    mask, keep_idx = random_patch_mask(B, N, mask_ratio=0.9, generator=g)
    pred = mim(images_1, images_2, keep_idx)                        # [B, N, 14 * 14 * 3]
    loss = masked_patch_mse(pred, patchify(images_1, 14), mask)     # trainer.losses

Image 1's masked patches are hidden from the encoder in one of two ways (MASKINGS); image 2
is always encoded whole.
  * drop (MAE-style): the encoder sees only the visible patches of image 1 (10 % of them at
    mask ratio 0.9, so its cost falls about tenfold).  The decoder puts its own learned mask
    token at every masked position.
  * mask_token (Pair-VPR, pairvpr/models/pairvpr.py and dinov2.py): the masked patches'
    embeddings are replaced by the encoder's mask token before positions are added (DINOv2's
    `prepare_tokens_with_masks`), the encoder runs over the full grid, and the decoder reads
    all of image 1's tokens; its own mask token is not used (Pair-VPR defines one and never
    reads it).  The token is DINOv2's (models.dinov2); an encoder without one gets a
    learnable token here, zeros as DINOv2 initialises its own.
The decoder projects both images' tokens to its own width, adds fixed 2D sine-cosine
positions (they exist for any grid, so the same decoder runs at 224 px in stage 1 and 322 px
in stage 2), then runs blocks of self-attention over image 1, cross-attention to image 2
and an MLP (pre-norm, as CroCo, on which Pair-VPR builds).  A linear head predicts each
patch's pixels.  The encoder's
class token is dropped before the decoder: the decoder works on patch tokens only, and
stage 2's pair classifier (models.heads) prepends its own class token.  Register tokens
(DINOv2 _reg4 presets) are dropped with the class token: every prefix token is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from placeforge.models.dinov2 import encode_with_mask_token
from placeforge.models.encoders import normalize_input
from placeforge.models.recompute import run_blocks

# How stage 1 hides image 1's masked patches from the encoder (module docstring).
MASKINGS = ("drop", "mask_token")


@dataclass(frozen=True)
class DecoderConfig:
    width: int = field(default=768, metadata={"help": "decoder token width (a multiple of 4 and of num_heads)"})
    depth: int = field(default=12, metadata={"help": "number of decoder blocks"})
    num_heads: int = field(default=12, metadata={"help": "attention heads per block"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width / token width"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of every LayerNorm (Pair-VPR's code: 1e-6)"})
    head_activation: str = field(default="gelu", metadata={
        "help": "activation of the stage-2 pair classifier's MLP head: gelu, or relu (Pair-VPR's code)"})

    def validate(self) -> None:
        if self.width % 4 or self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be a multiple of 4 and of num_heads {self.num_heads}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {list(HEAD_ACTIVATIONS)}, got {self.head_activation!r}")


# The pair classifier's head (models.heads) is part of the preset a checkpoint names, so a file
# rebuilds exactly the classifier it was trained with.
HEAD_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


DECODERS: dict[str, DecoderConfig] = {
    "dec768d12b": DecoderConfig(width=768, depth=12, num_heads=12),  # published, for every encoder size
    "dec64d2b": DecoderConfig(width=64, depth=2, num_heads=2),  # tests and the CPU demo
    # Exactly the decoder and pair head of the released Pair-VPR checkpoints (ViT-B and ViT-G alike;
    # pairvpr/models/pairvpr.py): LayerNorm eps 1e-6 and a ReLU head (models.import_released).
    "pairvpr_dec768d12b": DecoderConfig(width=768, depth=12, num_heads=12, norm_eps=1e-6, head_activation="relu"),
    "pairvpr_dec64d2b": DecoderConfig(width=64, depth=2, num_heads=2, norm_eps=1e-6, head_activation="relu"),  # tests
}


def decoder_config(name: str) -> DecoderConfig:
    """The preset `name`; an unknown name fails with the list of valid names."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; valid: {', '.join(DECODERS)}")
    return DECODERS[name]


def random_patch_mask(batch: int, num_patches: int, mask_ratio: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `round(num_patches * mask_ratio)` patches of each image, uniformly at random.

    At least one patch stays visible.  Keep indices are sorted, so the visible tokens keep
    the row-major order of the patch grid.

    Returns:
        mask: [B, N] bool, True where a patch is masked (to be predicted).
        keep_idx: [B, N_keep] int64, the visible patch indices of each image.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = max(1, num_patches - round(num_patches * mask_ratio))
    noise = torch.rand(batch, num_patches, generator=generator)  # [B, N] on the generator's device (CPU)
    keep_idx = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values  # [B, N_keep]
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, keep_idx, False)
    return mask.to(device), keep_idx.to(device)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, patch * patch * 3], patches row-major as timm's patch_embed,
    values ordered (row, column, channel) within a patch, as MAE."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)  # [B, gh, gw, p, p, 3]
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def patch_grid(encoder: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of the patch grid the encoder makes of `images` [B, 3, H, W]."""
    ph, pw = encoder.patch_embed.patch_size
    return images.shape[-2] // ph, images.shape[-1] // pw


def encode_visible(encoder: VisionTransformer, images: torch.Tensor, keep_idx: torch.Tensor,
                   recompute: bool = False) -> torch.Tensor:
    """Run a timm ViT on the visible patches only (MAE-style).

    Positions are added before patches are dropped, so each kept token carries its own
    place in the grid; prefix (class / register) tokens are always kept.  With every patch
    kept in grid order this equals `encoder.forward_features(images)`.

    Args:
        encoder: timm VisionTransformer (`dynamic_img_size` or not).
        images: [B, 3, H, W].
        keep_idx: [B, N_keep] indices into the N = (H / p) * (W / p) patches.
        recompute: activation checkpointing of the blocks that train (models.recompute).
    Returns:
        [B, P + N_keep, C] after the final norm; P prefix tokens (class, then registers) first.
    """
    x = encoder.patch_embed(images)  # [B, gh, gw, C] with dynamic_img_size, else [B, N, C]
    x = encoder._pos_embed(x)  # [B, P + N, C] prefix tokens prepended, positions added
    prefix = encoder.num_prefix_tokens
    patches = x[:, prefix:]  # [B, N, C]
    index = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # [B, N_keep, C]
    x = torch.cat([x[:, :prefix], patches.gather(1, index)], dim=1)  # [B, P + N_keep, C]
    x = encoder.norm_pre(x)
    x = run_blocks(encoder.blocks, x, recompute=recompute)
    return encoder.norm(x)


def sincos_2d_positions(grid: tuple[int, int], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings (MAE / CroCo).  -> [gh * gw, dim], row-major.

    Half the channels encode the row, half the column; each half is sin and cos of the
    coordinate at dim / 4 frequencies from 1 to 1 / 10000.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float32, device=device),
                                torch.arange(gw, dtype=torch.float32, device=device), indexing="ij")
    out = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None]  # [gh * gw, dim/4]
        out += [angles.sin(), angles.cos()]
    return torch.cat(out, dim=1)  # [gh * gw, dim]


class Attention(nn.Module):
    """Multi-head attention of `x` to `context` (self-attention when context is x).

    Args:
        dim: token width of both inputs.
        num_heads: heads; dim must be a multiple of it.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, C], context [B, M, C] -> [B, N, C]."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)  # [B, h, N, C/h]
        k, v = self.kv(context).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, M, C/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, C/h]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """Pre-norm block: self-attention over x, cross-attention to y, MLP.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        norm_eps: epsilon of the block's LayerNorms.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] attends to itself and to y [B, M, D] -> [B, N, D]."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), self.norm_context(y))
        return x + self.mlp(self.norm3(x))


class SiameseMIMDecoder(nn.Module):
    """Reconstruct image 1's masked patches from its visible tokens and all of image 2.

    `embed`, `blocks` and `norm` are re-used by stage 2's PairClassifier; `mask_token`
    and `pixel_head` belong to stage 1 only.

    Args:
        cfg: decoder shape (`DECODERS`).
        encoder_dim: width C of the encoder tokens.
        patch_size: p; the pixel head predicts p * p * 3 values per patch.
    """

    def __init__(self, cfg: DecoderConfig, encoder_dim: int, patch_size: int) -> None:
        super().__init__()
        cfg.validate()
        self.width = cfg.width
        self.head_activation = cfg.head_activation  # read by models.heads.PairClassifier
        self.embed = nn.Linear(encoder_dim, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.pixel_head = nn.Linear(cfg.width, patch_size * patch_size * 3)
        self.activation_checkpointing = False  # recompute the blocks in backward (models.recompute)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def positions(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[1, gh * gw, D] fixed positions for a patch grid."""
        return sincos_2d_positions(grid, self.width, device).unsqueeze(0)

    def run_blocks(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] through every block, cross-attending y [B, M, D]; final norm.  -> [B, N, D]."""
        x = run_blocks(self.blocks, x, y, recompute=self.activation_checkpointing)
        return self.norm(x)

    def forward(self, visible_tokens: torch.Tensor, keep_idx: torch.Tensor | None, tokens_2: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """Predict the pixels of every patch of image 1.

        Args:
            visible_tokens: [B, N_keep, C] encoder patch tokens of image 1's visible patches
                (prefix tokens removed), in the order of keep_idx; with keep_idx None, [B, N, C]
                tokens of every patch (mask_token masking: the encoder already hid the masked ones).
            keep_idx: [B, N_keep] their patch indices, or None.
            tokens_2: [B, M, C] encoder patch tokens of image 2, all of them (prefix tokens removed).
            grid: (gh, gw) of both images' patch grids; N = M = gh * gw.
        Returns:
            [B, N, p * p * 3] predicted pixels (the loss reads only the masked ones).
        """
        b, n_in, _ = visible_tokens.shape
        n = grid[0] * grid[1]
        if tokens_2.shape[1] != n:
            raise ValueError(f"image 2 has {tokens_2.shape[1]} tokens, the grid {grid} has {n}")
        pos = self.positions(grid, visible_tokens.device)  # [1, N, D]
        if keep_idx is None:
            if n_in != n:
                raise ValueError(f"image 1 has {n_in} tokens, the grid {grid} has {n} (keep_idx None: every patch)")
            x = self.embed(visible_tokens)  # [B, N, D]
        else:
            x = self.mask_token.expand(b, n, -1).clone()  # [B, N, D] mask token everywhere ...
            index = keep_idx.unsqueeze(-1).expand(-1, -1, self.width)  # [B, N_keep, D]
            x = x.scatter(1, index, self.embed(visible_tokens))  # ... except at the visible patches
        y = self.embed(tokens_2) + pos  # [B, N, D]
        x = self.run_blocks(x + pos, y)  # [B, N, D]
        return self.pixel_head(x)  # [B, N, p * p * 3]


class SiameseMIM(nn.Module):
    """Stage-1 model: a shared ViT encoder for both images and the Siamese MIM decoder.

    Args:
        encoder: timm VisionTransformer with a class token and any registers (models.encoders presets).
        decoder: a SiameseMIMDecoder built for this encoder's width and patch size.
        input_norm: as the global model's (models.encoders.INPUT_NORMS).
        masking: how image 1's masked patches are hidden from the encoder (MASKINGS, module docstring).
    """

    def __init__(self, encoder: VisionTransformer, decoder: SiameseMIMDecoder, input_norm: str = "imagenet",
                 masking: str = "drop") -> None:
        super().__init__()
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; valid: {', '.join(MASKINGS)}")
        self.encoder = encoder
        self.decoder = decoder
        self.input_norm = input_norm
        self.masking = masking
        self.activation_checkpointing = False  # recompute the encoder's trained blocks in backward (models.recompute)
        if masking == "mask_token":
            decoder.mask_token.requires_grad_(False)  # never read in this mode: no gradient to wait for
            if not hasattr(encoder, "mask_token"):  # not a DINOv2 preset: a learnable token, DINOv2's zero init
                self.mask_token = nn.Parameter(torch.zeros(1, encoder.embed_dim))

    def patch_mask_token(self) -> nn.Parameter | None:
        """[1, C] token that replaces image 1's masked patches (the encoder's DINOv2 token, else
        this model's own); None under drop masking."""
        if self.masking != "mask_token":
            return None
        return self.encoder.mask_token if hasattr(self.encoder, "mask_token") else self.mask_token

    def forward(self, images_1: torch.Tensor, images_2: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """images_1, images_2 [B, 3, H, W] of one place each; keep_idx [B, N_keep] visible
        patches of image 1 (every other patch is masked).  -> predicted pixels [B, N, p * p * 3]."""
        grid = patch_grid(self.encoder, images_1)
        images_1 = normalize_input(images_1, self.input_norm)
        images_2 = normalize_input(images_2, self.input_norm)
        prefix = self.encoder.num_prefix_tokens
        recompute = self.activation_checkpointing
        tokens_2 = encode_with_mask_token(self.encoder, images_2, None, recompute=recompute)[:, prefix:]  # [B, N, C]
        if self.masking == "drop":
            visible = encode_visible(self.encoder, images_1, keep_idx, recompute)[:, prefix:]  # [B, N_keep, C]
            return self.decoder(visible, keep_idx, tokens_2, grid)
        masked = torch.ones(keep_idx.shape[0], grid[0] * grid[1], dtype=torch.bool, device=keep_idx.device)
        masked.scatter_(1, keep_idx, False)  # [B, N], as random_patch_mask's mask
        tokens_1 = encode_with_mask_token(self.encoder, images_1, masked, self.patch_mask_token(),
                                          recompute)[:, prefix:]
        return self.decoder(tokens_1, None, tokens_2, grid)  # [B, N, C] in: every patch of image 1


def _init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero bias (MAE); LayerNorm keeps its default."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
