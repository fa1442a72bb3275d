"""DINOv2 weights from local files (models.dinov2): official and timm layouts, loss-free.

The reference is a minimal re-write of the official DinoVisionTransformer
(facebookresearch/dinov2: dinov2/models/vision_transformer.py, dinov2/layers/{block,
attention, layer_scale, mlp, swiglu_ffn}.py, hub settings from dinov2/hub/backbones.py), with
its own attention and position interpolation, so nothing of the loader under test or of timm
computes the expected outputs.  Its state dict is the official release layout.  Small
widths and 2 blocks keep every case to a fraction of a second; the full-size presets are
only mapped on the meta device.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from placeforge.config import ConfigError, from_mapping, load_file
from placeforge.models.dinov2 import encode_with_mask_token, fit_position_embedding, to_timm_keys
from placeforge.models.encoders import ENCODERS, EncoderConfig, EncoderSpec, build_model, encoder_spec
from placeforge.trainer.train_config import TrainConfig
from placeforge.trainer.train_models import build_finetune_model, build_pretrain_model, save_mim
from tests.conftest import fill_like_trained

REPO = Path(__file__).resolve().parents[1]
NATIVE = 56  # the reference's "training" size: a 4 x 4 grid (DINOv2's is 518 px, 37 x 37)

# preset -> (registers, SwiGLU MLP); the last two are registered by the `tiny_presets` fixture.
VARIANTS = {
    "vit_tiny_reg4_dinov2_test": (4, False),  # Pair-VPR's layout (dinov2_vit*14_reg)
    "tiny_patch14_dinov2_test": (0, False),  # dinov2_vit{s,b,l}14
    "tiny_patch14_reg4_swiglu_dinov2_test": (4, True),  # dinov2_vitg14_reg: SwiGLUFFNFused
}


@pytest.fixture
def tiny_presets(monkeypatch):
    monkeypatch.setitem(ENCODERS, "tiny_patch14_dinov2_test", EncoderSpec(14, 64, 2, 2, "vit_base_patch14_dinov2"))
    # Width 48: the official SwiGLU hidden width (int(4 * 48 * 2 / 3) + 7) // 8 * 8 = 128 equals
    # timm's int(48 * 2.66667 * 2) / 2, as it does at ViT-g's 1536 (4096).
    monkeypatch.setitem(ENCODERS, "tiny_patch14_reg4_swiglu_dinov2_test",
                        EncoderSpec(14, 48, 2, 2, "vit_giant_patch14_reg4_dinov2"))


# ---------------------------------------------------------------- the official model, re-written


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class OfficialBlock(nn.Module):
    """dinov2/layers/block.py Block with MemEffAttention (no xFormers) and Mlp or SwiGLUFFNFused."""

    def __init__(self, dim: int, heads: int, swiglu: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if swiglu:
            hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # SwiGLUFFNFused's rounding of mlp_ratio 4
            self.mlp = nn.ModuleDict({"w12": nn.Linear(dim, 2 * hidden), "w3": nn.Linear(hidden, dim)})
        else:
            self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})
        self.ls2 = LayerScale(dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.attn["qkv"](x).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, h, N, d] each
        weights = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)  # [B, h, N, N]
        return self.attn["proj"]((weights @ v).transpose(1, 2).reshape(b, n, c))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if "w12" in self.mlp:
            x1, x2 = self.mlp["w12"](x).chunk(2, dim=-1)
            return self.mlp["w3"](F.silu(x1) * x2)
        return self.mlp["fc2"](F.gelu(self.mlp["fc1"](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attention(self.norm1(x))
        return x + self.ls2.gamma * self.ffn(self.norm2(x))


class OfficialViT(nn.Module):
    """DinoVisionTransformer(block_chunks=0) as the hub builds it; forward -> x_norm [B, 1 + R + N, C]."""

    def __init__(self, img_size: int, dim: int, depth: int, heads: int, registers: int, swiglu: bool) -> None:
        super().__init__()
        grid = img_size // 14
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, dim, 14, 14)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(OfficialBlock(dim, heads, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        # dinov2/hub/backbones.py: the _reg models interpolate with antialias and no offset.
        self.interpolate_antialias = registers > 0
        self.interpolate_offset = 0.0 if registers else 0.1

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        w0, h0, m = w // 14, h // 14, int(math.sqrt(n))
        kwargs = ({"scale_factor": ((w0 + self.interpolate_offset) / m, (h0 + self.interpolate_offset) / m)}
                  if self.interpolate_offset else {"size": (w0, h0)})
        patch = F.interpolate(pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=self.interpolate_antialias, **kwargs)
        assert patch.shape[-2:] == (w0, h0)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, w0 * h0, -1)], dim=1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        b, _, w, h = images.shape
        x = self.patch_embed["proj"](images).flatten(2).transpose(1, 2)  # [B, N, C]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def official_keys(depth: int, registers: int, swiglu: bool) -> set[str]:
    """The release file's keys, as dinov2/models/vision_transformer.py names its parameters."""
    mlp = ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2")
    layers = ("norm1", "attn.qkv", "attn.proj", "norm2", *mlp)
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} | ({"register_tokens"} if registers else set())
    for i in range(depth):
        keys |= {f"blocks.{i}.{layer}.{p}" for layer in layers for p in ("weight", "bias")}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def random_reference(preset: str, seed: int = 0) -> OfficialViT:
    """The official architecture at the preset's width, every tensor random (none at its init value)."""
    spec, (registers, swiglu) = ENCODERS[preset], VARIANTS[preset]
    ref = OfficialViT(NATIVE, spec.embed_dim, spec.depth, spec.num_heads, registers, swiglu).eval()
    fill_like_trained(ref, seed, lambda name, _: name.endswith(("gamma", "norm1.weight", "norm2.weight"))
                      or name == "norm.weight")
    return ref


