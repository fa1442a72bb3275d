"""MulConv adapters (models.adapters) in placeforge's encoders: MutualVPR's initialisation and
freezing, the patch grid the convolutions see, and model files that record them.

Exactness against MutualVPR's own code is tests/test_import_mutualvpr.py; these are the
properties that hold for any weights.  Tiny presets on CPU; ViT-B and ViT-g only on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from placeforge.models.adapters import MlpWithAdapter, MulConvAdapter, is_adapter_parameter, set_patch_grid
from placeforge.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from placeforge.models.encoders import ENCODERS, EncoderConfig, EncoderSpec, build_model
from tests.conftest import fill_like_trained

TINY = EncoderConfig("vit_tiny_dinov2_test", 112, 32, "gem", adapter="mulconv")  # an 8 x 8 patch grid


def images(batch: int = 2, height: int = 112, width: int = 112, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Every parameter random, BatchNorm shifted so that few ReLUs are dead."""
    fill_like_trained(module, seed, lambda name, p: name.endswith(("gamma", "bn.weight")) or (
        p.ndim == 1 and "norm" in name and name.endswith("weight")))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bn.bias"):
                param.copy_(0.5 + 0.1 * param)
            if name.endswith("gem.p"):
                param.fill_(3.0)


def test_new_adapters_add_nothing_and_only_adapters_pooling_and_head_train():
    torch.manual_seed(0)
    plain = build_model(EncoderConfig("vit_tiny_dinov2_test", 112, 32, "gem")).eval()
    adapted = build_model(TINY).eval()
    result = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(is_adapter_parameter(k) or k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               for k in result.missing_keys)
    x = images()
    with torch.no_grad():  # the up projection starts at zero (MutualVPR's train.py)
        torch.testing.assert_close(adapted(x), plain(x), atol=0, rtol=0)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in adapted.named_parameters() if is_adapter_parameter(name)} | {
        "gem.p", "head.weight", "head.bias"}
    assert all(".mlp.adapter." in name for name in trainable - {"gem.p", "head.weight", "head.bias"})
    assert len(trainable) == 3 + len(adapted.encoder.blocks) * (4 + 5 * 4)  # per block: 2 Linear, 5 x (conv, bn)


