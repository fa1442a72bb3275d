"""One training process's state and its jobs between steps: the DeepSpeed engine, checkpoints,
exports, metrics, validation, reclustering, following new label versions and growing CosFace.

trainer/train.py builds a `Run` per process and drives it through the epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed as torch_dist

from placeforge.trainer.cosface_groups import labels_group_class_ids
from placeforge.trainer.engine import grow_cosface, regroup_cosface
from placeforge.trainer.label_versions import check_label_set
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import global_model_of, save_mim
from placeforge.trainer.train_state import DistState, TrainState, prune_checkpoints, write_rng_states, write_state

log = logging.getLogger(__name__)


class Run:
    """The state of one training process: config, ranks, engine, outputs."""

    def __init__(self, cfg: TrainConfig, dist: DistState, device: torch.device, ds_config: dict, args) -> None:
        self.cfg, self.dist, self.device, self.ds_config, self.args = cfg, dist, device, ds_config, args
        self.out = Path(cfg.out)
        self.checkpoints = self.out / "checkpoints"
        self.dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
        self.engine = None
        self.validation = None  # trainer.validation.ValidationSplit on rank 0 when configured

    # ---- engine ----
    def initialize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)

    def gathered(self):
        """Whole weights on every rank for an export (ZeRO-3 partitions them)."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    # ---- outputs ----
    def save(self, state: TrainState, tag: str | None = None, mark_latest: bool = True) -> str:
        """All ranks: DeepSpeed states and their RNG file; then rank 0: train_state.json and
        `latest`, and, once every rank is past the barrier, old checkpoints beyond
        keep_checkpoints are deleted.  Nothing of ours goes into DeepSpeed's pickle
        (`client_state`): a resume reads our state from our JSON files."""
        tag = tag or state.tag
        self.engine.save_checkpoint(str(self.checkpoints), tag=tag, save_latest=False)
        write_rng_states(self.checkpoints, tag, self.dist.rank)
        self.barrier()  # every rank's files are on disk before train_state.json marks the checkpoint complete
        if self.dist.is_main:
            write_state(self.checkpoints, tag, state, mark_latest)
        self.barrier()
        if mark_latest and self.dist.is_main and self.cfg.keep_checkpoints:
            self.prune()
        return tag

    def prune(self) -> None:
        """Rank 0: delete checkpoints older than the newest keep_checkpoints, keeping the best
        validated epoch's.  A deletion that fails is reported and training goes on."""
        try:
            best = _best_tags(self.out) if self.cfg.validation.database else []
            removed = prune_checkpoints(self.checkpoints, self.cfg.keep_checkpoints, keep=best)
        except OSError as error:
            log.warning("deleting old checkpoints in %s failed: %s", self.checkpoints, error)
            return
        if removed:
            self.log({"event": "checkpoints_pruned", "tags": removed})

    def export(self, epoch: int) -> Path:
        """The epoch's global-descriptor model (and stage-1 MIM weights); returns the model path."""
        from placeforge.models.checkpoint import save_model_checkpoint

        path = self.out / "export" / f"model_epoch{epoch:04d}.pt"
        with self.gathered():
            if self.dist.is_main:
                module = self.engine.module
                encoder_cfg = dataclasses.replace(self.cfg.encoder, weights=None)
                # Not `.float()` on the modules: that would cast the engine's bf16 weights in place;
                # save_model_checkpoint writes float32 copies.
                save_model_checkpoint(global_model_of(module, self.cfg), encoder_cfg, path,
                                      pair=getattr(module, "pair", None), decoder=self.cfg.decoder)
                if self.cfg.stage == "pretrain":
                    save_mim(module, self.cfg, self.out / "export" / f"mim_epoch{epoch:04d}.pt")
        self.barrier()
        return path

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            torch_dist.barrier()

    def from_main(self, value):
        """Rank 0's `value` on every rank (a small picklable object)."""
        if self.dist.world_size > 1:
            box = [value]
            torch_dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    # ---- validation ----
    def validate(self, epoch: int, global_step: int, exported: Path) -> None:
        """Rank 0: Recall@1/5 on the validation split into metrics.jsonl and export/validation.json;
        the best epoch by global Recall@1 (ties: the later one) is copied to export/best_model.pt."""
        with self.gathered():  # a collective under ZeRO-3: every rank enters, rank 0 measures
            if self.dist.is_main:
                from placeforge.trainer.validation import validate

                module = self.engine.module
                pair = getattr(module, "pair", None) if self.cfg.stage == "finetune" else None
                encoder = self.cfg.encoder
                result = validate(global_model_of(module, self.cfg), pair, self.validation, encoder.image_size,
                                  encoder.resize, self.device, self.cfg.validation.rerank_top_k)
        if self.dist.is_main:
            from placeforge.trainer.validation import record_validation

            record = {"event": "validation", "epoch": epoch, "step": global_step,
                      **{k: round(v, 3) for k, v in result.items()}}
            self.log(record)
            record_validation(self.out / "export", record, exported)
        self.barrier()

    # ---- stage 2 ----
    def recluster(self, epoch: int, exported: Path, label_version: int) -> int:
        """Rank 0 writes a new label version from `exported`; every rank gets the version to use."""
        version = label_version
        if self.dist.is_main:
            try:
                from placeforge.clustering.job import ReclusterConfig, recluster
                from placeforge.clustering.labels import read_manifest
                from placeforge.config import from_mapping

                previous = read_manifest(self.cfg.labels, label_version).params.get("config", {})
                summary = recluster(self.cfg.shards, self.cfg.labels, from_mapping(ReclusterConfig, previous),
                                    checkpoint=exported, ray_address=self.args.ray_address)
                version = summary.manifest.version
                self.log({"event": "recluster", "epoch": epoch, "label_version": version,
                          "seconds": round(summary.seconds, 2)})
            except Exception as error:  # noqa: BLE001 - any failure keeps training on the old labels
                log.error("reclustering after epoch %d failed; keeping label version %d: %s: %s", epoch,
                          label_version, type(error).__name__, error)
                self.log({"event": "recluster_failed", "epoch": epoch, "label_version": label_version,
                          "error": f"{type(error).__name__}: {error}"})
        self.barrier()
        return self.from_main(version)

    def newest_labels(self, epoch: int, label_version: int) -> int:
        """The newest complete label version (an external relabeler writes them); same on every rank."""
        version = label_version
        if self.dist.is_main:
            from placeforge.clustering.labels import latest_version

            newest = latest_version(self.cfg.labels)
            if newest is not None and newest > label_version:
                try:  # another process wrote it: checked as the starting version was
                    check_label_set(self.cfg.shards, self.cfg.labels, newest)
                except (ValueError, OSError) as error:
                    log.warning("label version %d refused; staying on %d: %s", newest, label_version, error)
                    self.log({"event": "labels_refused", "epoch": epoch, "label_version": newest,
                              "error": str(error)})
                else:
                    version = newest
                    log.info("epoch %d uses label version %d (was %d)", epoch + 1, version, label_version)
                    self.log({"event": "labels_followed", "epoch": epoch, "label_version": version})
        return self.from_main(version)

    def grow_classes(self, num_classes: int, label_version: int) -> None:
        """Grow CosFace (with cosface_groups: give each group's classifier `label_version`'s
        classes) and rebuild the engine around the same module with a new AdamW.

        Adam moments carry over when DeepSpeed hands us the torch AdamW itself (ZeRO 0, fp32);
        otherwise the new optimizer starts with fresh moments (documented limitation).
        """
        module = self.engine.module
        old = self.engine.optimizer if isinstance(self.engine.optimizer, torch.optim.AdamW) else None
        if module.cosface_groups is not None:
            rows = labels_group_class_ids(str(self.cfg.labels), label_version, self.cfg.cosface_groups)
            optimizer = regroup_cosface(module, old, self.cfg, list(rows))
            module.cosface_groups.to(self.device, self.dtype)
        elif num_classes <= module.cosface.num_classes:
            return
        else:
            optimizer = grow_cosface(module, old, self.cfg, num_classes)
            module.cosface.to(self.device, self.dtype)
        self.engine = None
        self.initialize(module, optimizer)


def _best_tags(out: Path) -> list[str]:
    """The checkpoint that holds the best validated epoch's weights (export/validation.json), if any:
    validation runs before the epoch-end save, so epoch e's weights are checkpoint epoch e+1, step 0."""
    from placeforge.trainer.validation import VALIDATION_FILE

    path = out / "export" / VALIDATION_FILE
    best = json.loads(path.read_text()).get("best") if path.is_file() else None
    return [TrainState(epoch=best["epoch"] + 1).tag] if best else []
