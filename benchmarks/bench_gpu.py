"""Training throughput per stage and encoder on one device, and the per-GPU memory model.

    .venv/bin/python benchmarks/bench_gpu.py                          # ViT-B and ViT-L (reg4), both stages
    .venv/bin/python benchmarks/bench_gpu.py --micro-batch 32 --json runs/bench_gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --encoders vit_tiny_test,vit_tiny_reg4_dinov2_test \\
        --micro-batch 2 --cosface-classes 16                            # the CPU smoke run (seconds)
    .venv/bin/python benchmarks/bench_gpu.py --memory-model [--gpus 8]  # the memory table, meta device only
    .venv/bin/python benchmarks/bench_gpu.py --activation-checkpointing  # either, with TrainConfig's option on

Throughput: for each stage (pretrain = stage-1 Siamese MIM, finetune = stage-2 global
descriptor + pair classifier + CosFace) and encoder, the real training model from
trainer.train_models with random weights (no file, no network), settings from
configs/pretrain_vitb.yaml / configs/finetune_vitb.yaml (image size 224 / 322, decoder
dec768d12b, stage 2 training the last 6 encoder blocks) with the encoder swapped; the test
presets (no release file) run at 112 px with the dec64d2b decoder.  One step is the trainer's
own `pretrain_step` / `finetune_step`, backward, gradient clipping and a torch AdamW over the
recipe's layer-decay groups (trainer.engine.build_optimizer): DeepSpeed is not used (no
launcher, no ZeRO, no communication), so this is one GPU's compute.  bf16 autocast over fp32
weights on CUDA (DeepSpeed's bf16 mode keeps bf16 weights instead: same 16 bytes per trained
parameter, slightly different activations), fp32 on CPU.  Batches are random uint8 images
already on the device (no loader).  Stage 1's micro-batch counts pairs (2 images each),
stage 2's counts places of 4 images.

FLOPs per step are counted, not estimated: one extra step under
torch.utils.flop_counter.FlopCounterMode (matrix products, convolutions and attention,
forward and backward as actually run, so frozen blocks cost their forward only; elementwise
work and the optimizer are not counted).  On CPU that step runs attention through the math
kernel, because the counter has no formula for CPU flash attention.  The analytic rule it is
checked against (`vit_forward_flops`, equal on the tiny presets in tests/test_bench_gpu.py):
a ViT forward costs 2 x (weights of its matrix products) x tokens + 4 x tokens^2 x width per
block (q k^T and attention x v) + 2 x patches x (patch-embedding weights); training a part
costs 3 x its forward.  MFU = achieved FLOP/s / the device's dense bf16 peak (`PEAK_BF16_TFLOPS`,
data-sheet figures; `--peak-tflops` for others).  Peak memory is torch.cuda.max_memory_allocated
(n/a on CPU).

The memory model (trainer.memory_model) builds each model on the meta device only, so ViT-G
costs nothing; its table is in docs/scaling.md, "Memory per GPU (model)".

`--activation-checkpointing` turns TrainConfig's `activation_checkpointing` on for every row
(trained blocks recompute their activations in backward, models.recompute); both tables show
it in their "act. ckpt" column.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import re
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from placeforge.config import from_mapping, load_file
from placeforge.models.encoders import encoder_spec
from placeforge.trainer.batches import GroupBatch, PairBatch
from placeforge.trainer.engine import build_optimizer, finetune_step, pretrain_step
from placeforge.trainer.memory_model import (
    activation_bytes_per_item,
    build_on_meta,
    count_parameters,
    model_state_bytes,
)
from placeforge.trainer.train_config import TrainConfig, resolve_bf16
from placeforge.trainer.train_models import build_finetune_model, build_pretrain_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"pretrain": REPO / "configs" / "pretrain_vitb.yaml", "finetune": REPO / "configs" / "finetune_vitb.yaml"}
STAGES = tuple(RECIPES)
BENCH_ENCODERS = ("vit_base_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2")
MEMORY_ENCODERS = (*BENCH_ENCODERS, "vit_giant_patch14_reg4_dinov2")
# Items per step when --micro-batch is not given: stage 1 the recipe's 64 pairs per GPU; stage 2
# 12 places x 4 images, the published ~100-place batch split over 8 GPUs (the recipe file's 100
# places per rank need ~2.5 x an 80 GB GPU, docs/scaling.md section 4).
DEFAULT_MICRO_BATCH = {"pretrain": 64, "finetune": 12}
# CosFace rows: about one view class per GSV-Cities place (~62-67 k places, stage 2's data).
DEFAULT_COSFACE_CLASSES = 67_000
# Dense bf16 tensor-core peak in TFLOP/s from the vendors' data sheets (without sparsity), by a
# pattern of torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),  # SXM
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"A10G", 70.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name`, or None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def bench_config(stage: str, encoder: str, micro_batch: int | None = None,
                 activation_checkpointing: bool = False) -> TrainConfig:
    """The stage's recipe file with `encoder` swapped in, random weights, `micro_batch` items
    (pairs or places; None: DEFAULT_MICRO_BATCH) and `activation_checkpointing`."""
    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    recipe = from_mapping(TrainConfig, load_file(RECIPES[stage]), where=str(RECIPES[stage]))
    values = {"encoder": {"name": encoder, "weights": None}, "encoder_init": "random"}
    if encoder_spec(encoder).release_file is None:  # a test preset: the trainer's tiny defaults
        values.update({"encoder": {"name": encoder, "weights": None, "image_size": 112}, "decoder": "dec64d2b"})
    items = DEFAULT_MICRO_BATCH[stage] if micro_batch is None else micro_batch
    values["batch.pairs_per_batch" if stage == "pretrain" else "batch.places_per_batch"] = items
    values["activation_checkpointing"] = activation_checkpointing
    return from_mapping(TrainConfig, values, base=recipe, where=f"{RECIPES[stage]} for {encoder}")


def items_per_step(cfg: TrainConfig) -> int:
    """Pairs (stage 1) or places (stage 2) in one micro-batch."""
    return cfg.batch.pairs_per_batch if cfg.stage == "pretrain" else cfg.batch.places_per_batch


def random_batch(cfg: TrainConfig, num_classes: int, device: torch.device) -> PairBatch | GroupBatch:
    """One loader-shaped batch of random uint8 images on `device`; stage 2 has place p's K images
    in rows p*K .. p*K+K-1, view class = place (mod num_classes)."""
    g = torch.Generator().manual_seed(0)
    size = cfg.encoder.image_size

    def images(count: int) -> torch.Tensor:
        return torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8).to(device)

    if cfg.stage == "pretrain":
        return PairBatch(images(cfg.batch.pairs_per_batch), images(cfg.batch.pairs_per_batch),
                         torch.arange(cfg.batch.pairs_per_batch, device=device))
    count = cfg.batch.places_per_batch * cfg.batch.images_per_place
    place_ids = torch.arange(cfg.batch.places_per_batch, device=device).repeat_interleave(cfg.batch.images_per_place)
    return GroupBatch(images(count), place_ids, torch.arange(count, device=device), place_ids % num_classes)


def build_training_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # built where it runs: no host copy of ViT-L's weights
        if cfg.stage == "pretrain":
            return build_pretrain_model(cfg, load_encoder_weights=False)
        return build_finetune_model(cfg, num_classes)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: PairBatch | GroupBatch,
               cfg: TrainConfig, device: torch.device, bf16: bool) -> None:
    """Forward (bf16 autocast when `bf16`), backward, clip, AdamW step: trainer.train's step without DeepSpeed."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if cfg.stage == "pretrain":
            terms = pretrain_step(model, batch, cfg, torch.Generator().manual_seed(0), device)
        else:
            terms = finetune_step(model, batch, cfg, device)
    terms["loss"].backward()
    if cfg.optimizer.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def counted_flops(step, device: torch.device) -> int:
    """FLOPs of one call of `step()` (FlopCounterMode); CPU attention through the math kernel,
    which the counter can see."""
    with FlopCounterMode(display=False) as counter:
        if device.type == "cpu":
            with sdpa_kernel(SDPBackend.MATH):
                step()
        else:
            step()
    return counter.get_total_flops()


