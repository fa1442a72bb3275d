"""Train Pair-VPR stage 1 (Siamese MIM) or stage 2 (joint fine-tuning + CosFace) with DeepSpeed.

    python -m placeforge.trainer.train --shards S --out runs/pre --epochs 2                  # 1 process, CPU or GPU
    deepspeed --num_gpus 8 trainer/train.py --config configs/pretrain_vitb.yaml --shards S --out O
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 trainer/train.py --config ... --resume

Outputs in --out: train_config.json (resolved), deepspeed_config.json (generated from it),
metrics.jsonl (rank 0; one line per step), checkpoints/<tag>/ (DeepSpeed states, and our
train_state.json and rng_rankNNNN.json; `--resume` continues from checkpoints/latest,
mid-epoch exactly: the epoch's loader is rebuilt and its consumed batches are skipped; the
newest --keep-checkpoints of them stay), export/model_epochNNNN.pt (models.checkpoint
global-descriptor model, for pipelines/recluster.py and evaluation) and, in stage 1,
export/mim_epochNNNN.pt (stage 2's --init-from).  Bad inputs fail in seconds, before
anything is written (docs/errors.md).

Stage 2 with --recluster-every-epochs N: after every N-th epoch rank 0 runs a clustering
round (clustering.job.recluster, local Ray or --ray-address) with the exported model; a
failure is logged and the previous labels stay.  The label version is broadcast from
rank 0, the CosFace head grows to the version's next_class_id (class ids are stable, rows
are only appended) and the next epoch's loader reads the new version.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from placeforge.config import (
    add_config_arguments,
    check_output_folder,
    config_from_args,
    migrate,
    save_config,
    to_dict,
)
from placeforge.fileio import OutputLockedError, output_lock
from placeforge.logs import setup_logging
from placeforge.models.dinov2 import require_weights_file
from placeforge.models.encoders import encoder_spec
from placeforge.raysession import free_port
from placeforge.shards.reader import ShardSet, check_enough_shards
from placeforge.trainer.cosface_groups import cosface_group_of_epoch, labels_group_class_ids
from placeforge.trainer.data import make_loader
from placeforge.trainer.engine import (
    activate_cosface_group,
    build_optimizer,
    finetune_step,
    pretrain_step,
    step_generator,
)
from placeforge.trainer.label_versions import check_label_set
from placeforge.trainer.run import Run
from placeforge.trainer.schedules import (
    LR_SCHEDULES,
    set_optimizer_values,
    weight_decay_schedule,
)
from placeforge.trainer.train_config import TrainConfig, deepspeed_config
from placeforge.trainer.train_models import (
    build_finetune_model,
    build_pretrain_model,
    check_stage1_export,
)
from placeforge.trainer.train_state import (
    DistState,
    TrainState,
    config_changes,
    read_latest,
    read_rng_states,
    restore_rng_states,
)

log = logging.getLogger("placeforge.trainer.train")  # not __name__: `deepspeed trainer/train.py` runs it as "__main__"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="placeforge.trainer.train", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="checkpoint and exit after this many global steps (a job time limit; tests)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster for reclustering (default: local Ray)")
    parser.add_argument("--weights-digest", action="store_true",
                        help="every rank prints a sha256 of its final weights (checks that ranks agree)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher
    add_config_arguments(parser, TrainConfig)
    return parser


def cpu_threads(cores: int, ranks_on_node: int, loader_workers: int) -> int:
    """Torch threads of one CPU rank: its share of the cores minus its loader workers.

    More threads than free cores makes every OpenMP region wait for a preempted thread: on
    2 cores with one loader worker, 2 threads made a third of the steps ~7x slower (5 s
    instead of 0.7 s, docs/benchmarks.md).
    """
    return max(1, cores // max(1, ranks_on_node) - loader_workers)


def planned_steps(cfg: TrainConfig, dist: DistState, epoch: int, label_version: int | None) -> int:
    """Steps of `epoch` on every rank: the loader's count, capped by max_steps_per_epoch."""
    _, steps = epoch_loader(cfg, dist, epoch, label_version)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{cfg.shards}: epoch {epoch} has no full batch on some rank; use smaller batches")
    return steps


