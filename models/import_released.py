"""Released checkpoints of published methods -> placeforge model files (models.checkpoint).

    summary = import_pairvpr("trained_models/pairvpr-vitB.pth", "models/pairvpr_vitb.pt")
    print(summary.text())            # variant, presets, keys mapped and dropped
    # python -m placeforge.pipelines.evaluate --checkpoint models/pairvpr_vitb.pt ...   (global + re-ranking)

MutualVPR's release: models.import_mutualvpr, which reads files with this module's reader.

Pair-VPR (csiro-robotics/Pair-VPR) releases its stage-2 models as `torch.save` of
`PairVPRNet.state_dict()` (pairvpr/training/train_stagetwo.py), loaded by its evaluation with
`torch.load` + `load_state_dict(strict=False)`.  The keys, by module of pairvpr/models/pairvpr.py:

    encoder.model.*       DINOv2 with registers as torch.hub builds it (official release layout,
                          models.dinov2): cls_token, pos_embed [1, 1 + 37 * 37, C], register_tokens,
                          mask_token, patch_embed.proj, blocks.i.*, norm
    globalizer.0          Linear C -> 512 on the encoder's class token (then L2 normalise)
    decoder_embed         Linear C -> 768, both images' patch tokens
    dec_blocks.i.*        norm1, attn.qkv (fused [q; k; v]), attn.proj, norm2 (image A before
                          cross-attention), norm_y (image B), cross_attn.proj{q,k,v}, cross_attn.proj,
                          norm3, mlp.fc1, mlp.fc2; every LayerNorm eps 1e-6
    dec_norm              final LayerNorm
    decoder_clstoken      [1, 1, 768], put before image A's tokens (position: zeros)
    classvprmodule.{0,2}  Linear 768 -> 512, ReLU, Linear 512 -> 1: the same-place logit
    mask_token, prediction_head, dec_pos_embed, dec_pos_embed_cls: see PAIRVPR_DROPPED

This is the architecture of placeforge's GlobalDescriptorModel (pooling "cls") and
PairClassifier with the `pairvpr_dec*` decoder presets (LayerNorm eps 1e-6, ReLU head), with
one difference that the mapping absorbs exactly: Pair-VPR's 2D sine-cosine positions put the
column code in the first half of the channels and the row code in the second (the MAE
function, whose meshgrid is width-first); placeforge's `sincos_2d_positions` puts the row
first.  The two are the same vector with its halves swapped, so every decoder tensor that
reads or writes the token stream has its stream channels swapped the same way (rows of the
layers that write it, columns of the layers that read it, LayerNorm affine parameters, the
class token).  LayerNorm and attention do not care about the order of the stream's channels,
so the imported classifier gives the same logits, up to float rounding.

Every key of the file is mapped or named in PAIRVPR_DROPPED; any other key, or a missing
one, fails with the keys named.  The file is read with `weights_only=True`: a file that
needs arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from timm.models.vision_transformer import VisionTransformer

from placeforge.models.checkpoint import (
    CheckpointError,
    inspect_model_checkpoint,
    save_model_checkpoint,
    shape_mismatch,
)
from placeforge.models.decoder import SiameseMIMDecoder, decoder_config, sincos_2d_positions
from placeforge.models.dinov2 import fit_position_embedding, to_timm_keys
from placeforge.models.encoders import EncoderConfig, build_model, encoder_spec
from placeforge.models.heads import PairClassifier

log = logging.getLogger(__name__)

PAIRVPR_IMAGE_SIZE = 322  # pairvpr_{speed,performance}.yaml augmentation.img_res: squashed, no crop
PAIRVPR_ENCODER_PREFIX = "encoder.model."


@dataclass(frozen=True)
class PairVPRVariant:
    """One released Pair-VPR model: the placeforge presets its weights fit, and how it is evaluated."""

    encoder: str  # models.encoders.ENCODERS
    decoder: str  # models.decoder.DECODERS
    rerank_top_k: int  # eval.refinetopcands of its config: candidates re-ranked per query
    release_file: str = ""  # the file name in the Pair-VPR release


PAIRVPR_VARIANTS: dict[str, PairVPRVariant] = {  # pairvpr_speed.yaml and pairvpr_performance.yaml
    "vitb": PairVPRVariant("vit_base_patch14_reg4_dinov2", "pairvpr_dec768d12b", 100, "pairvpr-vitB.pth"),
    "vitg": PairVPRVariant("vit_giant_patch14_reg4_dinov2", "pairvpr_dec768d12b", 500, "pairvpr-vitG.pth"),
    "tiny_test": PairVPRVariant("vit_tiny_reg4_dinov2_test", "pairvpr_dec64d2b", 100),  # tests: the layout at width 64
}

# Keys of a released file that placeforge's model has no place for, and why that loses nothing.
PAIRVPR_DROPPED: dict[str, str] = {
    "mask_token": "stage-1 MIM only: the decoder's token for masked patches (the pair classifier never masks)",
    "prediction_head.weight": "stage-1 MIM only: the pixel head",
    "prediction_head.bias": "stage-1 MIM only: the pixel head",
    "dec_pos_embed": "fixed sine-cosine positions (a buffer): placeforge computes them; checked equal at import",
    "dec_pos_embed_cls": "the same positions with a zero row for the class token: checked equal at import",
}
# Wrappers a state dict may come in (training checkpoints), tried in this order.
_WRAPPER_KEYS = ("model", "model_state_dict", "state_dict")


@dataclass(frozen=True)
class ImportSummary:
    """What an import did: enough to check it against the source, and to evaluate the result."""

    source: Path
    out: Path
    variant: str
    encoder_config: EncoderConfig
    decoder: str
    mapped_keys: int
    dropped_keys: tuple[str, ...]

    def text(self) -> str:
        v = PAIRVPR_VARIANTS[self.variant]
        return (f"imported Pair-VPR {self.variant} from {self.source} -> {self.out}\n"
                f"  encoder {self.encoder_config.name} at {self.encoder_config.image_size} px "
                f"({self.encoder_config.resize}), {self.encoder_config.descriptor_dim}-d global descriptor, "
                f"pair classifier {self.decoder}\n"
                f"  {self.mapped_keys} keys mapped; dropped {list(self.dropped_keys) or 'none'} "
                f"(stage-1 MIM parts and fixed positions)\n"
                f"  evaluate as published with --rerank-top-k {v.rerank_top_k}")


def read_released_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a released checkpoint, read with `weights_only=True` (memory-mapped when
    the file allows), unwrapped from {"model" | "model_state_dict" | "state_dict": ...} and with
    a DataParallel `module.` prefix removed.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the loader refused the file, or it holds no mapping of names to tensors.
    """
    return read_released_checkpoint(path)[0]


