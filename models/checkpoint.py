"""The model-checkpoint contract: one file per global-descriptor model, safe to load.

A checkpoint is a `torch.save` of plain types and tensors only:

    {"format": 1, "kind": "global_descriptor",
     "encoder_config": {...EncoderConfig fields...},
     "state_dict": {name: tensor, ...},
     "pair_classifier": {"decoder": "dec64d2b", "hidden_dim": 512,      # optional: stage-2
                         "aligned": false, "global_weight": 0.0,        # exports, for re-ranking
                         "state_dict": {name: tensor, ...}}}            # ("aligned" absent: false)

so it always loads with `torch.load(path, weights_only=True)`: a file that needs
arbitrary unpickling is refused, never executed.  The config travels with the weights,
so a loader rebuilds exactly the architecture they belong to, and a file whose weights
do not fit its config fails with the mismatched keys named.

`encoder_config` holds every EncoderConfig field; a field an older file lacks takes its default,
the value those files were written with (e.g. `adapter`: "none", no MulConv adapters; with
"mulconv" the adapters' weights, BatchNorm statistics included, are in `state_dict` as
`encoder.blocks.i.mlp.adapter.*`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import torch

from placeforge.config import ConfigError, from_mapping
from placeforge.fileio import atomic_write
from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
from placeforge.models.encoders import EncoderConfig, GlobalDescriptorModel, build_model, encoder_spec
from placeforge.models.heads import PairClassifier

CHECKPOINT_FORMAT = 1
KIND = "global_descriptor"


class CheckpointError(ValueError):
    """A file that is not a usable model checkpoint; the message names the file and why."""


def save_model_checkpoint(model: GlobalDescriptorModel, cfg: EncoderConfig, path: str | os.PathLike,
                          pair: PairClassifier | None = None, decoder: str | None = None) -> Path:
    """Write `model`'s weights and `cfg` to `path` atomically (temporary name, then rename).

    `pair` (with its decoder preset name `decoder`) is stored too when given: the stage-2
    pair classifier that evaluation re-ranks with.

    Raises:
        CheckpointError: the model is not the architecture `cfg` describes.
    """
    path = Path(path)
    state = {name: _float32_copy(tensor) for name, tensor in model.state_dict().items()}
    problem = shape_mismatch(_expected_shapes(cfg), {name: tuple(t.shape) for name, t in state.items()})
    if problem:
        raise CheckpointError(f"{path}: the model does not match its encoder config {cfg}: {problem}")
    content = {
        "format": CHECKPOINT_FORMAT,
        "kind": KIND,
        "encoder_config": dataclasses.asdict(cfg),
        "state_dict": state,
    }
    if pair is not None:
        if decoder is None:
            raise ValueError("save_model_checkpoint: pass the decoder preset name with the pair classifier")
        content["pair_classifier"] = {
            "decoder": decoder, "hidden_dim": pair.mlp[0].out_features, "aligned": pair.aligned,
            "global_weight": pair.global_weight,
            "state_dict": {name: _float32_copy(t) for name, t in pair.state_dict().items()},
        }
    return atomic_write(path, lambda tmp: torch.save(content, tmp))


def _float32_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy, floating point as float32 (bf16 training weights are saved full width)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous()


def inspect_model_checkpoint(path: str | os.PathLike) -> EncoderConfig:
    """Check a checkpoint without building its weights; return its encoder config.

    Tensors are memory-mapped and the architecture is built on the meta device, so this is
    cheap even for a ViT-G checkpoint: a driver can validate before starting workers.

    Raises:
        CheckpointError: not a checkpoint, another format or kind, or weights that do not
            fit the config (missing, unexpected or differently shaped keys).
    """
    cfg, state = _read(path)
    _check_fits(path, cfg, {name: tuple(t.shape) for name, t in state.items()})
    return cfg


def load_model_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                          ) -> tuple[GlobalDescriptorModel, EncoderConfig]:
    """The model saved in `path` (in eval mode, on `device`) and its encoder config.

    Raises:
        CheckpointError: as `inspect_model_checkpoint`.
    """
    cfg, state = _read(path)
    _check_fits(path, cfg, {name: tuple(t.shape) for name, t in state.items()})
    model = build_model(cfg, load_encoder_weights=False)  # the saved weights replace every parameter
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def load_pair_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> PairClassifier | None:
    """The pair classifier stored with the model in `path` (eval mode), or None if it has none
    (a stage-1 export or an older file: evaluation then reports global recall only).

    Raises:
        CheckpointError: as `inspect_model_checkpoint`, or pair weights that do not fit their decoder.
    """
    cfg, _, content = _read_content(path)
    stored = content.get("pair_classifier")
    if stored is None:
        return None
    spec = encoder_spec(cfg.name)
    try:
        decoder = SiameseMIMDecoder(decoder_config(str(stored["decoder"])), spec.embed_dim, spec.patch_size)
        pair = PairClassifier(decoder, int(stored["hidden_dim"]), bool(stored.get("aligned", False)),  # older: no term
                              float(stored.get("global_weight", 0.0)))  # older: Pair-VPR's score
        pair.load_state_dict(dict(stored["state_dict"]), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: the stored pair classifier does not fit its decoder preset: {first}") from error
    return pair.to(device).eval()


def _read(path: str | os.PathLike) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    cfg, state, _ = _read_content(path)
    return cfg, state


def _read_content(path: str | os.PathLike) -> tuple[EncoderConfig, dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a loadable model checkpoint (torch.load with weights_only=True refused it: {reason})"
        ) from error
    if not isinstance(content, dict) or content.get("kind") != KIND:
        found = content.get("kind") if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path}: not a placeforge {KIND} checkpoint (kind {found!r})")
    if content.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {content.get('format')}, this code reads {CHECKPOINT_FORMAT}")
    state = content.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    try:
        cfg = from_mapping(EncoderConfig, dict(content.get("encoder_config") or {}), where=str(path),
                           old_keys="quiet")  # an older export's `checkpoint` is read as `weights`
    except (ConfigError, ValueError) as error:
        raise CheckpointError(f"{path}: bad encoder_config ({error})") from error
    return cfg, state, content


def _expected_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(cfg, load_encoder_weights=False)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def shape_mismatch(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> str:
    """'' if `shapes` has exactly the keys and shapes of `expected`, else what differs."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
    if wrong:
        parts.append(f"{len(wrong)} key(s) of another shape " + ", ".join(
            f"{k} {shapes[k]} != {expected[k]}" for k in wrong[:5]))
    return "; ".join(parts)


def _check_fits(path: str | os.PathLike, cfg: EncoderConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    problem = shape_mismatch(_expected_shapes(cfg), shapes)
    if problem:
        raise CheckpointError(
            f"{path}: the weights do not match the architecture of its encoder_config "
            f"(name={cfg.name}, descriptor_dim={cfg.descriptor_dim}, pooling={cfg.pooling}, "
            f"adapter={cfg.adapter}): {problem}"
        )