def write_official(ref: OfficialViT, path: Path) -> Path:
    torch.save(ref.state_dict(), path)
    return path


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_tokens(got: torch.Tensor, expected: torch.Tensor, registers: int) -> None:
    """Class token, register tokens and patch tokens each equal (atol 1e-5)."""
    assert got.shape == expected.shape
    for name, part in (("class", slice(0, 1)), ("registers", slice(1, 1 + registers)),
                       ("patches", slice(1 + registers, None))):
        torch.testing.assert_close(got[:, part], expected[:, part], atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize("preset", list(VARIANTS))
@pytest.mark.parametrize("image_size", [NATIVE, 42, 70])  # native grid, then resized down and up
def test_official_weights_give_the_official_outputs(tiny_presets, tmp_path, preset, image_size):
    registers, swiglu = VARIANTS[preset]
    ref = random_reference(preset)
    assert set(ref.state_dict()) == official_keys(2, registers, swiglu)
    path = write_official(ref, tmp_path / "official.pth")
    model = build_model(EncoderConfig(preset, image_size, 16, "cls", weights=str(path))).eval()
    x = images(image_size)
    with torch.no_grad():
        assert_same_tokens(model.forward_features(x), ref(x), registers)
        masks = torch.rand(2, (image_size // 14) ** 2, generator=torch.Generator().manual_seed(2)) < 0.5
        assert_same_tokens(encode_with_mask_token(model.encoder, x, masks), ref(x, masks), registers)
    assert torch.equal(model.encoder.mask_token, ref.mask_token)  # kept for Pair-VPR's stage-1 masking
    assert not model.encoder.mask_token.requires_grad


@pytest.mark.parametrize("preset", list(VARIANTS))
def test_timm_safetensors_of_the_same_weights_give_the_same_encoder(tiny_presets, tmp_path, preset):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    registers, _ = VARIANTS[preset]
    spec = ENCODERS[preset]
    ref = random_reference(preset, seed=3)
    official = write_official(ref, tmp_path / "official.pth")
    # timm's own conversion (not the loader under test) writes timm's layout at the native size.
    native = timm.create_model(spec.timm_name, pretrained=False, img_size=NATIVE, num_classes=0,
                               embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)
    timm_state = checkpoint_filter_fn(dict(ref.state_dict()), native)
    assert "mask_token" not in timm_state and ("reg_token" in timm_state) == bool(registers)
    save_file({k: v.detach().contiguous().clone() for k, v in timm_state.items()}, tmp_path / "timm.safetensors")

    from_official = build_model(EncoderConfig(preset, 42, weights=str(official))).encoder.state_dict()
    from_timm = build_model(EncoderConfig(preset, 42, weights=str(tmp_path / "timm.safetensors"))).eval()
    for key, tensor in from_timm.encoder.state_dict().items():
        if key == "mask_token":
            assert not tensor.any()  # timm's files have none: zeros, as the official init
        else:
            assert torch.equal(tensor, from_official[key]), key
    with torch.no_grad():
        assert_same_tokens(from_timm.forward_features(images(42)), ref(images(42)), registers)


def test_full_size_official_layouts_map_onto_every_dinov2_preset():
    """ViT-S/B/L/g, with and without registers: every release key lands on a tensor of the same
    shape and every encoder tensor is filled (meta device: shapes only, no memory)."""
    presets = [n for n, s in ENCODERS.items() if s.release_file]
    assert len(presets) == 8
    for name in presets:
        spec = ENCODERS[name]
        registers, swiglu = (4 if "_reg4_" in name else 0), "giant" in name
        with torch.device("meta"):
            ref = OfficialViT(518, spec.embed_dim, spec.depth, spec.num_heads, registers, swiglu)
            encoder = spec.build(518)
        assert set(ref.state_dict()) == official_keys(spec.depth, registers, swiglu)
        assert spec.release_file == f"dinov2_vit{name.split('_')[1][0]}14{'_reg4' if registers else ''}_pretrain.pth"
        mapped = {k: tuple(v.shape) for k, v in to_timm_keys(ref.state_dict(), encoder.no_embed_class).items()}
        assert mapped == {k: tuple(v.shape) for k, v in encoder.state_dict().items()}, name


# ---------------------------------------------------------------- what does not fit fails, by name


def test_weights_that_do_not_fit_name_the_keys(tiny_presets, tmp_path):
    with_registers = write_official(random_reference("vit_tiny_reg4_dinov2_test"), tmp_path / "reg.pth")
    with pytest.raises(ValueError, match=r"reg\.pth: official DINOv2-layout.*lacks \['reg_token'\]"):
        build_model(EncoderConfig("tiny_patch14_dinov2_test", 56, weights=str(with_registers)))
    without_registers = write_official(random_reference("tiny_patch14_dinov2_test"), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"not in the file \['reg_token'\]"):
        build_model(EncoderConfig("vit_tiny_reg4_dinov2_test", 56, weights=str(without_registers)))
    with pytest.raises(ValueError, match=r"other shapes: blocks\.0\.attn\.proj\.bias \(64,\) != \(48,\)"):
        build_model(EncoderConfig("tiny_patch14_reg4_swiglu_dinov2_test", 56, weights=str(with_registers)))
    state = torch.load(with_registers, weights_only=True)
    state["blocks.0.attn.q_bias"] = torch.zeros(64)  # a key nobody maps: never silently ignored
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"lacks \['blocks\.0\.attn\.q_bias'\]"):
        build_model(EncoderConfig("vit_tiny_reg4_dinov2_test", 56, weights=str(tmp_path / "extra.pth")))


def test_a_timm_classifier_is_dropped_and_the_rest_loads(tmp_path):
    torch.manual_seed(4)
    source = build_model(EncoderConfig("vit_tiny_test", 56)).encoder
    state = {**source.state_dict(), "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)}
    torch.save({"model": state}, tmp_path / "classifier.pth")  # wrapped, as timm's training scripts save
    loaded = build_model(EncoderConfig("vit_tiny_test", 56, weights=str(tmp_path / "classifier.pth")))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.encoder.state_dict().items())


# ---------------------------------------------------------------- no weights: a clear stop


def test_missing_weights_file_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(EncoderSpec, "build", lambda *_: pytest.fail("built a model without its weights"))
    cfg = EncoderConfig("vit_base_patch14_reg4_dinov2", 224, weights="weights/dinov2_vitb14_reg4_pretrain.pth")
    with pytest.raises(ConfigError) as error:
        build_model(cfg)
    message = str(error.value)
    assert f"DINOv2 weights not found at {tmp_path / 'weights' / 'dinov2_vitb14_reg4_pretrain.pth'}" in message
    assert "download dinov2_vitb14_reg4_pretrain.pth" in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in message
    assert f"working directory {tmp_path}" in message


@pytest.mark.parametrize("recipe", ["pretrain_vitb.yaml", "finetune_vitb.yaml"])
def test_published_recipes_name_the_official_file_and_stop_without_it(tmp_path, monkeypatch, recipe):
    cfg = from_mapping(TrainConfig, load_file(REPO / "configs" / recipe), where=recipe)
    spec = encoder_spec(cfg.encoder.name)
    assert spec.release_file == "dinov2_vitb14_reg4_pretrain.pth"  # Pair-VPR's dinov2_vitb14_reg
    assert cfg.encoder.weights == f"weights/{spec.release_file}"
    monkeypatch.chdir(tmp_path)  # no weights/ here
    monkeypatch.setattr(EncoderSpec, "build", lambda *_: pytest.fail("built a model without its weights"))
    with pytest.raises(ConfigError, match="DINOv2 weights not found at .*download dinov2_vitb14_reg4_pretrain"):
        if cfg.stage == "pretrain":
            build_pretrain_model(cfg)
        else:
            build_finetune_model(cfg, num_classes=1)  # no --init-from: it would start from the file


def test_stage2_with_a_stage1_export_does_not_read_the_dinov2_file(tmp_path):
    stage1 = TrainConfig(encoder=EncoderConfig("vit_tiny_reg4_dinov2_test", 56), decoder="dec64d2b")
    mim = build_pretrain_model(stage1)
    export = save_mim(mim, stage1, tmp_path / "mim_epoch0000.pt")
    stage2 = TrainConfig(stage="finetune", decoder="dec64d2b", init_from=str(export),
                         encoder=EncoderConfig("vit_tiny_reg4_dinov2_test", 70, weights=str(tmp_path / "absent.pth")))
    model = build_finetune_model(stage2, num_classes=1)
    encoder = model.global_model.encoder
    assert encoder.pos_embed.shape == (1, 25, 64)  # patch positions only (registers have none), 4x4 -> 5x5
    assert torch.equal(encoder.pos_embed, fit_position_embedding(mim.encoder.pos_embed, encoder))
    assert torch.equal(encoder.reg_token, mim.encoder.reg_token)


def test_a_dinov2_preset_without_weights_is_refused_unless_random_is_asked_for():
    vitb = EncoderConfig("vit_base_patch14_reg4_dinov2", 224)
    with pytest.raises(ValueError, match="encoder.weights is not set: set it to your copy of "
                                         "dinov2_vitb14_reg4_pretrain.pth.*encoder_init: random"):
        TrainConfig(encoder=vitb).validate()
    TrainConfig(encoder=vitb, encoder_init="random").validate()
    TrainConfig(encoder=EncoderConfig("vit_base_patch14_reg4_dinov2", 224, weights="w.pth")).validate()
    TrainConfig(stage="finetune", encoder=vitb, init_from="mim_epoch0000.pt").validate()  # from a stage-1 export
    TrainConfig(encoder=EncoderConfig("vit_tiny_reg4_dinov2_test", 56)).validate()  # no release: nothing to load