def epoch_loader(cfg: TrainConfig, dist: DistState, epoch: int, label_version: int | None):
    geometry = cfg.batch
    return make_loader(cfg.shards, "pairs" if cfg.stage == "pretrain" else "groups", rank=dist.rank,
                       world_size=dist.world_size, num_workers=cfg.num_workers, geometry=geometry,
                       image_size=cfg.encoder.image_size, epoch=epoch, seed=cfg.seed,
                       labels_dir=cfg.labels if cfg.stage == "finetune" else None, label_version=label_version,
                       pin_memory=torch.cuda.is_available(), augment=cfg.augment,
                       pairing=cfg.pairs,
                       batch_places_from=cfg.batch_places_from,
                       cosface_group=cosface_group_of_epoch(epoch, cfg.cosface_groups) if cfg.cosface_groups else None)


def reduce_terms(terms: dict[str, torch.Tensor], dist: DistState,
                 device: torch.device) -> tuple[dict[str, float], bool]:
    """Mean of each loss term over ranks, and whether every rank's loss is finite (one
    all-reduce, so all ranks take the same decision to stop)."""
    names = sorted(terms)
    values = torch.stack([terms[n].detach().float().reshape(()).cpu() for n in names])  # [T]
    finite = torch.isfinite(values).all()
    packed = torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), (~finite).float().view(1)])
    if dist.world_size > 1:
        packed = packed.to(device)  # NCCL reduces CUDA tensors only
        torch_dist.all_reduce(packed)
        packed = packed.cpu()
        packed[:-1] /= dist.world_size
    if packed[-1] > 0:
        return {n: float(v) for n, v in zip(names, values)}, False
    return {n: float(v) for n, v in zip(names, packed[:-1])}, True


def label_setup(cfg: TrainConfig) -> tuple[int | None, int]:
    """(label version, CosFace rows) a fresh stage-2 run starts with: the latest version."""
    if cfg.stage != "finetune" or not cfg.labels:
        return None, 1
    from placeforge.clustering.labels import read_manifest
    from placeforge.trainer.label_versions import resolve_label_version

    version = resolve_label_version(cfg.labels)
    return version, read_manifest(cfg.labels, version).next_class_id


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_main(args)
    except (ValueError, FileNotFoundError, OutputLockedError) as err:  # bad config, inputs that do not fit,
        print(f"train: error: {err}", file=sys.stderr)                  # a run already writing OUT: no traceback
        return 2


def run_main(args: argparse.Namespace) -> int:
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)  # a bare single-process run: a world of one
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist = DistState.from_env(os.environ)
    setup_logging(rank=dist.rank if dist.world_size > 1 else None)  # ranks other than 0: warnings only
    cfg = config_from_args(TrainConfig, args)  # logs where an older key moved, with the time
    cfg.check_inputs()
    check_start(cfg, dist)
    with contextlib.ExitStack() as held:
        if dist.is_main:  # one run per OUT, checked before the minute of start-up below
            held.enter_context(output_lock(cfg.out, "train"))
        return _run_locked(args, cfg, dist)


def check_start(cfg: TrainConfig, dist: DistState) -> None:
    """Every rank, in seconds and before the lock, DeepSpeed's start-up and any write (a refused
    run leaves no trace): OUT can be written, SHARDS is a complete shard set with a shard for
    every loader, INIT_FROM is a stage-1 export.  A resumed checkpoint and the label set are
    checked next, under the lock (`_run_locked`)."""
    check_output_folder(cfg.out)
    check_enough_shards(len(ShardSet.open(cfg.shards).urls), dist.world_size, cfg.num_workers)
    if cfg.stage == "finetune" and cfg.init_from:
        check_stage1_export(cfg.init_from)
    elif cfg.encoder.weights:  # a recipe that starts from DINOv2 never silently starts from random weights
        require_weights_file(cfg.encoder.weights, encoder_spec(cfg.encoder.name).release_file)


