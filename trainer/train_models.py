"""The models each training stage optimises, and the files they hand to the next stage.

    mim = build_pretrain_model(cfg)                        # stage 1: SiameseMIM (encoder + decoder), last blocks trained
    save_mim(mim, cfg, "out/export/mim_epoch0009.pt")      # what stage 2's init_from reads
    model = build_finetune_model(cfg, num_classes)         # stage 2: FinetuneModel, stage-1 weights loaded
    model = build_finetune_model(cfg, 1, group_class_ids)  # cosface_groups: one CosFace per CosPlace group

Stage-1 exports are plain tensors (`torch.load(weights_only=True)`), like models.checkpoint.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
from pathlib import Path

import torch
from torch import nn

from placeforge.fileio import atomic_write
from placeforge.models.adapters import is_adapter_parameter
from placeforge.models.decoder import SiameseMIM, SiameseMIMDecoder, decoder_config, patch_grid
from placeforge.models.dinov2 import fit_position_embedding
from placeforge.models.encoders import GlobalDescriptorModel, build_model, encoder_spec
from placeforge.models.heads import CosFaceClassifier, CosFaceGroups, PairClassifier
from placeforge.models.recompute import set_activation_checkpointing
from placeforge.trainer.losses import first_per_label, hardest_pairs
from placeforge.trainer.mining import MiningGroup, fetch_rows, gather_rows
from placeforge.trainer.train_config import TrainConfig

MIM_KIND = "siamese_mim"
log = logging.getLogger(__name__)


def build_decoder(cfg: TrainConfig, encoder: nn.Module) -> SiameseMIMDecoder:
    return SiameseMIMDecoder(decoder_config(cfg.decoder), encoder.embed_dim, encoder.patch_embed.patch_size[0])


def build_mim(cfg: TrainConfig, load_encoder_weights: bool = True, masking: str = "drop") -> SiameseMIM:
    """The encoder (DINOv2 weights when `encoder.weights` is set) and a new decoder, every
    parameter trainable but DINOv2's mask token (models.dinov2.add_mask_token).

    Raises:
        ConfigError: `encoder.weights` names a file that is not there (nothing is trained from
            random weights in its place).
    """
    release = encoder_spec(cfg.encoder.name).release_file
    if load_encoder_weights and release and not cfg.encoder.weights:  # only with encoder_init: random
        log.warning("encoder %s starts from RANDOM weights (encoder_init: random; the published recipes "
                    "start from %s)", cfg.encoder.name, release)
    encoder = build_model(cfg.encoder, load_encoder_weights).encoder
    return SiameseMIM(encoder, build_decoder(cfg, encoder), cfg.encoder.input_norm, masking)


def build_pretrain_model(cfg: TrainConfig, load_encoder_weights: bool = True) -> SiameseMIM:
    """Stage 1: `build_mim` with the stage's masking (`mim_masking`), trained encoder
    blocks (`mim_trainable_last_blocks`) and `activation_checkpointing`."""
    mim = build_mim(cfg, load_encoder_weights, cfg.mim_masking)
    freeze_mim_encoder_except_last(mim, cfg.mim_trainable_last_blocks)
    set_activation_checkpointing(mim, cfg.activation_checkpointing)
    return mim


class FinetuneModel(nn.Module):
    """Stage 2 as one module, so DeepSpeed (DDP / ZeRO) sees one forward per step.

    Args:
        global_model: encoder + global head (the part exported for retrieval / reclustering).
        decoder: the stage-1 decoder; only its embed / blocks / norm are kept (inside `pair`).
            None: no pair classifier (`pair` is None; MutualVPR trains CosFace alone).
        num_classes: CosFace rows (`next_class_id` of the label version; 1 when CosFace is off).
        group_class_ids: one CosFace classifier per CosPlace group instead (`cosface_groups`, a
            models.heads.CosFaceGroups, and `cosface` is None): per group, its class ids [R_g].
        scale, margin: CosFace s and m.
        pair_trains_encoder: False detaches the patch tokens the pair classifier reads.
        pair_aligned: the pair classifier's aligned token similarity term (models.heads).
        rerank_global_weight: the global cosine's weight in its re-ranking score (models.heads).
        pair_anchors_per_place: the pair classifier trains on the hardest pairs of only the first N
            anchors of each place in the batch (0: every anchor, as Pair-VPR).
    """

    def __init__(self, global_model: GlobalDescriptorModel, decoder: SiameseMIMDecoder | None, num_classes: int,
                 scale: float, margin: float, pair_trains_encoder: bool = True, pair_aligned: bool = False,
                 rerank_global_weight: float = 0.0, pair_anchors_per_place: int = 0,
                 group_class_ids: list | None = None) -> None:
        super().__init__()
        self.pair_trains_encoder = pair_trains_encoder
        self.pair_anchors_per_place = pair_anchors_per_place
        self.global_model = global_model
        self.pair = None
        if decoder is not None:
            self.pair = PairClassifier(decoder, aligned=pair_aligned, global_weight=rerank_global_weight)
        self.cosface, self.cosface_groups = None, None
        if group_class_ids is None:
            self.cosface = CosFaceClassifier(global_model.descriptor_dim, num_classes, scale, margin)
        else:
            self.cosface_groups = CosFaceGroups(global_model.descriptor_dim, group_class_ids, scale, margin)

    def forward(self, images: torch.Tensor, place_ids: torch.Tensor, class_ids: torch.Tensor,
                far: torch.Tensor | None = None, group: MiningGroup | None = None) -> dict:
        """Everything the stage-2 losses read, from one batch of P places x K images.

        Args:
            images: [B, 3, S, S]; place_ids [B]; class_ids [B] (-1: no view class).
            far: [B, B] bool, pairs that may be negatives (trainer.losses.far_apart); None: all.
            group: mine over the global batch of the group's ranks (trainer.mining); place_ids and
                far then cover it ([R*B], [R*B, R*B], rank-major) and each rank's anchors are its B images.
        Returns:
            descriptors [B, D] and all_descriptors [R*B, D] (the gathered global batch, gradient
            flowing back to each owner; the same tensor without a group); pairs [A, 3] (anchor,
            hardest positive, hardest negative) indices into the global batch; pair_pos / pair_neg [A]
            logits of those pairs (has_pairs False: one stand-in pair, not a training signal) and
            pair_logits_total, their count over all ranks (2 A without a group); cosface [B', C]
            margin logits of the B' labelled images and their class ids `cosface_targets` [B']
            (cosface_groups: of the B' images of the active group, targets its rows). Without a
            pair classifier nothing is mined: pairs [0, 3], has_pairs False, no pair logits.
        """
        encoder = self.global_model.encoder
        tokens = self.global_model.forward_features(images)  # [B, 1 + N, C]
        descriptors = self.global_model.pool(tokens, self.global_model.token_grid(images))  # [B, D], unit length
        if self.pair is None:
            all_descriptors = descriptors if group is None else gather_rows(descriptors, group)  # [R*B, D]
            return {"descriptors": descriptors, "all_descriptors": all_descriptors,
                    "pairs": torch.zeros(0, 3, dtype=torch.long, device=images.device), "has_pairs": False,
                    "pair_logits_total": 0, **self._cosface(descriptors, class_ids)}
        patches = tokens[:, encoder.num_prefix_tokens:]  # [B, N, C]
        if not self.pair_trains_encoder:  # a small encoder serves the global descriptor better alone
            patches = patches.detach()
        grid = patch_grid(encoder, images)
        if group is None:  # mine within the micro-batch
            all_descriptors, anchors, first = descriptors, None, 0
        else:  # this rank's images are the anchors, mined against every rank's
            all_descriptors, anchors = gather_rows(descriptors, group), group.rows(len(descriptors))  # [R*B, D]
            first = anchors.start
        anchor, positive, negative = hardest_pairs(all_descriptors, place_ids, far, anchors)  # [A] each
        if self.pair_anchors_per_place:  # fewer, still hardest, pairs: the classifier's cost falls with A
            keep = first_per_label(place_ids[anchor], self.pair_anchors_per_place)  # [A']
            anchor, positive, negative = anchor[keep], positive[keep], negative[keep]
        pairs = torch.stack([anchor, positive, negative], dim=1)  # [A, 3], indices into the global batch
        table = patches  # [B, N, C]; global: [B + received, N, C], this rank's rows first
        if group is None:
            pair_logits_total = 2 * len(anchor)
        else:  # a hardest negative (or positive) may live on another rank: fetch its tokens
            table, partners, pair_logits_total = fetch_rows(patches, torch.cat([positive, negative]), group)
            positive, negative = partners.split(len(anchor))  # [A] each, rows of `table`
        anchor = anchor - first  # rows of `table`
        has_pairs = anchor.numel() > 0
        if not has_pairs:
            # No anchor has both a positive and a negative (possible with view-class positives):
            # score one stand-in pair so every rank runs the same graph; the loss weighs it 0.
            anchor = positive = negative = torch.zeros(1, dtype=torch.long, device=images.device)
        pair_pos = self.pair(table[anchor], table[positive], grid)  # [A]
        pair_neg = self.pair(table[anchor], table[negative], grid)  # [A]
        return {"descriptors": descriptors, "all_descriptors": all_descriptors, "pairs": pairs,
                "pair_pos": pair_pos, "pair_neg": pair_neg, "has_pairs": has_pairs,
                "pair_logits_total": pair_logits_total, **self._cosface(descriptors, class_ids)}

    def _cosface(self, descriptors: torch.Tensor, class_ids: torch.Tensor) -> dict:
        """{"cosface": [B', C] margin logits, "cosface_targets": [B']} of the images the classifier
        scores: every labelled image, or (cosface_groups) those of the active group."""
        if self.cosface_groups is not None:
            cosface, targets = self.cosface_groups(descriptors, class_ids)
            return {"cosface": cosface, "cosface_targets": targets}
        labelled = class_ids >= 0
        targets = class_ids[labelled]  # [B']
        return {"cosface": self.cosface(descriptors[labelled], targets), "cosface_targets": targets}


def freeze_encoder_except_last(encoder: nn.Module, trainable_last_blocks: int) -> None:
    """Train only the top `trainable_last_blocks` blocks and the final norm (-1: everything).

    Pair-VPR stage 2 trains the last 6 blocks; patch / position embeddings stay frozen.
    """
    if trainable_last_blocks < 0:
        return
    depth = len(encoder.blocks)
    first = max(0, depth - trainable_last_blocks)
    for name, param in encoder.named_parameters():
        in_trained_block = name.startswith("blocks.") and int(name.split(".")[1]) >= first
        param.requires_grad_(in_trained_block or name.startswith(("norm.", "fc_norm.")))


def freeze_mim_encoder_except_last(mim: SiameseMIM, trainable_last_blocks: int) -> None:
    """Stage 1: train only the top `trainable_last_blocks` encoder blocks and its final norm,
    the embeddings and the mask token frozen, as Pair-VPR (pairvpr/models/dinov2.py runs the
    earlier blocks under no_grad; the tokens before them then get no gradient either).

    -1: every encoder parameter trains, and so does the mask token that hides image 1's
    patches under mask_token masking (DINOv2's, or the model's own). The decoder always trains.
    """
    token = mim.patch_mask_token()  # None under drop masking
    if trainable_last_blocks >= 0:
        freeze_encoder_except_last(mim.encoder, trainable_last_blocks)
    if token is not None:
        token.requires_grad_(trainable_last_blocks < 0)


def build_finetune_model(cfg: TrainConfig, num_classes: int, load_weights: bool = True,
                         group_class_ids: list | None = None) -> FinetuneModel:
    """Stage 2: stage-1 encoder + decoder from `cfg.init_from` (else as stage 1 starts), a new
    global head, pair class token and MLP (none when `pair_classifier` is false: no decoder is
    built), and a CosFace head of `num_classes` rows; `activation_checkpointing` as the config says.

    With `cosface_groups`, one CosFace classifier per group instead: `group_class_ids` (per group,
    its class ids, trainer.cosface_groups.group_class_ids); None gives every group `num_classes`
    rows (shapes only).  `load_weights` False reads no file (neither `init_from` nor
    `encoder.weights`): shapes only, as trainer.memory_model builds on the meta device."""
    if cfg.pair_classifier or cfg.init_from:
        mim = build_mim(cfg, load_encoder_weights=load_weights and not cfg.init_from)  # init_from replaces them
        if cfg.init_from and load_weights:
            load_mim(mim, cfg.init_from)
        global_model = build_model(cfg.encoder, load_encoder_weights=False)
        global_model.encoder = mim.encoder  # keep the stage-1 encoder; the head is new
        decoder = mim.decoder if cfg.pair_classifier else None
    else:  # MutualVPR: no stage 1, no pair classifier, so no decoder is built
        release = encoder_spec(cfg.encoder.name).release_file
        if load_weights and release and not cfg.encoder.weights:  # only with encoder_init: random
            log.warning("encoder %s starts from RANDOM weights (encoder_init: random)", cfg.encoder.name)
        global_model, decoder = build_model(cfg.encoder, load_encoder_weights=load_weights), None
    freeze_finetune_encoder(global_model.encoder, cfg)
    if cfg.cosface_groups and group_class_ids is None:
        group_class_ids = [list(range(num_classes))] * cfg.cosface_groups
    model = FinetuneModel(global_model, decoder, num_classes, cfg.cosface_scale, cfg.cosface_margin,
                          cfg.pair_trains_encoder, cfg.pair_aligned_similarity, cfg.rerank_global_weight,
                          cfg.pair_anchors_per_place, group_class_ids if cfg.cosface_groups else None)
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    return model


def freeze_finetune_encoder(encoder: nn.Module, cfg: TrainConfig) -> None:
    """Stage 2's trained encoder parameters.  With `adapter` mulconv: the adapters only, every
    DINOv2 weight frozen, the final norm too, as MutualVPR's train.py (`"adapter" not in name`:
    requires_grad False); else the top `trainable_last_blocks` blocks and the final norm."""
    if cfg.encoder.adapter == "none":
        freeze_encoder_except_last(encoder, cfg.trainable_last_blocks)
        return
    for name, param in encoder.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


def global_model_of(model: nn.Module, cfg: TrainConfig) -> GlobalDescriptorModel:
    """The encoder + global head to export.  Stage 1 has no head: a fixed-seed random
    projection stands in (of the class token or GeM, as `cfg.encoder.pooling`; good enough to recluster with)."""
    if isinstance(model, FinetuneModel):
        return model.global_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        global_model = GlobalDescriptorModel(model.encoder, cfg.encoder.descriptor_dim, cfg.encoder.pooling,
                                             cfg.encoder.input_norm, cfg.encoder.pooling_grid)  # shares the encoder
    return global_model


def save_mim(mim: SiameseMIM, cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write stage-1 weights (encoder.*, decoder.*) with their presets, atomically."""
    content = {"format": 1, "kind": MIM_KIND, "encoder": cfg.encoder.name, "decoder": cfg.decoder,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in mim.state_dict().items()}}
    return atomic_write(path, lambda tmp: torch.save(content, tmp))