def read_released_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """`read_released_state`, and the names of the wrapper's other entries that it leaves behind
    (a training checkpoint's optimizer state, epoch, ...; () for a bare state dict).

    Raises:
        as `read_released_state`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: released checkpoint not found")
    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's pre-1.6 format cannot be memory-mapped
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which never runs a file's "
                              f"code ({reason}); a released state dict of tensors always loads this way") from error
    left: tuple[str, ...] = ()
    for key in _WRAPPER_KEYS:
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            left = tuple(sorted(str(k) for k in content if k != key))
            content = content[key]
            break
    if not isinstance(content, dict) or not content or not all(isinstance(t, torch.Tensor) for t in content.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in content):
        content = {k[len("module."):]: t for k, t in content.items()}
    return dict(content), left


def check_import_paths(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing `out` unless `overwrite`, and never the source itself.

    Raises:
        FileExistsError: with what to do instead.
    """
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass overwrite (--overwrite) to replace it")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise FileExistsError(f"{out} is the source file itself; write the placeforge model to another file")


def detect_pairvpr_variant(state: dict[str, torch.Tensor], where: str = "checkpoint") -> str:
    """The PAIRVPR_VARIANTS name whose encoder and decoder widths and depths the tensors have.

    Raises:
        CheckpointError: not a Pair-VPR stage-2 state dict, or of a size no variant has.
    """
    required = (PAIRVPR_ENCODER_PREFIX + "cls_token", "decoder_embed.weight", "decoder_clstoken")
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(f"{where}: not a Pair-VPR stage-2 checkpoint: no {absent} (a stage-1 file has no "
                              f"pair classifier; import the released stage-2 model)")
    enc_width = state[required[0]].shape[-1]
    enc_depth = _count_blocks(state, PAIRVPR_ENCODER_PREFIX + "blocks.")
    dec_width = state["decoder_embed.weight"].shape[0]
    dec_depth = _count_blocks(state, "dec_blocks.")
    for name, v in PAIRVPR_VARIANTS.items():
        spec, dec = encoder_spec(v.encoder), decoder_config(v.decoder)
        if (spec.embed_dim, spec.depth, dec.width, dec.depth) == (enc_width, enc_depth, dec_width, dec_depth):
            return name
    raise CheckpointError(f"{where}: an encoder of width {enc_width} and {enc_depth} blocks with a decoder of width "
                          f"{dec_width} and {dec_depth} blocks is no released Pair-VPR model "
                          f"(variants: {', '.join(PAIRVPR_VARIANTS)})")


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def pairvpr_encoder_config(variant: str, descriptor_dim: int = 512) -> EncoderConfig:
    """The encoder config of an imported model: its preset, at Pair-VPR's 322 px, squashed."""
    return EncoderConfig(name=PAIRVPR_VARIANTS[variant].encoder, image_size=PAIRVPR_IMAGE_SIZE,
                         descriptor_dim=descriptor_dim, pooling="cls", weights=None, input_norm="imagenet",
                         resize="squash")


