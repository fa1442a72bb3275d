"""The sections of `TrainConfig` that only training reads: the batch, the optimizer and validation.

    batch:                # a recipe's section; flags --batch.places-per-batch 100 ...
      places_per_batch: 100
      images_per_place: 4
    optimizer:
      base_lr: 8.0e-5
      lr_scaling: none
    validation:
      database: atname:/data/val/database
      queries: atname:/data/val/queries

Each is a frozen dataclass read by placeforge.config like any other (typed values, the
closest name for a misspelled key); `validate()` checks what the section alone decides, and
TrainConfig.validate the rules that involve other settings (the stage, the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class BatchGeometry:
    """What one rank's loader batch holds (trainer.data.make_loader): B pairs in stage 1 ("pairs"),
    P places x K images in stage 2 ("groups")."""

    pairs_per_batch: int = field(default=32, metadata={"help": "stage 1: place pairs per rank per step (B)"})
    places_per_batch: int = field(default=16, metadata={"help": "stage 2: places per rank per step (P)"})
    images_per_place: int = field(default=4, metadata={"help": "stage 2: images per place (K)"})

    def validate(self) -> None:
        for name in ("pairs_per_batch", "places_per_batch", "images_per_place"):
            if getattr(self, name) < 1:
                raise ValueError(f"batch.{name} must be >= 1, got {getattr(self, name)}")

    def items_per_step(self, stage: str) -> int:
        """Place samples one batch consumes."""
        return self.pairs_per_batch if stage == "pairs" else self.places_per_batch

    def min_images(self, stage: str) -> int:
        """Images a place sample needs to be usable by `stage`."""
        return 2 if stage == "pairs" else self.images_per_place


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW over layer-decay groups (trainer.engine) and its per-step LR and weight decay (trainer.schedules)."""

    base_lr: float = field(default=3e-4, metadata={"help": "top-layer LR (per 1024 images or places: lr_scaling)"})
    classifier_lr: float | None = field(
        default=None, metadata={"help": "stage 2: the CosFace classifiers' base LR, scaled and scheduled as base_lr "
                                        "is (their LR is classifier_lr / base_lr times the model's at every step; "
                                        "MutualVPR 1e-2 against 1e-5); None: base_lr"})
    lr_scaling: Literal["linear", "sqrt_places", "none"] = field(
        default="linear", metadata={"help": "peak LR: linear: base_lr x images per step / 1024; sqrt_places: base_lr x "
                                            "sqrt(places per step / 1024) (Pair-VPR); none: base_lr. Per step: all "
                                            "ranks together (TrainConfig.peak_lr)"})
    min_lr: float = field(default=1e-6, metadata={"help": "LR at the end of the schedule"})
    lr_schedule: Literal["cosine", "linear"] = field(
        default="cosine", metadata={"help": "after the warm-up, the LR falls from the peak to min_lr along half a "
                                            "cosine (Pair-VPR stage 1) or a straight line (Pair-VPR stage 2: "
                                            "LinearLR to 0.2 x the LR)"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear LR warm-up, in epochs"})
    weight_decay: float = field(default=0.04, metadata={"help": "weight decay at the start"})
    weight_decay_end: float = field(default=0.4, metadata={"help": "weight decay at the end (cosine)"})
    layer_decay: float = field(default=0.9, metadata={"help": "layer-wise LR decay (0.9 ViT-B, 0.95 L/G; 1: none)"})
    layer_decay_over: Literal["encoder", "encoder_decoder"] = field(
        default="encoder", metadata={"help": "stage 1: layer decay counts the encoder's blocks (the decoder gets the "
                                             "peak LR), or encoder_decoder: encoder + decoder blocks, as Pair-VPR "
                                             "(trainer.schedules.encoder_decoder_layer_id)"})
    patch_embed_lr_scale: float = field(
        default=1.0, metadata={"help": "extra factor on the patch embedding's LR (Pair-VPR stage 1: 0.2)"})
    adam_betas: tuple[float, ...] | None = field(
        default=None, metadata={"help": "AdamW (beta1, beta2), e.g. 0.9,0.999; None: (0.9, 0.95) in stage 1 (MAE's), "
                                        "(0.9, 0.999) in stage 2"})
    clip_grad: float = field(default=3.0, metadata={"help": "global gradient-norm clip (0: none)"})

    def validate(self) -> None:
        if self.base_lr < 0 or self.min_lr < 0:
            raise ValueError(f"optimizer.base_lr and min_lr must be >= 0, got {self.base_lr}, {self.min_lr}")
        if self.classifier_lr is not None and not self.classifier_lr > 0:
            raise ValueError(f"optimizer.classifier_lr must be > 0 or None, got {self.classifier_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optimizer.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not self.patch_embed_lr_scale >= 0:
            raise ValueError(f"optimizer.patch_embed_lr_scale must be >= 0, got {self.patch_embed_lr_scale}")
        if self.adam_betas is not None and (len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas)):
            raise ValueError(f"optimizer.adam_betas must be two numbers in [0, 1) (beta1, beta2), "
                             f"got {self.adam_betas}")


@dataclass(frozen=True)
class ValidationConfig:
    """Recall on a held-out split every few epochs during training; the best epoch's model is kept."""

    database: str = field(
        default="", metadata={"help": "validation database images, FORMAT:PATH (as evaluate.py); empty: none"})
    queries: str = field(default="", metadata={"help": "validation queries, FORMAT:PATH"})
    every_epochs: int = field(
        default=1, metadata={"help": "measure validation Recall@1/5 every N epochs (and after the last)"})
    rerank_top_k: int = field(
        default=20, metadata={"help": "stage 2: validation also re-ranks the global top K (0: global only)"})
    radius_m: float = field(default=25.0, metadata={"help": "a database image this close to a query is right"})

    def validate(self) -> None:
        if bool(self.database) != bool(self.queries):
            raise ValueError("give both validation.database and validation.queries, or neither")
        if self.every_epochs < 1 or not self.radius_m > 0 or self.rerank_top_k < 0:
            raise ValueError("validation.every_epochs must be >= 1, radius_m > 0 and rerank_top_k >= 0")