def _run_locked(args: argparse.Namespace, cfg: TrainConfig, dist: DistState) -> int:
    if torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads(len(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                          cfg.num_workers))

    # Inputs are read and checked before the DeepSpeed start-up, so a bad one fails in seconds;
    # what only rank 0 reads fails there, and the launcher then stops the other ranks.
    checkpoints = Path(cfg.out) / "checkpoints"
    resumed = read_latest(checkpoints) if args.resume else None
    if resumed:
        tag, state = resumed
        saved = migrate(TrainConfig, state.config)[0]  # an older run's flat keys at their new place
        changed = config_changes(saved, to_dict(cfg), to_dict(TrainConfig()))
        if changed:  # a different recipe would silently continue someone else's schedule and weights
            raise ValueError(f"{checkpoints / tag} was written with another config "
                             f"({'; '.join(changed[:6])}); resume with the same config, or train into a new --out")
        rng = read_rng_states(checkpoints, tag, dist.rank)
    else:
        tag, rng, (version, classes) = None, None, label_setup(cfg)
        state = TrainState(label_version=version, num_classes=classes, config=to_dict(cfg))
    if state.label_version is not None and dist.is_main:
        check_label_set(cfg.shards, cfg.labels, state.label_version)
    validation = None
    if cfg.validation.database and dist.is_main:
        from placeforge.trainer.validation import ValidationSplit

        validation = ValidationSplit.open(cfg.validation.database, cfg.validation.queries, cfg.validation.radius_m)

    import deepspeed

    timeout = datetime.timedelta(hours=2 if cfg.recluster_every_epochs else 0.5)  # ranks wait for clustering
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=timeout)
    ds_config = deepspeed_config(cfg, dist.world_size, device.type)
    run = Run(cfg, dist, device, ds_config, args)
    run.validation = validation
    if dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out / "train_config.json")
        (run.out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")

    if args.resume and resumed is None and dist.is_main:
        log.warning("--resume: no checkpoint in %s; starting from scratch", run.checkpoints)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.stage == "pretrain":
        model = build_pretrain_model(cfg)
    else:  # cosface_groups: each group's classifier holds the label version's classes of its group
        rows = labels_group_class_ids(str(cfg.labels), state.label_version, cfg.cosface_groups) \
            if cfg.cosface_groups else None
        model = build_finetune_model(cfg, state.num_classes, group_class_ids=None if rows is None else list(rows))
    run.initialize(model, build_optimizer(model, cfg))
    if tag is not None:
        run.engine.load_checkpoint(str(run.checkpoints), tag=tag)  # DeepSpeed's own states (docs/cluster.md)
        restore_rng_states(rng)  # ours, from our JSON file
        if rng is None and dist.is_main:
            log.warning("%s has no RNG state for rank %d (an older trainer wrote it): the global RNGs go on "
                        "from the seed", run.checkpoints / tag, dist.rank)
        log.info("resumed from %s: epoch %d, step %d, global step %d", run.checkpoints / tag, state.epoch,
                 state.step_in_epoch, state.global_step)
    code = train(run, state)
    if args.weights_digest:  # printed by every rank: the answer --weights-digest asks for, not a log event
        print(f"rank {dist.rank}: final weights sha256 {weights_digest(run.engine.module)}", flush=True)
    return code


def weights_digest(module: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(run: Run, state: TrainState) -> int:
    cfg, dist = run.cfg, run.dist
    from tqdm import tqdm

    steps_by_epoch = [planned_steps(cfg, dist, e, state.label_version) for e in range(cfg.epochs)]
    total_steps = sum(steps_by_epoch)
    warmup_steps = round(cfg.optimizer.warmup_epochs * total_steps / cfg.epochs)
    images_per_step = cfg.images_per_rank_step() * dist.world_size
    peak_lr = cfg.peak_lr(dist.world_size)  # by lr_scaling: linear over images, sqrt over places, or none
    global_step, version = state.global_step, state.label_version
    totals = {"steps": 0, "seconds": 0.0, "data_wait_s": 0.0}  # for the closing summary
    ahead = None  # (epoch, label version, loader, iterator): the next epoch's loader, started early

    for epoch in range(state.epoch, cfg.epochs):
        steps = steps_by_epoch[epoch]
        first = state.step_in_epoch if epoch == state.epoch else 0
        if ahead is not None and ahead[:2] == (epoch, version):
            loader, batches = ahead[2], ahead[3]
        else:
            loader, _ = epoch_loader(cfg, dist, epoch, version)
            batches = iter(loader)
        ahead = None
        if cfg.cosface_groups:  # this epoch's CosPlace group: only its classifier trains
            activate_cosface_group(run.engine.module, run.engine.optimizer,
                                   cosface_group_of_epoch(epoch, cfg.cosface_groups))
        for _ in range(first):  # mid-epoch resume: the loader is deterministic, skip what was consumed
            next(batches)
        progress = tqdm(range(first, steps), desc=f"epoch {epoch}", disable=not dist.is_main, leave=False)
        for step_in_epoch in progress:
            if step_in_epoch == max(first, steps - PREFETCH_STEPS) and _loader_carries_over(cfg, epoch):
                # Start the next epoch's workers now: their start-up (shard open, shuffle buffer,
                # first decode) then overlaps the last steps and the export instead of stalling step 1.
                next_loader, _ = epoch_loader(cfg, dist, epoch + 1, version)
                ahead = (epoch + 1, version, next_loader, iter(next_loader))
            started = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - started
            opt = cfg.optimizer
            lr = LR_SCHEDULES[opt.lr_schedule](global_step, total_steps, warmup_steps, peak_lr, opt.min_lr)
            weight_decay = weight_decay_schedule(global_step, total_steps, opt.weight_decay, opt.weight_decay_end)
            set_optimizer_values(run.engine.optimizer, lr=lr, weight_decay=weight_decay)
            if cfg.stage == "pretrain":
                generator = step_generator(cfg.seed, dist.rank, global_step)
                terms = pretrain_step(run.engine, batch, cfg, generator, run.device, run.dtype)
            else:
                terms = finetune_step(run.engine, batch, cfg, run.device, run.dtype)
            values, finite = reduce_terms(terms, dist, run.device)
            here = TrainState(epoch, step_in_epoch, global_step, version, _num_classes(run), to_dict(cfg))
            if not finite:
                tag = run.save(here, tag=f"diverged-{here.tag}", mark_latest=False)
                if dist.is_main:  # every rank stops; one says why
                    log.error("loss is not finite at global step %d (epoch %d, step %d): %s; the weights before this "
                              "step are in %s ('latest' still points at the last good checkpoint). Lower base_lr or "
                              "clip_grad, or check the data.", global_step, epoch, step_in_epoch, values,
                              run.checkpoints / tag)
                return 3
            run.engine.backward(terms["loss"])
            run.engine.step()
            global_step += 1
            seconds = time.perf_counter() - started
            totals["steps"] += 1
            totals["seconds"] += seconds
            totals["data_wait_s"] += data_wait
            if global_step % cfg.log_every == 0:
                run.log({"step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch + 1, **values,
                         "lr": lr, "weight_decay": weight_decay, "images_per_s": images_per_step / seconds,
                         "step_s": seconds, "data_wait_s": data_wait, "label_version": version})
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
            after = TrainState(epoch, step_in_epoch + 1, global_step, version, _num_classes(run), to_dict(cfg))
            stop = run.args.stop_after_steps is not None and global_step >= run.args.stop_after_steps
            periodic = cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
            if step_in_epoch + 1 < steps and (stop or periodic):
                run.save(after)
            if stop and step_in_epoch + 1 < steps:
                return 0
        del batches, loader  # stop this epoch's workers (the next epoch's, if started, keep going)
        exported = run.export(epoch)
        last = epoch + 1 == cfg.epochs
        if cfg.validation.database and ((epoch + 1) % cfg.validation.every_epochs == 0 or last):
            run.validate(epoch, global_step, exported)
        new_version = version
        if _reclusters_after(cfg, epoch) and not last:
            new_version = run.recluster(epoch, exported, version)
        elif cfg.follow_latest_labels and not last:
            new_version = run.newest_labels(epoch, version)
        if new_version != version:
            from placeforge.clustering.labels import read_manifest

            version = new_version
            run.grow_classes(read_manifest(cfg.labels, version).next_class_id, version)
        run.save(TrainState(epoch + 1, 0, global_step, version, _num_classes(run), to_dict(cfg)))
        if run.args.stop_after_steps is not None and global_step >= run.args.stop_after_steps:
            return 0
    if dist.is_main and totals["steps"]:
        # The run's closing report on stdout (with the validation curve below), not a log event.
        # Data wait is time the step spent blocked on the loader: the share says whether it keeps up.
        print(f"{cfg.stage}: {totals['steps']} steps, {images_per_step * totals['steps'] / totals['seconds']:.0f} "
              f"images/s, data wait {100 * totals['data_wait_s'] / totals['seconds']:.1f} % of step time, "
              f"label version {version}")
        if cfg.validation.database:
            from placeforge.trainer.validation import validation_summary

            print(validation_summary(run.out / "export", cfg.validation.queries))
    return 0


PREFETCH_STEPS = 3  # steps before an epoch's end at which the next epoch's loader starts


def _reclusters_after(cfg: TrainConfig, epoch: int) -> bool:
    """This run writes a new label version at the end of `epoch`."""
    return bool(cfg.recluster_every_epochs) and (epoch + 1) % cfg.recluster_every_epochs == 0


def _loader_carries_over(cfg: TrainConfig, epoch: int) -> bool:
    """True when the next epoch will read with the same label version, so its loader can start early
    (not after the last epoch, and not when this run reclusters at the boundary; a version that
    changes under follow_latest_labels discards the early loader)."""
    return epoch + 1 < cfg.epochs and not _reclusters_after(cfg, epoch)


def _num_classes(run: Run) -> int:
    cosface = getattr(run.engine.module, "cosface", None)
    return 1 if cosface is None else cosface.num_classes


if __name__ == "__main__":
    sys.exit(main())