def map_pairvpr_state(state: dict[str, torch.Tensor], variant: str, where: str = "checkpoint"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], EncoderConfig]:
    """A released Pair-VPR state dict in placeforge's names (pure: no files).

    Returns:
        (GlobalDescriptorModel state dict, PairClassifier state dict, the encoder config they fit).
    Raises:
        CheckpointError: keys neither mapped nor in PAIRVPR_DROPPED, keys missing, shapes that do
            not fit the variant's presets, or position buffers that are not the sine-cosine ones.
    """
    taken: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{where}: missing key {key!r}, which every released Pair-VPR stage-2 model has")
        taken.add(key)
        return state[key]

    head = {f"head.{p}": take(f"globalizer.0.{p}") for p in ("weight", "bias")}
    cfg = pairvpr_encoder_config(variant, descriptor_dim=head["head.weight"].shape[0])
    with torch.device("meta"):  # shapes and the patch grid only
        expected_model = build_model(cfg, load_encoder_weights=False)
    model_state = {**_map_encoder(state, expected_model.encoder), **head}
    taken |= {k for k in state if k.startswith(PAIRVPR_ENCODER_PREFIX)}  # any that fit no tensor: named below
    depth = decoder_config(PAIRVPR_VARIANTS[variant].decoder).depth
    pair_state = _map_pair(take, take("decoder_embed.weight").shape[0], depth)
    expected_keys = set(expected_model.state_dict())
    strays = {PAIRVPR_ENCODER_PREFIX + k[len("encoder."):] for k in model_state if k not in expected_keys}
    unused = sorted((set(state) - taken - set(PAIRVPR_DROPPED)) | (strays & set(state)))
    if unused:
        raise CheckpointError(f"{where}: {len(unused)} key(s) neither mapped nor dropped (not in Pair-VPR's released "
                              f"{variant} model): {unused[:10]}")

    problem = shape_mismatch({k: tuple(t.shape) for k, t in expected_model.state_dict().items()},
                        {k: tuple(t.shape) for k, t in model_state.items()})
    if problem:
        raise CheckpointError(f"{where}: the encoder and global head do not fit Pair-VPR {variant} ({cfg.name}; "
                              f"keys in placeforge's names, encoder.X is the file's encoder.model.X): {problem}")
    with torch.device("meta"):
        expected_pair = _build_pair(variant, pair_state["mlp.0.weight"].shape[0])
    problem = shape_mismatch({k: tuple(t.shape) for k, t in expected_pair.state_dict().items()},
                        {k: tuple(t.shape) for k, t in pair_state.items()})
    if problem:
        raise CheckpointError(f"{where}: the decoder and pair head do not fit Pair-VPR {variant} "
                              f"({PAIRVPR_VARIANTS[variant].decoder}; keys in placeforge's names): {problem}")
    _check_positions(state, expected_pair.width, expected_model.encoder.patch_embed.grid_size, where)
    return model_state, pair_state, cfg


