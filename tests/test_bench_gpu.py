"""benchmarks/bench_gpu.py on CPU with the tiny presets, and the memory model's arithmetic.

The throughput run is one warm-up and one timed step per row; nothing here asserts a time.
The DINOv2 presets are only built on the meta device.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from timm.models.vision_transformer import Block

from benchmarks.bench_gpu import (
    MEMORY_ENCODERS,
    bench_config,
    build_training_model,
    counted_flops,
    main,
    memory_row,
    peak_tflops_for,
    random_batch,
    vit_forward_flops,
)
from placeforge.models.decoder import DecoderBlock
from placeforge.models.encoders import encoder_spec
from placeforge.trainer.engine import finetune_step, pretrain_step
from placeforge.trainer.memory_model import (
    ParamCounts,
    activation_bytes_per_item,
    activation_elements_per_item,
    build_on_meta,
    count_parameters,
    model_state_bytes,
)
from placeforge.trainer.train_models import build_finetune_model, build_pretrain_model

TINY = ("vit_tiny_test", "vit_tiny_reg4_dinov2_test")
VIT_B = "vit_base_patch14_reg4_dinov2"


def test_cpu_run_gives_a_row_per_stage_and_encoder(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = main(["--encoders", ",".join(TINY), "--micro-batch", "2", "--steps", "1", "--warmup", "1",
                 "--cosface-classes", "16", "--json", str(out)])
    assert [(r["stage"], r["encoder"]) for r in rows] == [(s, e) for s in ("pretrain", "finetune") for e in TINY]
    for row in rows:
        assert row["status"] == "ok"
        assert row["images_per_s"] > 0 and row["tflop_per_step"] > 0 and row["tflops"] > 0
        assert row["mfu"] is None and row["peak_memory_gb"] is None  # CPU: no peak, no device memory
        assert row["images_per_step"] == (4 if row["stage"] == "pretrain" else 8)  # 2 pairs; 2 places x 4
    assert json.loads(out.read_text()) == rows
    table = capsys.readouterr().out
    assert table.count("| pretrain | vit_tiny") == 2 and table.count("| finetune | vit_tiny") == 2


@pytest.mark.parametrize("encoder", [*TINY, VIT_B])
def test_flop_counter_equals_the_analytic_vit_forward(encoder):
    """FlopCounterMode on the encoder's forward = 2 x matmul weights x tokens + attention + patch embedding."""
    cfg = bench_config("finetune", encoder)
    device = torch.device("cpu" if encoder in TINY else "meta")  # ViT-B: shapes only
    with torch.device(device):
        encoder_module = encoder_spec(encoder).build(cfg.encoder.image_size)
        images = torch.zeros(2, 3, cfg.encoder.image_size, cfg.encoder.image_size)
    counted = counted_flops(lambda: encoder_module.forward_features(images), device)
    assert counted == 2 * vit_forward_flops(encoder_module, cfg.encoder.image_size)