def check_stage1_export(path: str | os.PathLike) -> None:
    """Refuse an --init-from that is not a `save_mim` file; the tensors are memory-mapped, not read."""
    hint = "pass a stage-1 run's export/mim_epochNNNN.pt"
    try:
        is_file = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as err:
        raise ValueError(f"--init-from {path} cannot be read: {err.strerror}") from None
    if not is_file or not zipfile.is_zipfile(path):  # is_file first: a FIFO would block the read
        raise ValueError(f"--init-from {path} is not a stage-1 export (not a file torch.save writes); {hint}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - a damaged archive, or objects weights_only refuses
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"--init-from {path} is not a stage-1 export ({reason}); {hint}") from None
    kind = content.get("kind") if isinstance(content, dict) else type(content).__name__
    if kind != MIM_KIND:
        raise ValueError(f"--init-from {path} is not a stage-1 export (kind {kind!r}, not {MIM_KIND!r}); {hint}")


def load_mim(mim: SiameseMIM, path: str | os.PathLike) -> None:
    """Load a `save_mim` file; the position embedding is resampled when the image size differs
    (stage 1 at 224 px, stage 2 at 322 px)."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("kind") != MIM_KIND:
        raise ValueError(f"{path}: not a stage-1 export (kind {MIM_KIND!r}); pass out/export/mim_epochNNNN.pt")
    state = dict(content["state_dict"])
    if "mask_token" in state and "mask_token" not in mim.state_dict():
        # The stage-1 model's own mask token (mask_token masking of an encoder without DINOv2's):
        # a receiver that never masks (stage 2) has no use for it.
        del state["mask_token"]
    pos = state.get("encoder.pos_embed")
    if pos is not None and pos.shape != mim.encoder.pos_embed.shape:
        state["encoder.pos_embed"] = fit_position_embedding(pos, mim.encoder)  # class position (if any) kept
    result = mim.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit encoder {content.get('encoder')} / decoder "
                         f"{content.get('decoder')} (missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]})")
