"""MutualVPR's released model -> a placeforge model file (models.checkpoint).

    summary = import_mutualvpr("MutualVPR.pth", "models/mutualvpr_vitb.pt")
    print(summary.text())            # keys mapped and dropped, the encoder config written
    # python -m placeforge.pipelines.evaluate --checkpoint models/mutualvpr_vitb.pt ...   (global descriptor only)

MutualVPR (Gucci233/MutualVPR at bd373c6) trains `cosplace_model/cosplace_network.py`'s
`MutualVPR` module wrapped in nn.DataParallel and saves `model.state_dict()` (util.py
save_checkpoint: `best_model.pth` is that state dict; `last_checkpoint.pth` wraps it as
`model_state_dict` beside the optimizer and the CosFace classifiers).  Its keys, with or
without DataParallel's `module.` prefix:

    backbone.*            DinoVisionTransformer (backbone/vision_transformer.py, `vit_base(patch_size=14,
                          img_size=518, init_values=1, block_chunks=0)`): the official DINOv2 ViT-B/14
                          layout, no registers (cls_token, pos_embed [1, 1 + 37 * 37, 768], mask_token,
                          patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
                          mlp.fc1, mlp.fc2, ls2.gamma}, norm), plus in every block
    backbone.blocks.i.adapter.*   the MulConv adapter (backbone/dinov2/block.py): D_fc1, D_fc2,
                          branch1.{conv, bn}, branch2.{0, 1}.{conv, bn}, branch3.{0, 1}.{conv, bn}
    aggregation.1.p       GeM's exponent [1]           (aggregation = L2Norm, GeM, Flatten, Linear, L2Norm)
    aggregation.3         Linear 768 -> 512

This is placeforge's GlobalDescriptorModel with `pooling="gem"` and `adapter="mulconv"`
(models.adapters) on `vit_base_patch14_dinov2`: patch tokens after the final norm -> L2 per
token -> GeM -> Linear -> L2.  The model file evaluates squashed to S x S, S = 504 by default
(MutualVPR's datasets/test_dataset.py, which its SF-XL tests use: `transforms.Resize((504, 504))`;
its Pittsburgh and Tokyo 24/7 loaders squash to 476 instead), with the position embedding resized
to the S / 14 grid once, at import, as the official model does in every forward.

Every tensor of the state dict is mapped; a training checkpoint's other entries are dropped by
name (MUTUALVPR_DROPPED).  Any other key or entry, or a missing one, fails with the keys named.
The file is read with `weights_only=True`: a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from placeforge.models.checkpoint import (
    CheckpointError,
    inspect_model_checkpoint,
    save_model_checkpoint,
    shape_mismatch,
)
from placeforge.models.dinov2 import fit_position_embedding
from placeforge.models.encoders import EncoderConfig, build_model, encoder_spec
from placeforge.models.import_released import check_import_paths, read_released_checkpoint

log = logging.getLogger(__name__)

MUTUALVPR_IMAGE_SIZE = 504  # myparser.py --image_size; datasets/test_dataset.py (SF-XL) squashes to it
MUTUALVPR_PITTS_TOKYO_SIZE = 476  # datasets/pittsburgh.py and datasets/tokyo247.py: Resize((476, 476))
MUTUALVPR_VARIANTS: dict[str, str] = {  # variant -> encoder preset (models.encoders.ENCODERS)
    "vitb": "vit_base_patch14_dinov2",  # the released model: cosplace_network.get_backbone_vit builds vit_base
    "tiny_test": "vit_tiny_dinov2_test",  # tests: the layout at width 64, 2 blocks
}
# Entries of a training checkpoint (train.py util.save_checkpoint) beside `model_state_dict`.
MUTUALVPR_DROPPED: dict[str, str] = {
    "classifiers_state_dict": "the CosFace classifiers, one per CosPlace group: training only (the descriptor is "
                              "what MutualVPR evaluates)",
    "optimizer_state_dict": "the model's Adam state: training only",
    "optimizers_state_dict": "the classifiers' Adam states: training only",
    "epoch_num": "training progress",
    "best_val_recall1": "training's validation record",
}
# MulConv adapter layers: MutualVPR's name -> placeforge's (models.adapters.MulConvAdapter).
ADAPTER_LAYERS = {"D_fc1": "down", "D_fc2": "up", "branch1": "branch_1x1", "branch2": "branch_3x3",
                  "branch3": "branch_5x5"}
HEAD_KEYS = {"aggregation.1.p": "gem.p", "aggregation.3.weight": "head.weight", "aggregation.3.bias": "head.bias"}
_ADAPTER_KEY = re.compile(r"blocks\.(\d+)\.adapter\.([A-Za-z0-9_]+)\.(.+)")


@dataclass(frozen=True)
class MutualVPRImportSummary:
    """What an import did: enough to check it against the source, and to evaluate the result."""

    source: Path
    out: Path
    variant: str
    encoder_config: EncoderConfig
    mapped_keys: int
    dropped_entries: tuple[str, ...]

    def text(self) -> str:
        cfg = self.encoder_config
        return (f"imported MutualVPR {self.variant} from {self.source} -> {self.out}\n"
                f"  encoder {cfg.name} with MulConv adapters at {cfg.image_size} px ({cfg.resize}), "
                f"GeM {cfg.descriptor_dim}-d global descriptor, no pair classifier\n"
                f"  {self.mapped_keys} keys mapped; dropped {list(self.dropped_entries) or 'nothing'}"
                f"{' (training state)' if self.dropped_entries else ''}\n"
                f"  evaluates with the global descriptor only, as MutualVPR's test.py does")


def mutualvpr_encoder_config(variant: str, descriptor_dim: int = 512,
                             image_size: int = MUTUALVPR_IMAGE_SIZE) -> EncoderConfig:
    """The encoder config of an imported model: its preset with adapters, GeM, squashed to `image_size` px."""
    return EncoderConfig(name=MUTUALVPR_VARIANTS[variant], image_size=image_size,
                         descriptor_dim=descriptor_dim, pooling="gem", weights=None, input_norm="imagenet",
                         resize="squash", adapter="mulconv")


def detect_mutualvpr_variant(state: dict[str, torch.Tensor], where: str = "checkpoint") -> str:
    """The MUTUALVPR_VARIANTS name whose encoder width and depth the tensors have.

    Raises:
        CheckpointError: not a MutualVPR state dict, or of a size no variant has.
    """
    required = ("backbone.cls_token", "backbone.blocks.0.adapter.D_fc1.weight", "aggregation.3.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(f"{where}: not a MutualVPR checkpoint (DINOv2 backbone with MulConv adapters and a "
                              f"GeM aggregation): no {absent}")
    width = state["backbone.cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)))
    for name, preset in MUTUALVPR_VARIANTS.items():
        spec = encoder_spec(preset)
        if (spec.embed_dim, spec.depth) == (width, depth):
            return name
    raise CheckpointError(f"{where}: an encoder of width {width} and {depth} blocks is no released MutualVPR model "
                          f"(variants: {', '.join(MUTUALVPR_VARIANTS)})")


def placeforge_name(key: str) -> str | None:
    """A released key's name in placeforge's model, or None if MutualVPR's model has no such layer.

    The official DINOv2 names of a register-free ViT are timm's (models.dinov2), so backbone.X is
    encoder.X; an adapter layer is renamed (ADAPTER_LAYERS) and moves under the block's MLP.
    """
    if key in HEAD_KEYS:
        return HEAD_KEYS[key]
    if not key.startswith("backbone."):
        return None
    name = key[len("backbone."):]
    match = _ADAPTER_KEY.fullmatch(name)
    if match is None:
        return f"encoder.{name}"
    block, layer, rest = match.groups()
    return f"encoder.blocks.{block}.mlp.adapter.{ADAPTER_LAYERS[layer]}.{rest}" if layer in ADAPTER_LAYERS else None


def released_name(name: str) -> str:
    """`placeforge_name` backwards: the key a released file holds a placeforge tensor under."""
    released = {v: k for k, v in HEAD_KEYS.items()}
    if name in released:
        return released[name]
    match = re.fullmatch(r"encoder\.blocks\.(\d+)\.mlp\.adapter\.([A-Za-z0-9_]+)\.(.+)", name)
    if match is not None:
        block, layer, rest = match.groups()
        official = {v: k for k, v in ADAPTER_LAYERS.items()}.get(layer, layer)
        return f"backbone.blocks.{block}.adapter.{official}.{rest}"
    return "backbone." + name.removeprefix("encoder.")


def map_mutualvpr_state(state: dict[str, torch.Tensor], variant: str, where: str = "checkpoint",
                        image_size: int = MUTUALVPR_IMAGE_SIZE) -> tuple[dict[str, torch.Tensor], EncoderConfig]:
    """A MutualVPR state dict in placeforge's names (pure: no files), positions for `image_size` px.

    Returns:
        (GlobalDescriptorModel state dict, the encoder config it fits).
    Raises:
        CheckpointError: keys that have no place (named as in the file), keys missing, or shapes
            that do not fit the preset.
    """
    if "aggregation.3.weight" not in state:
        raise CheckpointError(f"{where}: missing key 'aggregation.3.weight', MutualVPR's Linear to the descriptor")
    cfg = mutualvpr_encoder_config(variant, state["aggregation.3.weight"].shape[0], image_size)
    with torch.device("meta"):  # shapes and the patch grid only
        expected = build_model(cfg, load_encoder_weights=False)
    expected_shapes = {k: tuple(t.shape) for k, t in expected.state_dict().items()}

    names = {key: placeforge_name(key) for key in state}
    unknown = sorted(key for key, name in names.items() if name not in expected_shapes)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} key(s) with no place in MutualVPR's {variant} model "
                              f"({cfg.name} with MulConv adapters, GeM, Linear): {unknown[:10]}")
    missing = sorted(released_name(name) for name in set(expected_shapes) - set(names.values()))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} missing key(s), which MutualVPR's {variant} model has: "
                              f"{missing[:10]}")
    model_state = {names[key]: tensor for key, tensor in state.items()}
    # The register-free hub rule, applied once here: bicubic, scale (grid + 0.1) / 37, no antialiasing.
    model_state["encoder.pos_embed"] = fit_position_embedding(model_state["encoder.pos_embed"], expected.encoder,
                                                              official_offset=True)
    problem = shape_mismatch(expected_shapes, {k: tuple(t.shape) for k, t in model_state.items()})
    if problem:
        raise CheckpointError(f"{where}: the tensors do not fit MutualVPR {variant} ({cfg.name} with MulConv "
                              f"adapters; keys in placeforge's names, encoder.X is the file's backbone.X): {problem}")
    return model_state, cfg


def import_mutualvpr(src_path: str | os.PathLike, out_path: str | os.PathLike, variant: str | None = None,
                     overwrite: bool = False, image_size: int = MUTUALVPR_IMAGE_SIZE) -> MutualVPRImportSummary:
    """Convert a released MutualVPR checkpoint into a placeforge model file.

    The output holds the global-descriptor model (DINOv2 ViT-B/14 with MulConv adapters, GeM,
    512-d head; evaluated at `image_size` px, squashed) and no pair classifier, written atomically by
    models.checkpoint.save_model_checkpoint, then read back and checked.

    Args:
        src_path: the released file (`best_model.pth`, or a `last_checkpoint.pth` of training).
        out_path: the placeforge model file to write.
        variant: a MUTUALVPR_VARIANTS name; None: detected from the tensor shapes.
        overwrite: replace an existing `out_path` (refused otherwise).
        image_size: the side S images are squashed to (a multiple of 14): 504 as MutualVPR tests
            SF-XL, 476 as its Pittsburgh and Tokyo 24/7 loaders.
    Raises:
        FileExistsError: `out_path` exists and `overwrite` is False.
        ValueError: an unknown variant, or an image size that is not a multiple of 14.
        CheckpointError: the file is not a MutualVPR model (keys, entries and shapes named).
    """
    src, out = Path(src_path), Path(out_path)
    if variant is not None and variant not in MUTUALVPR_VARIANTS:
        raise ValueError(f"unknown MutualVPR variant {variant!r}; valid: {', '.join(MUTUALVPR_VARIANTS)}")
    mutualvpr_encoder_config(variant or "vitb", image_size=image_size).validate()  # a bad size fails before reading
    check_import_paths(src, out, overwrite)
    state, left = read_released_checkpoint(src)
    unknown = sorted(set(left) - set(MUTUALVPR_DROPPED))
    if unknown:
        raise CheckpointError(f"{src}: entries beside the model's state dict that a MutualVPR training checkpoint "
                              f"does not have: {unknown}")
    detected = detect_mutualvpr_variant(state, str(src))
    if variant is not None and variant != detected:
        raise CheckpointError(f"{src}: asked for variant {variant}, but the tensors are those of {detected}")
    model_state, cfg = map_mutualvpr_state(state, detected, str(src), image_size)

    with torch.device("meta"):  # the file's tensors are assigned as they are
        model = build_model(cfg, load_encoder_weights=False)
    model.load_state_dict(model_state, strict=True, assign=True)
    save_model_checkpoint(model, cfg, out)
    inspect_model_checkpoint(out)  # the written file loads by the contract's own check
    summary = MutualVPRImportSummary(src, out, detected, cfg, len(state), left)
    log.info("imported MutualVPR %s from %s -> %s (%d keys mapped, dropped %s)", detected, src, out,
             len(state), list(left))
    return summary