def test_every_trainable_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = build_model(TINY).train()
    for block in model.encoder.blocks:  # trained adapters: with the up projection at zero, nothing before it learns
        randomise(block.mlp.adapter, seed=3)
    descriptors = model(images(4))
    (descriptors * torch.randn_like(descriptors)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    # A convolution's bias right before BatchNorm has no effect in training mode (the batch mean takes
    # it away), in MutualVPR as here: it gets a zero gradient, up to rounding.
    biases = [name for name in grads if name.endswith("conv.bias")]
    assert len(biases) == 5 * len(model.encoder.blocks)
    for name in biases:
        assert grads[name].abs().max() < 1e-4 * grads[name.replace(".bias", ".weight")].abs().max(), name
    assert [name for name, g in grads.items() if name not in biases and not g.abs().sum() > 0] == []
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_mutualvpr_initialisation_and_widths_at_vitb():
    with torch.device("meta"):
        model = build_model(EncoderConfig("vit_base_patch14_dinov2", 504, 512, "gem", adapter="mulconv"),
                            load_encoder_weights=False)
    adapter = model.encoder.blocks[0].mlp.adapter
    # backbone/dinov2/block.py: MulConvAdapter(768, 384, 192, 24, 96, 24, 96)
    assert (adapter.down.in_features, adapter.down.out_features, adapter.up.out_features) == (768, 384, 768)
    assert adapter.branch_1x1.conv.out_channels == 192
    assert [m.conv.out_channels for m in adapter.branch_3x3] == [24, 96]
    assert [m.conv.kernel_size for m in adapter.branch_5x5] == [(1, 1), (5, 5)]
    assert adapter.branch_1x1.bn.eps == 1e-3 and isinstance(model.encoder.blocks[11].mlp, MlpWithAdapter)
    torch.manual_seed(0)
    tiny = MulConvAdapter(768)
    assert torch.all(tiny.up.weight == 0) and torch.all(tiny.up.bias == 0)
    assert torch.all(tiny.branch_5x5[1].conv.weight == 1e-5) and torch.all(tiny.branch_1x1.conv.bias == 1e-5)
    assert abs(tiny.down.weight.std().item() - 0.02) < 0.002 and torch.all(tiny.down.bias == 0)


def test_convolutions_follow_the_patch_grid_rows_and_columns():
    """On a 3 x 8 grid, changing the patch at row 1, column 0 changes exactly the patches within
    the 5 x 5 kernels' reach (columns 0-2, every row), and no prefix token."""
    prefix, rows, cols = 5, 3, 8  # class token and 4 registers
    adapter = MulConvAdapter(64, prefix_tokens=prefix).eval()
    randomise(adapter)
    adapter.patch_grid = (rows, cols)
    tokens = torch.randn(1, prefix + rows * cols, 64, generator=torch.Generator().manual_seed(1))
    moved = tokens.clone()
    moved[0, prefix + 1 * cols + 0] += 3.0
    with torch.no_grad():
        changed = (adapter(moved) - adapter(tokens)).abs().amax(dim=-1)[0] > 1e-6  # [P + N]
    assert not changed[:prefix].any()
    grid = changed[prefix:].reshape(rows, cols)
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    expected[:, :3] = True
    assert torch.equal(grid, expected)


def test_the_grid_comes_from_the_images_and_must_fit():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    with torch.no_grad():
        assert model(images(2, 112, 140)).shape == (2, 32)  # 8 x 10 patches
    assert model.encoder.blocks[0].mlp.adapter.patch_grid == (8, 10)
    with pytest.raises(ValueError, match="do not fill the patch grid 8 x 10"):
        model.encoder.forward_features(images(1, 112, 112))  # bypassing the model: the old grid
    set_patch_grid(model.encoder, None)
    with pytest.raises(ValueError, match="not a square grid"):
        model.encoder.forward_features(images(1, 112, 140))


def test_model_files_record_the_adapters_and_older_files_still_load(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY)
    randomise(model, seed=2)
    model.train()(images(4))  # BatchNorm statistics move away from their init
    save_model_checkpoint(model, TINY, tmp_path / "adapted.pt")
    loaded, cfg = load_model_checkpoint(tmp_path / "adapted.pt")
    assert cfg.adapter == "mulconv"
    stats = "encoder.blocks.1.mlp.adapter.branch_3x3.1.bn.running_var"
    assert torch.equal(loaded.state_dict()[stats], model.state_dict()[stats])
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), model.eval()(images()), atol=1e-6, rtol=1e-6)

    plain_cfg = EncoderConfig("vit_tiny_dinov2_test", 112, 32, "gem")
    save_model_checkpoint(build_model(plain_cfg), plain_cfg, tmp_path / "plain.pt")
    content = torch.load(tmp_path / "plain.pt", weights_only=True)
    del content["encoder_config"]["adapter"]  # as files written before adapters existed
    torch.save(content, tmp_path / "older.pt")
    older, older_cfg = load_model_checkpoint(tmp_path / "older.pt")
    assert older_cfg.adapter == "none" and not any(isinstance(m, MulConvAdapter) for m in older.modules())


def test_configs_that_cannot_have_adapters_fail(monkeypatch):
    with pytest.raises(ValueError, match=r"adapter must be one of \['none', 'mulconv'\]"):
        EncoderConfig(adapter="lora").validate()
    monkeypatch.setitem(ENCODERS, "width48_test", EncoderSpec(14, 48, 2, 2))
    with pytest.raises(ValueError, match="divisible by 32"):
        EncoderConfig("width48_test", 112, adapter="mulconv").validate()
    with torch.device("meta"), pytest.raises(ValueError, match="SwiGLU"):
        build_model(EncoderConfig("vit_giant_patch14_dinov2", 224, adapter="mulconv"), load_encoder_weights=False)