def test_stage_flops_count_the_backward_too():
    """A stage-1 step of the tiny preset costs 3 x its forward (the recipe trains the last 6
    blocks: all 4 of the preset's), less the patch embedding's backward: the recipe freezes it
    (no weight gradient) and nothing needs its input gradient (the images are not trained)."""
    cfg = bench_config("pretrain", "vit_tiny_test", micro_batch=2)
    model = build_pretrain_model(cfg, load_encoder_weights=False)
    batch = random_batch(cfg, 16, torch.device("cpu"))
    device = torch.device("cpu")

    def forward() -> None:
        with torch.no_grad():
            pretrain_step(model, batch, cfg, torch.Generator().manual_seed(0), device)

    def forward_backward() -> None:
        pretrain_step(model, batch, cfg, torch.Generator().manual_seed(0), device)["loss"].backward()

    patches = 2 * 2 * (112 // 14) ** 2  # 2 pairs x 2 images, every patch embedded
    patch_embedding = 2 * patches * model.encoder.patch_embed.proj.weight.numel()
    assert not model.encoder.patch_embed.proj.weight.requires_grad
    assert counted_flops(forward_backward, device) == 3 * counted_flops(forward, device) - 2 * patch_embedding


def test_peak_table_matches_device_names():
    assert peak_tflops_for("NVIDIA H200") == 989
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_for("NVIDIA L40S") == 362
    assert peak_tflops_for("NVIDIA L4") == 121
    assert peak_tflops_for("Tesla V100-SXM2-32GB") is None


def vit_b_encoder_params(patches: int) -> int:
    """DINOv2 ViT-B/14 with 4 registers, by hand: embeddings, 12 blocks, final norm, mask token."""
    c = 768
    embeddings = (3 * 14 * 14 * c + c) + c + 4 * c + patches * c + c  # patch proj, class, registers, positions, mask
    block = 12 * c * c + 15 * c  # qkv, proj, fc1, fc2 weights + their biases, 2 norms, 2 layer scales
    return embeddings + 12 * block + 2 * c


def test_memory_model_counts_vit_b_as_a_meta_build():
    row = memory_row("pretrain", VIT_B, gpus=8, num_classes=16)
    with torch.device("meta"):
        mim = build_pretrain_model(bench_config("pretrain", VIT_B), load_encoder_weights=False)
    assert row["params"] == sum(p.numel() for p in mim.parameters())
    # Stage 1 trains the last 6 blocks and the final norm (Pair-VPR's num_trainable_blocks), and the
    # decoder but its mask token (the encoder's hides the patches).
    frozen = vit_b_encoder_params(patches=16 * 16) - 6 * (12 * 768 * 768 + 15 * 768) - 2 * 768 + 768
    assert row["trainable_params"] == row["params"] - frozen
    assert sum(p.numel() for p in mim.encoder.parameters()) == vit_b_encoder_params(patches=16 * 16)

    row = memory_row("finetune", VIT_B, gpus=8, num_classes=16)
    cfg = bench_config("finetune", VIT_B)
    with torch.device("meta"):
        model = build_finetune_model(cfg, 16)
    assert row["params"] == sum(p.numel() for p in model.parameters())
    encoder = model.global_model.encoder
    frozen = vit_b_encoder_params(patches=23 * 23) - 6 * (12 * 768 * 768 + 15 * 768) - 2 * 768  # trains 6 + norm
    assert sum(p.numel() for p in encoder.parameters() if not p.requires_grad) == frozen
    assert row["trainable_params"] == row["params"] - frozen


def test_zero_partitions_exactly():
    params = count_parameters(build_on_meta(bench_config("finetune", VIT_B), num_classes=16))
    total, trainable = params.total, params.trainable
    zero0 = model_state_bytes(params, zero_stage=0, gpus=8)
    assert (zero0.weights, zero0.gradients, zero0.optimizer) == (2 * total, 2 * trainable, 12 * trainable)
    zero1 = model_state_bytes(params, zero_stage=1, gpus=8)
    assert (zero1.gradients, zero1.optimizer) == (2 * trainable, 12 * math.ceil(trainable / 8))
    zero2 = model_state_bytes(params, zero_stage=2, gpus=8)
    assert zero2.weights == 2 * total
    assert zero2.gradients + zero2.optimizer == 14 * math.ceil(trainable / 8) < zero0.gradients + zero0.optimizer
    zero3 = model_state_bytes(params, zero_stage=3, gpus=8)
    assert zero3.weights == 2 * math.ceil(total / 8) and zero3.total < zero2.total
    assert model_state_bytes(ParamCounts(9, 9), zero_stage=3, gpus=8).total == 16 * 2  # ceil(9 / 8) each
    with pytest.raises(ValueError, match="zero_stage"):
        model_state_bytes(params, zero_stage=4, gpus=8)


def test_memory_table_builds_vit_g_on_meta_only(capsys):
    rows = main(["--memory-model", "--stages", "finetune", "--encoders", MEMORY_ENCODERS[-1]])
    assert rows[0]["params"] > 1.2e9 and rows[0]["zero2_total_gb"] > rows[0]["activations_gb"]
    assert "vit_giant_patch14_reg4_dinov2" in capsys.readouterr().out


def saved_bytes_recorder(model: torch.nn.Module):
    """(bytes by storage, a saved_tensors_hooks pack function that fills it): each storage autograd
    saves counted once, the model's weights not at all."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    return seen, pack


def saved_block_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the tensors autograd saves inside transformer blocks during `run()`, each
    storage once, weights excluded."""
    seen, pack = saved_bytes_recorder(model)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    handles = []
    for module in model.modules():
        if isinstance(module, (Block, DecoderBlock)):  # blocks never nest: enter on the way in, leave on the way out
            handles.append(module.register_forward_pre_hook(lambda *_: hooks.__enter__()))
            handles.append(module.register_forward_hook(lambda *_: hooks.__exit__(None, None, None)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values())


@pytest.mark.parametrize("encoder", TINY)
def test_activation_estimate_matches_what_autograd_saves(encoder):
    """Within 5 % of the measured bytes on CPU in fp32 (4 bytes per element), both stages."""
    device = torch.device("cpu")
    cfg = bench_config("pretrain", encoder, micro_batch=3)
    mim = build_pretrain_model(cfg, load_encoder_weights=False)
    batch = random_batch(cfg, 16, device)
    measured = saved_block_bytes(mim, lambda: pretrain_step(mim, batch, cfg, torch.Generator().manual_seed(0), device))
    assert measured == pytest.approx(3 * activation_bytes_per_item(mim, cfg, bytes_per_element=4), rel=0.05)

    cfg = bench_config("finetune", encoder, micro_batch=3)
    model = build_finetune_model(cfg, 16)
    batch = random_batch(cfg, 16, device)
    measured = saved_block_bytes(model, lambda: finetune_step(model, batch, cfg, device))
    assert measured == pytest.approx(12 * activation_bytes_per_item(model, cfg, bytes_per_element=4), rel=0.05)


def saved_step_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of every tensor autograd saves during `run()`, inside blocks or not, each storage once,
    weights excluded."""
    seen, pack = saved_bytes_recorder(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("encoder", TINY)
def test_checkpointed_estimate_matches_what_autograd_stops_keeping(encoder):
    """With activation checkpointing the trained blocks keep only their inputs: the bytes autograd
    no longer saves over the whole step are within 5 % of the model's count (fp32), both stages.
    (The recomputed block lives only inside backward, where no saved-tensor hook sees it.)"""
    device = torch.device("cpu")
    for stage, items in (("pretrain", 3), ("finetune", 12)):  # 3 pairs; 3 places x 4 images
        plain_cfg = bench_config(stage, encoder, micro_batch=3)
        checkpointed_cfg = bench_config(stage, encoder, micro_batch=3, activation_checkpointing=True)
        plain = build_training_model(plain_cfg, 16, device)
        checkpointed = build_training_model(checkpointed_cfg, 16, device)
        batch = random_batch(plain_cfg, 16, device)

        def step(model, cfg):
            if stage == "pretrain":
                return lambda: pretrain_step(model, batch, cfg, torch.Generator().manual_seed(0), device)
            return lambda: finetune_step(model, batch, cfg, device)

        measured = (saved_step_bytes(plain, step(plain, plain_cfg))
                    - saved_step_bytes(checkpointed, step(checkpointed, checkpointed_cfg)))
        full = activation_elements_per_item(plain, plain_cfg)
        kept = activation_elements_per_item(checkpointed, checkpointed_cfg)
        assert full.recomputed == 0 and 0 < kept.kept < full.kept / 4 and 0 < kept.recomputed < full.kept
        assert measured == pytest.approx(items * 4 * (full.kept - kept.kept), rel=0.05), stage


def test_memory_table_with_activation_checkpointing(capsys):
    """Same model states, a fraction of the activations (ViT-G on meta); the CPU run marks its rows."""
    off = memory_row("pretrain", MEMORY_ENCODERS[-1], gpus=8, num_classes=16)
    on = memory_row("pretrain", MEMORY_ENCODERS[-1], gpus=8, num_classes=16, activation_checkpointing=True)
    assert on["zero2_model_states_gb"] == off["zero2_model_states_gb"] and on["activation_checkpointing"]
    assert 0 < on["activations_gb"] < off["activations_gb"] / 3
    rows = main(["--encoders", TINY[0], "--stages", "finetune", "--micro-batch", "2", "--steps", "1",
                 "--warmup", "0", "--cosface-classes", "16", "--activation-checkpointing"])
    assert rows[0]["status"] == "ok" and rows[0]["activation_checkpointing"] is True
    assert "| finetune | vit_tiny_test | 112 | on |" in capsys.readouterr().out