def _map_encoder(state: dict[str, torch.Tensor], encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """encoder.model.* (official DINOv2 layout) -> encoder.* of timm's ViT, positions resized to
    the 322 px grid by the rule the hub's register models apply in every forward (models.dinov2)."""
    official = {k[len(PAIRVPR_ENCODER_PREFIX):]: t for k, t in state.items() if k.startswith(PAIRVPR_ENCODER_PREFIX)}
    mapped = to_timm_keys(official, encoder.no_embed_class)
    if "pos_embed" in mapped:
        mapped["pos_embed"] = fit_position_embedding(mapped["pos_embed"], encoder,
                                                     official_offset=encoder.reg_token is None)
    return {f"encoder.{k}": t for k, t in mapped.items()}


def _map_pair(take: Callable[[str], torch.Tensor], width: int, depth: int) -> dict[str, torch.Tensor]:
    """decoder_embed / dec_blocks / dec_norm / decoder_clstoken / classvprmodule -> PairClassifier names.

    `perm` swaps the halves of the token stream's channels (module docstring): layers that
    write the stream get their output rows permuted, layers that read it their input columns.
    """
    perm = torch.cat([torch.arange(width // 2, width), torch.arange(width // 2)])

    def writes(prefix: str) -> dict[str, torch.Tensor]:  # Linear or LayerNorm whose output is the stream
        return {"weight": take(f"{prefix}.weight")[perm], "bias": take(f"{prefix}.bias")[perm]}

    def reads(prefix: str) -> dict[str, torch.Tensor]:  # Linear whose input is the stream
        return {"weight": take(f"{prefix}.weight")[:, perm], "bias": take(f"{prefix}.bias")}

    layers: dict[str, dict[str, torch.Tensor]] = {
        "embed": writes("decoder_embed"), "norm": writes("dec_norm"), "mlp.0": reads("classvprmodule.0"),
        "mlp.2": {"weight": take("classvprmodule.2.weight"), "bias": take("classvprmodule.2.bias")},
    }
    for i in range(depth):
        src, dst = f"dec_blocks.{i}", f"blocks.{i}"
        qkv = reads(f"{src}.attn.qkv")  # [3D, D]: rows q, then k, then v
        k, v = reads(f"{src}.cross_attn.projk"), reads(f"{src}.cross_attn.projv")
        layers.update({
            f"{dst}.norm1": writes(f"{src}.norm1"),
            f"{dst}.self_attn.q": {p: t[:width] for p, t in qkv.items()},
            f"{dst}.self_attn.kv": {p: t[width:] for p, t in qkv.items()},
            f"{dst}.self_attn.proj": writes(f"{src}.attn.proj"),
            f"{dst}.norm2": writes(f"{src}.norm2"),
            f"{dst}.norm_context": writes(f"{src}.norm_y"),
            f"{dst}.cross_attn.q": reads(f"{src}.cross_attn.projq"),
            f"{dst}.cross_attn.kv": {p: torch.cat([k[p], v[p]]) for p in ("weight", "bias")},
            f"{dst}.cross_attn.proj": writes(f"{src}.cross_attn.proj"),
            f"{dst}.norm3": writes(f"{src}.norm3"),
            f"{dst}.mlp.fc1": reads(f"{src}.mlp.fc1"),
            f"{dst}.mlp.fc2": writes(f"{src}.mlp.fc2"),
        })
    pair = {f"{layer}.{p}": t.contiguous() for layer, params in layers.items() for p, t in params.items()}
    pair["class_token"] = take("decoder_clstoken")[..., perm].contiguous()  # [1, 1, D]
    return pair


def _build_pair(variant: str, hidden_dim: int) -> PairClassifier:
    spec = encoder_spec(PAIRVPR_VARIANTS[variant].encoder)
    decoder = SiameseMIMDecoder(decoder_config(PAIRVPR_VARIANTS[variant].decoder), spec.embed_dim, spec.patch_size)
    return PairClassifier(decoder, hidden_dim, aligned=False)  # Pair-VPR has no aligned-similarity term


def _check_positions(state: dict[str, torch.Tensor], width: int, grid: tuple[int, int], where: str) -> None:
    """The file's position buffers, if any, must be the sine-cosine positions placeforge computes
    (halves swapped, zero class row), on the 322 px grid; else the import would change the model."""
    halves = sincos_2d_positions(grid, width).reshape(-1, 2, width // 2)  # [N, 2, D/2]: row code, column code
    expected = halves.flip(1).reshape(-1, width)  # [N, D]: column code first, as Pair-VPR's
    with_class = torch.cat([torch.zeros(1, width), expected])  # the class token gets no position
    for key, rows in (("dec_pos_embed", expected), ("dec_pos_embed_cls", with_class)):
        if key not in state:
            continue
        found = state[key].float().reshape(-1, width) if state[key].numel() % width == 0 else state[key]
        if found.shape != rows.shape or not torch.allclose(found, rows, atol=1e-4):
            raise CheckpointError(f"{where}: {key} {tuple(state[key].shape)} is not Pair-VPR's sine-cosine position "
                                  f"table for a {grid[0]} x {grid[1]} grid ({PAIRVPR_IMAGE_SIZE} px); "
                                  f"this importer reproduces only those")


def import_pairvpr(src_path: str | os.PathLike, out_path: str | os.PathLike, variant: str | None = None,
                   overwrite: bool = False) -> ImportSummary:
    """Convert a released Pair-VPR stage-2 checkpoint into a placeforge model file.

    The output holds the global-descriptor model (encoder + 512-d head, evaluated at 322 px,
    squashed) and the pair classifier (decoder preset `pairvpr_dec*`, not `aligned`), written
    atomically by models.checkpoint.save_model_checkpoint, then read back and checked.

    Args:
        src_path: the released file (e.g. pairvpr-vitB.pth, pairvpr-vitG.pth).
        out_path: the placeforge model file to write.
        variant: a PAIRVPR_VARIANTS name; None: detected from the tensor shapes.
        overwrite: replace an existing `out_path` (refused otherwise).
    Raises:
        FileExistsError: `out_path` exists and `overwrite` is False.
        CheckpointError: the file is not a released Pair-VPR model (keys and shapes named).
    """
    src, out = Path(src_path), Path(out_path)
    if variant is not None and variant not in PAIRVPR_VARIANTS:
        raise ValueError(f"unknown Pair-VPR variant {variant!r}; valid: {', '.join(PAIRVPR_VARIANTS)}")
    check_import_paths(src, out, overwrite)
    state = read_released_state(src)
    detected = detect_pairvpr_variant(state, str(src))
    if variant is not None and variant != detected:
        raise CheckpointError(f"{src}: asked for variant {variant}, but the tensors are those of {detected}")
    model_state, pair_state, cfg = map_pairvpr_state(state, detected, str(src))

    with torch.device("meta"):  # no random init of a ViT-g: the file's tensors are assigned as they are
        model = build_model(cfg, load_encoder_weights=False)
        pair = _build_pair(detected, pair_state["mlp.0.weight"].shape[0])
    model.load_state_dict(model_state, strict=True, assign=True)
    pair.load_state_dict(pair_state, strict=True, assign=True)
    save_model_checkpoint(model, cfg, out, pair=pair, decoder=PAIRVPR_VARIANTS[detected].decoder)
    inspect_model_checkpoint(out)  # the written file loads by the contract's own check
    dropped = tuple(sorted(k for k in state if k in PAIRVPR_DROPPED))
    summary = ImportSummary(src, out, detected, cfg, PAIRVPR_VARIANTS[detected].decoder,
                            len(state) - len(dropped), dropped)
    log.info("imported Pair-VPR %s from %s -> %s (%d keys mapped, dropped %s)", detected, src, out,
             summary.mapped_keys, list(dropped))
    return summary
