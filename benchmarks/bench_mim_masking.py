"""Stage-1 training steps per second with image 1's masked patches dropped (MAE) or replaced
by the mask token over the full grid (Pair-VPR), on one recipe's model and batch.

    .venv/bin/python benchmarks/bench_mim_masking.py                       # the CPU demo's stage 1
    .venv/bin/python benchmarks/bench_mim_masking.py --config configs/demo_pretrain.yaml --rounds 5

One step is the trainer's `pretrain_step`, backward and a torch AdamW over the recipe's
layer-decay groups (no DeepSpeed, no loader): a batch of random uint8 images, the same for
both modes, and the same initial weights.  The two modes alternate, `--steps` timed steps
each per round, so a machine whose load changes during the run slows both alike; the table
gives each mode's median over the rounds.  fp32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from placeforge.config import from_mapping, load_file
from placeforge.trainer.batches import PairBatch
from placeforge.trainer.engine import build_optimizer, pretrain_step
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_pretrain_model

REPO = Path(__file__).resolve().parents[1]


def steps_per_s(cfg: TrainConfig, batch: PairBatch, steps: int, warmup: int) -> float:
    """Build the stage-1 model of `cfg` (seed 0), run `warmup` steps, then time `steps` steps."""
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, load_encoder_weights=False).train()
    optimizer = build_optimizer(model, cfg)
    device = torch.device("cpu")
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        loss = pretrain_step(model, batch, cfg, torch.Generator().manual_seed(step), device)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_pretrain.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each timing both modes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = from_mapping(TrainConfig, load_file(args.config), where=str(args.config))
    configs = {mode: from_mapping(TrainConfig, {"encoder": {"weights": None}, "encoder_init": "random",
                                                "mim_masking": mode}, base=base, where=str(args.config))
               for mode in ("drop", "mask_token")}
    cfg = configs["drop"]
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch.pairs_per_batch, 3, cfg.encoder.image_size, cfg.encoder.image_size)
    batch = PairBatch(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                      torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                      torch.arange(cfg.batch.pairs_per_batch))
    rates: dict[str, list[float]] = {mode: [] for mode in configs}
    for _ in range(args.rounds):
        for mode, mode_cfg in configs.items():
            rates[mode].append(steps_per_s(mode_cfg, batch, args.steps, args.warmup))
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    print(f"{args.config.name}: {cfg.encoder.name} at {cfg.encoder.image_size} px, {cfg.batch.pairs_per_batch} pairs, "
          f"mask ratio {cfg.mask_ratio}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps")
    print("| masking | steps/s (median) | each round |")
    print("| --- | --- | --- |")
    for mode, values in rates.items():
        print(f"| {mode} | {medians[mode]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"drop is {medians['drop'] / medians['mask_token']:.2f} x as fast as mask_token")
    return medians


if __name__ == "__main__":
    main()
