"""Does the streaming loader keep up with the model? Loader alone vs. model alone, per stage.

    .venv/bin/python benchmarks/bench_loader.py [--shards runs/demo/shards --labels runs/demo/labels]

Run `bash scripts/demo.sh` first (it makes the shards and labels). For each stage, with the
demo configs (configs/demo_*.yaml):
  loader: batches/s of trainer.data.make_loader alone over full epochs (the first batch of an
          epoch, which pays for starting the workers and filling the shuffle buffer, is
          reported separately)
  model:  optimizer steps/s of the same model on one fixed batch (forward, backward, AdamW),
          plain PyTorch in this process, so data loading costs nothing
Goal (issue 4): loader >= 3x the model's rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from placeforge.config import from_mapping, load_file
from placeforge.trainer.data import make_loader
from placeforge.trainer.engine import build_optimizer, finetune_step, pretrain_step
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model, build_pretrain_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stage_config(name: str, shards: Path, labels: Path) -> TrainConfig:
    values = load_file(CONFIGS / name)
    values.update(shards=str(shards), labels=str(labels) if values["stage"] == "finetune" else "")
    return from_mapping(TrainConfig, values, where=name)


def bench_loader(cfg: TrainConfig, epochs: int) -> tuple[float, float, int]:
    """(seconds to the first batch, steady batches/s after it, batches) averaged over epochs."""
    stage = "pairs" if cfg.stage == "pretrain" else "groups"
    geometry = cfg.batch
    first, steady_time, steady_batches = 0.0, 0.0, 0
    for epoch in range(epochs):
        loader, steps = make_loader(cfg.shards, stage, rank=0, world_size=1, num_workers=cfg.num_workers,
                                    geometry=geometry, image_size=cfg.encoder.image_size, epoch=epoch, seed=cfg.seed,
                                    labels_dir=cfg.labels or None)
        started = time.perf_counter()
        batches = iter(loader)
        next(batches)
        after_first = time.perf_counter()
        first += after_first - started
        count = sum(1 for _ in batches)
        steady_time += time.perf_counter() - after_first
        steady_batches += count
    return first / epochs, steady_batches / steady_time, steady_batches + epochs


def bench_model(cfg: TrainConfig, steps: int) -> float:
    """Optimizer steps/s on one fixed batch."""
    stage = "pairs" if cfg.stage == "pretrain" else "groups"
    geometry = cfg.batch
    loader, _ = make_loader(cfg.shards, stage, rank=0, world_size=1, num_workers=0, geometry=geometry,
                            image_size=cfg.encoder.image_size, epoch=0, seed=cfg.seed, labels_dir=cfg.labels or None)
    batch = next(iter(loader))
    torch.manual_seed(cfg.seed)
    if cfg.stage == "pretrain":
        model = build_pretrain_model(cfg)
    else:
        model = build_finetune_model(cfg, int(batch.class_ids.max()) + 1)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device("cpu")

    def step() -> None:
        if cfg.stage == "pretrain":
            terms = pretrain_step(model, batch, cfg, generator, device)
        else:
            terms = finetune_step(model, batch, cfg, device)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=Path("runs/demo/shards"))
    parser.add_argument("--labels", type=Path, default=Path("runs/demo/labels"))
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs to time")
    parser.add_argument("--model-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, action="append", default=None,
                        help="loader workers to time (repeatable; default: the config's)")
    args = parser.parse_args()
    rows = []
    for name in ("demo_pretrain.yaml", "demo_finetune.yaml"):
        base = stage_config(name, args.shards, args.labels)
        model_rate = bench_model(base, args.model_steps)
        for workers in args.workers or [base.num_workers]:
            cfg = dataclasses.replace(base, num_workers=workers)
            first, loader_rate, batches = bench_loader(cfg, args.epochs)
            rows.append((cfg.stage, cfg.num_workers, batches, first, loader_rate, model_rate))
    print(f"\n{platform.machine()}, torch threads {torch.get_num_threads()}, shards {args.shards}")
    print("| stage | loader workers | batches | first batch s | loader batches/s (steady) | model steps/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage, workers, batches, first, loader_rate, model_rate in rows:
        print(f"| {stage} | {workers} | {batches} | {first:.2f} | {loader_rate:.1f} | {model_rate:.1f} | "
              f"{loader_rate / model_rate:.2f}x |")
    print("goal: ratio >= 3x")


if __name__ == "__main__":
    main()
