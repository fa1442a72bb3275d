"""The training configuration (both stages) and the DeepSpeed JSON generated from it.

    cfg = from_mapping(TrainConfig, load_file("configs/finetune_vitb.yaml"))   # unknown keys rejected
    ds = deepspeed_config(cfg, world_size=8, device_type="cuda")              # never hand-kept

One frozen dataclass; its defaults are Pair-VPR stage 1 (ViT-B numbers, but the tiny
test encoder so a bare run works on a laptop) as placeforge first trained it: options added
later (masking, trained blocks, LR scaling, layer decay and betas of Pair-VPR's stage 1)
default to the behaviour before them, so an older run resumes as it was trained, and the
recipes under configs/ set the published values.  Stage 2 and the real presets are small
override files under configs/.  `deepspeed_config` is the only source of DeepSpeed
settings: batch size, clipping, ZeRO stage and precision all come from `TrainConfig`,
the optimizer is ours (a torch AdamW over layer-decay groups) and so is the LR schedule
(set per step from trainer.schedules), so the JSON has neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from placeforge.config import Moved, moved
from placeforge.models.decoder import DECODERS
from placeforge.models.encoders import EncoderConfig, encoder_spec
from placeforge.trainer.augment import AugmentConfig
from placeforge.trainer.pairs import PairRule
from placeforge.trainer.schedules import LR_SCALINGS
from placeforge.trainer.sections import BatchGeometry, OptimizerConfig, ValidationConfig


def _scale_from_min(scale_min: float) -> list[float]:
    return [scale_min, 1.0]


@dataclass(frozen=True)
class TrainConfig:
    # The flat keys that became sections (2026-11-30), as older recipe files, flags and runs'
    # train_config.json spell them: read at their new place (placeforge.config.migrate).
    MOVED: ClassVar[dict[str, Moved]] = {
        "encoder": moved("encoder.name"),
        "encoder_weights": moved("encoder.weights"),
        **{key: moved(f"encoder.{key}") for key in ("image_size", "descriptor_dim", "pooling", "pooling_grid",
                                                     "input_norm", "resize", "adapter")},
        **{key: moved(f"optimizer.{key}") for key in (
            "base_lr", "classifier_lr", "lr_scaling", "min_lr", "lr_schedule", "warmup_epochs", "weight_decay",
            "weight_decay_end", "layer_decay", "layer_decay_over", "patch_embed_lr_scale", "adam_betas", "clip_grad")},
        **{key: moved(f"batch.{key}") for key in ("pairs_per_batch", "places_per_batch", "images_per_place")},
        **{f"pair_{key}": moved(f"pairs.{key}") for key in ("max_heading_diff_deg", "panorama_views", "one_per_place")},
        **{f"val_{key}": moved(f"validation.{key}") for key in ("database", "queries", "every_epochs", "rerank_top_k",
                                                                 "radius_m")},
        "finetune_augment": moved("augment.pipeline"),
        "finetune_crop_scale_min": moved("augment.scale", convert=_scale_from_min),
        "finetune_color_jitter": moved("augment.brightness", "augment.contrast", "augment.saturation"),
        "finetune_hue": moved("augment.hue"),
    }

    stage: Literal["pretrain", "finetune"] = field(
        default="pretrain", metadata={"help": "pretrain (stage 1, Siamese MIM) or finetune (stage 2, joint)"})
    shards: str = field(default="", metadata={"help": "shard set folder (pipelines/build_shards.py)"})
    labels: str = field(default="", metadata={"help": "label-set folder (finetune: view classes for CosFace)"})
    out: str = field(default="runs/train", metadata={"help": "output folder: config, metrics, checkpoints, exports"})
    # ---- model ----
    encoder: EncoderConfig = field(
        default_factory=EncoderConfig, metadata={"help": "the global-descriptor model (models.encoders): preset, "
                                                         "image size, descriptor, pooling, starting weights"})
    encoder_init: Literal["pretrained", "random"] = field(
        default="pretrained", metadata={"help": "a DINOv2 preset starts from encoder.weights (pretrained), or from "
                                                "random weights only when asked for (random)"})
    decoder: str = field(default="dec64d2b", metadata={"help": f"decoder preset: {', '.join(DECODERS)}"})
    mask_ratio: float = field(default=0.9, metadata={"help": "share of image 1's patches masked in stage 1"})
    mim_masking: Literal["drop", "mask_token"] = field(
        default="drop", metadata={"help": "stage 1: image 1's masked patches are dropped before the encoder (MAE; "
                                          "about 10 x cheaper at mask ratio 0.9), or mask_token: replaced by the "
                                          "encoder's mask token over the full grid (Pair-VPR; models.decoder)"})
    mim_trainable_last_blocks: int = field(
        default=-1, metadata={"help": "stage 1: encoder blocks trained, counted from the top, with the final norm; "
                                      "the embeddings and earlier blocks get no gradient (Pair-VPR: half the "
                                      "depth). -1: every block and the embeddings"})
    init_from: str | None = field(
        default=None, metadata={"help": "stage 2: a stage-1 export (out/export/mim_epochNNNN.pt) to start from"})
    trainable_last_blocks: int = field(
        default=6, metadata={"help": "stage 2: encoder blocks trained, counted from the top (-1: all; 0 with "
                                     "adapter mulconv, whose encoder trains only its adapters)"})
    # ---- batches ----
    batch: BatchGeometry = field(
        default_factory=BatchGeometry, metadata={"help": "what one rank's step holds: B pairs (stage 1) or P places "
                                                         "x K images (stage 2)"})
    batch_places_from: Literal["any", "one_subset"] = field(
        default="any", metadata={"help": "stage 2: a rank's P places of a step come from the whole shard set (any) or "
                                         "all from one catalog subset, e.g. one GSV-Cities city (one_subset: hard "
                                         "negatives, as Pair-VPR; places of a subset that fill no full group on a "
                                         "loader worker wait for a later epoch, counted in the loader's log line)"})
    augment: AugmentConfig = field(
        default_factory=AugmentConfig, metadata={"help": "stage 2's training-image augmentation (trainer.augment); "
                                                         "stage 1 crops and jitters with the defaults"})
    pairs: PairRule = field(
        default_factory=PairRule, metadata={"help": "stage 1: which two images of a place make a pair "
                                                    "(trainer.pairs)"})
    num_workers: int = field(default=2, metadata={"help": "data-loader processes per rank"})
    # ---- schedule ----
    epochs: int = field(default=10, metadata={"help": "epochs (each a full pass over the rank's shards)"})
    max_steps_per_epoch: int | None = field(
        default=None, metadata={"help": "cap on steps per epoch (tests, demos); None: the loader's steps"})
    optimizer: OptimizerConfig = field(
        default_factory=OptimizerConfig, metadata={"help": "AdamW over layer-decay groups and its LR and weight-"
                                                           "decay schedules (trainer.engine, trainer.schedules)"})
    # ---- stage-2 losses ----
    positives: Literal["view_class", "place"] = field(
        default="view_class", metadata={"help": "stage 2 MS / pair positives: same view class (else place) or place"})
    pair_negative_min_distance_m: float = field(
        default=0.0, metadata={"help": "stage 2: the pair classifier's hardest negative is an image of another place "
                                       "more than this far away (same UTM zone; images without a position always "
                                       "qualify); 0: any other place. Set it to the evaluation radius (25) when "
                                       "neighbouring places overlap, as in a densely sampled city"})
    ms_negative_min_distance_m: float = field(
        default=0.0, metadata={"help": "stage 2: the Multi-Similarity loss pushes apart only images of other places "
                                       "more than this far away (as pair_negative_min_distance_m); a nearer image "
                                       "of another place is neither pulled nor pushed. 0: every other place"})
    pair_aligned_similarity: bool = field(
        default=False, metadata={"help": "stage 2: the pair classifier's logit also gets a learned affine function of "
                                         "the aligned token similarity (mean cosine of the two images' encoder tokens "
                                         "at the same grid position; models.heads.PairClassifier). Not in Pair-VPR; "
                                         "the demo uses it (docs/benchmarks.md, issue 10)"})
    rerank_global_weight: float = field(
        default=0.0, metadata={"help": "stage 2: the re-ranking score adds this times the global descriptors' cosine "
                                       "to the pair classifier's two logits (validation and the exported model "
                                       "file; evaluation uses it unless told otherwise). Not in Pair-VPR (0); the "
                                       "demo's value was chosen on its validation split"})
    ms_weight: float = field(default=1.0, metadata={"help": "weight of the Multi-Similarity loss"})
    pair_bce_weight: float = field(default=2.0, metadata={"help": "weight of the pair-classifier BCE (Pair-VPR 2)"})
    pair_classifier: bool = field(
        default=True, metadata={"help": "stage 2: build Pair-VPR's pair classifier (the stage-1 decoder re-used) and "
                                        "re-rank with it; false: no decoder is built, trained or exported "
                                        "(MutualVPR; needs pair_bce_weight 0)"})
    pair_trains_encoder: bool = field(
        default=True, metadata={"help": "the pair BCE's gradient reaches the encoder (Pair-VPR); false: the pair "
                                        "classifier learns on detached tokens and only MS / CosFace shape the encoder"})
    pair_anchors_per_place: int = field(
        default=0, metadata={"help": "stage 2: the pair classifier trains on the hardest positive and negative of "
                                     "only the first N images of each place in the batch (0: of every image, as "
                                     "Pair-VPR). On a CPU it is a third of the step at 4 images per place; 1 "
                                     "cuts that by 4x"})
    mining_scope: Literal["global", "rank"] = field(
        default="rank", metadata={"help": "stage 2: the MS loss and the pair classifier's hardest positive / "
                                            "negative are mined over the global batch of all ranks (Pair-VPR, "
                                            "whose DataParallel saw the whole batch; gradients equal one process on "
                                            "it; trainer.mining) or within each rank's micro-batch (rank). The same "
                                            "on one process"})
    cosface_weight: float = field(default=1.0, metadata={"help": "weight of CosFace over view classes (0: off)"})
    cosface_scale: float = field(default=30.0, metadata={"help": "CosFace s (CosPlace 30, MutualVPR 60)"})
    cosface_margin: float = field(default=0.4, metadata={"help": "CosFace m (CosPlace 0.4, MutualVPR 0.5)"})
    cosface_groups: int = field(
        default=0, metadata={"help": "stage 2: G > 0 gives each of the CosPlace groups 0 .. G-1 of the label set "
                                     "(clustering.cells) its own CosFace classifier; epoch e trains group e mod G "
                                     "only, on that group's images only (CosPlace, MutualVPR: 8). 0: one "
                                     "classifier over every view class, every image"})
    recluster_every_epochs: int = field(
        default=0, metadata={"help": "stage 2: new view classes every N epochs from the current model (0: never)"})
    follow_latest_labels: bool = field(
        default=False, metadata={"help": "stage 2: at each epoch boundary switch to the newest label version "
                                         "in `labels` (written by pipelines/relabel.py --watch)"})
    validation: ValidationConfig = field(
        default_factory=ValidationConfig, metadata={"help": "recall on a held-out split during training, "
                                                            "and the best epoch kept (trainer.validation)"})
    # ---- system ----
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage 0-3"})
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "every transformer block that runs with gradients (trained encoder blocks, "
                                         "the decoder's, the pair classifier's) keeps only its input for the "
                                         "backward pass and recomputes the rest there (models.recompute): far less "
                                         "activation memory for one more forward of those blocks per step; the "
                                         "gradients are the same (docs/scaling.md). Not in Pair-VPR"})
    seed: int = field(default=0, metadata={"help": "seed of data order, masks and initial weights"})
    checkpoint_every_steps: int = field(
        default=0, metadata={"help": "also checkpoint every N global steps (0: at epoch ends only)"})
    keep_checkpoints: int = field(
        default=3, metadata={"help": "checkpoints kept in OUT/checkpoints: the newest N, plus the one `latest` "
                                     "names and the best validated epoch's; older ones are deleted once a newer "
                                     "one is complete (0: keep all; diverged-* folders are never deleted)"})
    log_every: int = field(default=1, metadata={"help": "write a metrics line every N steps"})

    def validate(self) -> None:
        for section in (self.encoder, self.batch, self.pairs, self.augment, self.optimizer, self.validation):
            section.validate()  # each checks its own ranges; the rules between settings follow
        release = encoder_spec(self.encoder.name).release_file
        starts_from_weights = not (self.stage == "finetune" and self.init_from)  # else from the stage-1 export
        if release and starts_from_weights and not self.encoder.weights and self.encoder_init == "pretrained":
            raise ValueError(f"encoder {self.encoder.name} starts from DINOv2 weights but encoder.weights is not "
                             f"set: set it to your copy of {release} (never downloaded), or set encoder_init: random "
                             "to train from random weights on purpose")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; valid: {', '.join(DECODERS)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mim_trainable_last_blocks < -1:
            raise ValueError(f"mim_trainable_last_blocks must be >= -1, got {self.mim_trainable_last_blocks}")
        if self.optimizer.layer_decay_over == "encoder_decoder" and self.stage != "pretrain":
            raise ValueError("optimizer.layer_decay_over encoder_decoder needs stage pretrain (stage 2's decoder is the pair "
                             "classifier's; Pair-VPR's stage 2 has no layer decay)")
        for name in ("epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch.images_per_place < 2 and not self.cosface_only():
            raise ValueError("batch.images_per_place must be >= 2 (positives are needed), or 1 with CosFace alone "
                             "(stage finetune, ms_weight 0, pair_bce_weight 0)")
        self._check_mutualvpr_options()
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.recluster_every_epochs and self.stage != "finetune":
            raise ValueError("recluster_every_epochs needs stage finetune")
        if self.augment != AugmentConfig() and self.stage != "finetune":
            raise ValueError("augment settings need stage finetune (stage 1 crops and jitters with the defaults)")
        if self.batch_places_from != "any" and self.stage != "finetune":
            raise ValueError(f"batch_places_from {self.batch_places_from} needs stage finetune (stage 1 batches pairs)")
        if self.follow_latest_labels and (self.stage != "finetune" or self.recluster_every_epochs):
            raise ValueError("follow_latest_labels needs stage finetune and recluster_every_epochs 0 "
                             "(labels come either from this run or from an external relabel.py, not both)")
        if (self.recluster_every_epochs or self.follow_latest_labels) and self.zero_stage == 3:
            raise ValueError("growing the CosFace head for a new label version is not supported with ZeRO-3; use 0-2")
        for name in ("pair_negative_min_distance_m", "ms_negative_min_distance_m"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_workers", "checkpoint_every_steps", "keep_checkpoints", "recluster_every_epochs",
                     "pair_anchors_per_place"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def cosface_only(self) -> bool:
        """Stage 2 trains with CosFace alone (MutualVPR's loss): no term needs two images of a place."""
        return (self.stage == "finetune" and self.ms_weight == 0 and self.pair_bce_weight == 0
                and self.cosface_weight > 0)

    def _check_mutualvpr_options(self) -> None:
        """Adapters, no pair classifier, a classifier LR and CosPlace groups."""
        if self.encoder.adapter != "none" and (self.stage != "finetune" or self.trainable_last_blocks != 0):
            raise ValueError(f"encoder.adapter {self.encoder.adapter} needs stage finetune and trainable_last_blocks 0 "
                             "(of the encoder only the adapters train)")
        if not self.pair_classifier and (self.stage != "finetune" or self.pair_bce_weight or self.rerank_global_weight
                                         or self.pair_aligned_similarity):
            raise ValueError("pair_classifier false needs stage finetune, pair_bce_weight 0, rerank_global_weight 0 "
                             "and pair_aligned_similarity false (they need the pair classifier)")
        if self.cosface_groups < 0:
            raise ValueError(f"cosface_groups must be >= 0, got {self.cosface_groups}")
        if self.cosface_groups and (self.stage != "finetune" or not self.cosface_weight or self.zero_stage):
            raise ValueError("cosface_groups needs stage finetune, cosface_weight > 0 and zero_stage 0 (the "
                             "classifiers of the other groups are switched off between epochs)")

    def check_inputs(self) -> None:
        """The folders a run needs (checked at launch, not per override file, so a preset
        file need not name them)."""
        if not self.shards:
            raise ValueError("shards is required (a shard set folder, --shards)")
        if self.stage == "finetune" and not self.labels:
            raise ValueError("stage finetune needs labels (a label-set folder, --labels)")

    def places_per_rank_step(self) -> int:
        """Places one rank's micro-batch holds (stage 1: one per pair)."""
        return self.batch.pairs_per_batch if self.stage == "pretrain" else self.batch.places_per_batch

    def peak_lr(self, world_size: int) -> float:
        """The schedule's peak LR on `world_size` ranks, by `optimizer.lr_scaling` (trainer.schedules.LR_SCALINGS).
        One step is one micro-batch per rank: `deepspeed_config` accumulates no gradients."""
        return LR_SCALINGS[self.optimizer.lr_scaling](self.optimizer.base_lr, self.images_per_rank_step() * world_size,
                                                      self.places_per_rank_step() * world_size)

    def images_per_rank_step(self) -> int:
        """Images one rank's micro-batch holds (stage 1 counts both images of a pair)."""
        if self.stage == "pretrain":
            return 2 * self.batch.pairs_per_batch
        return self.batch.places_per_batch * self.batch.images_per_place


def resolve_bf16(cfg: TrainConfig, device_type: str) -> bool:
    """bf16 on CUDA under "auto"; CPU trains in fp32 (bf16 matmuls there are slow and inexact)."""
    if cfg.precision == "auto":
        return device_type == "cuda"
    return cfg.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed JSON for `cfg` on `world_size` ranks.

    The micro-batch is one loader batch (pairs in stage 1, P x K images in stage 2), one
    optimizer step per batch.  No "optimizer" / "scheduler" blocks: `deepspeed.initialize`
    gets a torch AdamW (layer-decay groups) and the LR is written per step, so nothing
    here needs a JIT-built op.
    """
    batch = cfg.batch
    micro = batch.pairs_per_batch if cfg.stage == "pretrain" else batch.places_per_batch * batch.images_per_place
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # exports need whole weights
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO 1-3
        "bf16": {"enabled": resolve_bf16(cfg, device_type)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves (metrics.jsonl)
        "wall_clock_breakdown": False,
    }