def vit_forward_flops(encoder: nn.Module, image_size: int) -> int:
    """Analytic forward FLOPs of one square image through a timm ViT (see the module docstring):
    2 x matrix-product weights x tokens + 4 x tokens^2 x width per block, + the patch embedding."""
    patches = (image_size // encoder.patch_embed.patch_size[0]) ** 2
    tokens = encoder.num_prefix_tokens + patches
    block_weights = sum(m.weight.numel() for m in encoder.blocks.modules() if isinstance(m, nn.Linear))
    attention = 4 * tokens * tokens * encoder.embed_dim * len(encoder.blocks)
    return 2 * block_weights * tokens + attention + 2 * patches * encoder.patch_embed.proj.weight.numel()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(stage: str, encoder: str, micro_batch: int | None, steps: int, warmup: int, device: torch.device,
              peak_tflops: float | None, num_classes: int, activation_checkpointing: bool = False) -> dict:
    """One table row: build, warm up, count FLOPs in one step, time `steps` steps."""
    cfg = bench_config(stage, encoder, micro_batch, activation_checkpointing)
    images = cfg.images_per_rank_step()
    row = {"stage": stage, "encoder": encoder, "image_size": cfg.encoder.image_size,
           "activation_checkpointing": cfg.activation_checkpointing, "micro_batch": items_per_step(cfg),
           "images_per_step": images, "status": "ok"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bf16 = resolve_bf16(cfg, device.type)
    try:
        model = build_training_model(cfg, num_classes, device).train()
        optimizer = build_optimizer(model, cfg)
        batch = random_batch(cfg, num_classes, device)

        def step() -> None:
            train_step(model, optimizer, batch, cfg, device, bf16)

        for _ in range(warmup):
            step()
        flops = counted_flops(step, device)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - started) / steps
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
        return row
    finally:
        model = optimizer = batch = None
        gc.collect()
    tflops = flops / seconds / 1e12
    row.update(step_ms=seconds * 1e3, images_per_s=images / seconds, tflop_per_step=flops / 1e12, tflops=tflops,
               mfu=tflops / peak_tflops if peak_tflops else None,
               peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    return row


def memory_row(stage: str, encoder: str, gpus: int, num_classes: int, micro_batch: int | None = None,
               activation_checkpointing: bool = False) -> dict:
    """The memory model's figures for one (stage, encoder) on `gpus` GPUs (trainer.memory_model)."""
    cfg = bench_config(stage, encoder, micro_batch, activation_checkpointing)
    model = build_on_meta(cfg, num_classes)
    params = count_parameters(model)
    per_item = activation_bytes_per_item(model, cfg)  # a pair (stage 1) or an image (stage 2)
    per_image = per_item / 2 if stage == "pretrain" else per_item
    images = cfg.images_per_rank_step()
    states = {zero: model_state_bytes(params, zero, gpus).total for zero in range(4)}
    return {"stage": stage, "encoder": encoder, "image_size": cfg.encoder.image_size,
            "activation_checkpointing": cfg.activation_checkpointing, "params": params.total,
            "trainable_params": params.trainable, "gpus": gpus,
            **{f"zero{zero}_model_states_gb": total / 1e9 for zero, total in states.items()},
            "activation_mb_per_image": per_image / 1e6, "micro_batch": items_per_step(cfg),
            "images_per_step": images, "activations_gb": per_image * images / 1e9,
            "zero2_total_gb": (states[2] + per_image * images) / 1e9}


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


THROUGHPUT_HEADER = ("| stage | encoder | image px | act. ckpt | micro-batch | images / step | step ms | images/s "
                     "| TFLOP / step | TFLOP/s | MFU | peak memory GB |\n"
                     "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def throughput_line(r: dict) -> str:
    """One row of the throughput table."""
    unit = "pairs" if r["stage"] == "pretrain" else "places x 4"
    head = (f"| {r['stage']} | {r['encoder']} | {r['image_size']} | {_on_off(r['activation_checkpointing'])} "
            f"| {r['micro_batch']} {unit} | {r['images_per_step']}")
    if r["status"] != "ok":
        return f"{head} | {r['status']} | | | | | |"
    return (f"{head} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | {r['tflop_per_step']:.4g} "
            f"| {r['tflops']:.3g} | {_cell(r['mfu'], '.1%')} | {_cell(r['peak_memory_gb'], '.2f')} |")


def memory_table(rows: list[dict]) -> str:
    gpus = rows[0]["gpus"] if rows else 0
    lines = ["| stage | encoder | image px | act. ckpt | params (M) | trainable (M) | ZeRO-0 | ZeRO-1 | ZeRO-2 "
             "| ZeRO-3 | activations / image (MB) | micro-batch (images) | activations (GB) "
             "| ZeRO-2 + activations (GB) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        zero = " | ".join(f"{r[f'zero{z}_model_states_gb']:.2f}" for z in range(4))
        lines.append(f"| {r['stage']} | {r['encoder']} | {r['image_size']} | {_on_off(r['activation_checkpointing'])} "
                     f"| {r['params'] / 1e6:,.1f} "
                     f"| {r['trainable_params'] / 1e6:,.1f} | {zero} | {r['activation_mb_per_image']:.0f} "
                     f"| {r['images_per_step']} | {r['activations_gb']:.1f} | {r['zero2_total_gb']:.1f} |")
    lines.append(f"\nZeRO columns: bf16 weights + bf16 gradients + fp32 master weights and Adam moments per GPU, "
                 f"GB (10^9 bytes), over N = {gpus} GPUs. A model, not a measurement (trainer/memory_model.py).")
    return "\n".join(lines)


def parse_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def print_memory_model(args: argparse.Namespace, stages: list[str]) -> list[dict]:
    """Print the memory model's table for the asked encoders (default B, L, G); no device."""
    encoders = parse_list(args.encoders) if args.encoders else list(MEMORY_ENCODERS)
    rows = [memory_row(stage, encoder, args.gpus, args.cosface_classes, args.micro_batch, args.activation_checkpointing)
            for stage in stages for encoder in encoders]
    print(f"bench_gpu memory model, {date.today()}, torch {torch.__version__}, meta device, "
          f"stage-2 CosFace rows {args.cosface_classes:,}\n")
    print(memory_table(rows))
    return rows


def run_throughput(args: argparse.Namespace, stages: list[str]) -> list[dict]:
    """Benchmark every (stage, encoder) on CUDA when there is one, else on CPU; print row by row."""
    encoders = parse_list(args.encoders) if args.encoders else list(BENCH_ENCODERS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops_for(name) if device.type == "cuda" else None)
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"bench_gpu on {platform.node()}, {name} (peak bf16 {_cell(peak, '.0f')} TFLOP/s), {date.today()}, "
          f"torch {torch.__version__}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}{threads}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, stage-2 CosFace rows {args.cosface_classes:,}\n")
    print(THROUGHPUT_HEADER, flush=True)
    rows = []
    for stage in stages:
        for encoder in encoders:
            row = bench_one(stage, encoder, args.micro_batch, args.steps, args.warmup, device, peak,
                            args.cosface_classes, args.activation_checkpointing)
            print(throughput_line(row), flush=True)
            rows.append(dict(row, device=name, date=str(date.today())))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the table (and write --json); returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: pretrain, finetune")
    parser.add_argument("--encoders", default=None,
                        help=f"comma-separated presets (default {','.join(BENCH_ENCODERS)}; "
                             f"--memory-model: {','.join(MEMORY_ENCODERS)})")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="pairs (stage 1) or places of 4 images (stage 2) per step; default 64 pairs, 12 places")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--cosface-classes", type=int, default=DEFAULT_COSFACE_CLASSES, help="stage 2 CosFace rows")
    parser.add_argument("--memory-model", action="store_true", help="print the memory model instead (no device)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="TrainConfig.activation_checkpointing on for every row: trained blocks recompute their "
                             "activations in backward (models.recompute)")
    parser.add_argument("--gpus", type=int, default=8, help="--memory-model: GPUs the ZeRO stages partition over")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU only: torch threads (0: torch's default; on a shared 2-core machine more than one "
                             "thread stalls whenever another process holds a core, as bench_losses.py notes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.micro_batch is not None and args.micro_batch < 1):
        parser.error("--steps and --micro-batch must be >= 1, --warmup >= 0")
    stages = parse_list(args.stages)
    for stage in stages:
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    # Every model here starts from random weights on purpose; the trainer's warning says so per build.
    logging.getLogger("placeforge.trainer.train_models").setLevel(logging.ERROR)

    rows = print_memory_model(args, stages) if args.memory_model else run_throughput(args, stages)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
