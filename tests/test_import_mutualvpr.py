"""Importing MutualVPR's released model (models.import_mutualvpr): every key, exact descriptors.

The reference is a re-write of MutualVPR as its test.py runs it (Gucci233/MutualVPR at bd373c6:
cosplace_model/cosplace_network.py MutualVPR, cosplace_model/layers.py, backbone/vision_transformer.py
and backbone/dinov2/{block, mlp, layer_scale}.py without xFormers), at width 64 with 2 blocks
(the `tiny_test` variant); its state dict is the release layout, `model.state_dict()` of the
module, with DataParallel's `module.` prefix as train.py saves it.  Nothing of the importer, of
models.adapters or of timm computes the expected descriptors.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from placeforge.models.checkpoint import CheckpointError, load_model_checkpoint, load_pair_classifier
from placeforge.models.encoders import encoder_spec
from placeforge.models.import_mutualvpr import (
    MUTUALVPR_DROPPED,
    MUTUALVPR_VARIANTS,
    detect_mutualvpr_variant,
    import_mutualvpr,
    map_mutualvpr_state,
)
from placeforge.pipelines.cli import main as cli_main
from tests.conftest import fill_like_trained

SIZE = 504  # MutualVPR's test size: a 36 x 36 patch grid
NATIVE = 518  # vit_base(img_size=518): position embedding for 37 x 37 patches


# ---------------------------------------------------------------- MutualVPR, re-written


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=True)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class OfficialMulConvAdapter(nn.Module):
    """block.py MulConvAdapter(fc_in, in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5), skip_connect False."""

    def __init__(self, fc_in: int, hidden: int, ch1: int, red3: int, ch3: int, red5: int, ch5: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(hidden, ch1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(hidden, red3, 1), BasicConv2d(red3, ch3, 3))
        self.branch3 = nn.Sequential(BasicConv2d(hidden, red5, 1), BasicConv2d(red5, ch5, 5))
        self.D_fc1 = nn.Linear(fc_in, hidden)
        self.D_fc2 = nn.Linear(hidden, fc_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.relu(self.D_fc1(x))
        b, p, d = x0.shape
        w = h = int(math.sqrt(p - 1))
        xs = x0[:, 1:, :].reshape(b, w, h, d).permute(0, 3, 1, 2)
        out = torch.cat([self.branch1(xs), self.branch2(xs), self.branch3(xs)], dim=1)
        out = out.reshape(b, d, w * h).permute(0, 2, 1)
        out = torch.cat([x0[:, 0:1, :], out], dim=1)
        out = out + x0
        return self.D_fc2(out)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class OfficialBlock(nn.Module):
    """block.py Block (Attention without xFormers, Mlp with GELU, LayerScale, the adapter)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})
        self.ls2 = LayerScale(dim)
        # MulConvAdapter(768, 384, 192, 24, 96, 24, 96) at 768; the same ratios at this width
        self.adapter = OfficialMulConvAdapter(dim, dim // 2, dim // 4, dim // 32, dim // 8, dim // 32, dim // 8)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.attn["qkv"](x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.attn["proj"]((weights @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attention(self.norm1(x))
        n = self.norm2(x)
        mlp = self.mlp["fc2"](F.gelu(self.mlp["fc1"](n)))
        return x + self.ls2.gamma * (mlp + 0.2 * self.adapter(n))


class OfficialBackbone(nn.Module):
    """vision_transformer.py DinoVisionTransformer(img_size=518, patch 14, block_chunks=0); -> x_norm."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        grid = NATIVE // 14
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, dim, 14, 14)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(OfficialBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        if x.shape[1] - 1 == n and w == h:
            return self.pos_embed
        m, dim = math.sqrt(n), x.shape[-1]
        w0, h0 = w // 14 + 0.1, h // 14 + 0.1
        patch = F.interpolate(self.pos_embed[:, 1:].reshape(1, int(m), int(m), dim).permute(0, 3, 1, 2),
                              scale_factor=(w0 / m, h0 / m), mode="bicubic")
        patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, w, h = images.shape
        x = self.patch_embed["proj"](images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class GeM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.clamp(min=1e-6).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0]


class OfficialMutualVPR(nn.Module):
    """cosplace_network.py MutualVPR: backbone, aggregation = L2Norm, GeM, Flatten, Linear, L2Norm."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 2, output_dim: int = 512) -> None:
        super().__init__()
        self.backbone = OfficialBackbone(dim, depth, heads)
        self.aggregation = nn.Sequential(L2Norm(), GeM(), Flatten(), nn.Linear(dim, output_dim), L2Norm())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone(images)
        b, p, d = x.shape
        w = h = int(math.sqrt(p - 1))
        return self.aggregation(x[:, 1:].reshape(b, w, h, d).permute(0, 3, 1, 2))


def release_keys(depth: int) -> set[str]:
    """The released state dict's keys, as MutualVPR's modules name their parameters and buffers."""
    keys = {"backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.patch_embed.proj.weight",
            "backbone.patch_embed.proj.bias", "backbone.norm.weight", "backbone.norm.bias",
            "aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias"}
    conv = ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
            "bn.num_batches_tracked")
    for i in range(depth):
        block = f"backbone.blocks.{i}"
        keys |= {f"{block}.{layer}.{p}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                        "mlp.fc2", "adapter.D_fc1", "adapter.D_fc2")
                 for p in ("weight", "bias")}
        keys |= {f"{block}.ls1.gamma", f"{block}.ls2.gamma"}
        keys |= {f"{block}.adapter.{branch}.{c}" for branch in ("branch1", "branch2.0", "branch2.1", "branch3.0",
                                                                 "branch3.1") for c in conv}
    return keys


def random_mutualvpr(seed: int = 0) -> OfficialMutualVPR:
    """The tiny reference with every parameter and BatchNorm statistic random (none at its init value)."""
    ref = OfficialMutualVPR().eval()
    fill_like_trained(ref, seed, lambda name, p: name.endswith(("gamma", "bn.weight")) or (
        p.ndim == 1 and "norm" in name and name.endswith("weight")))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        ref.aggregation[1].p.fill_(3.4)  # GeM's exponent: trained away from 3, and positive
        for module in ref.modules():
            if isinstance(module, nn.BatchNorm2d):  # mostly positive after BatchNorm, so few ReLUs are dead
                module.bias.copy_(0.5 + 0.3 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
                module.num_batches_tracked.fill_(1234)
    return ref


def released_state(ref: OfficialMutualVPR) -> dict[str, torch.Tensor]:
    """train.py saves the nn.DataParallel wrapper's state dict: every key under `module.`."""
    return {f"module.{k}": t for k, t in ref.state_dict().items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[OfficialMutualVPR, Path]:
    ref = random_mutualvpr()
    path = tmp_path_factory.mktemp("release") / "best_model.pth"
    torch.save(released_state(ref), path)
    return ref, path


def images(batch: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """[B, 3, S, S]: a coarse pattern per image plus noise, so images differ as wholes."""
    generator = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(2 * torch.randn(batch, 3, 4, 4, generator=generator), size=(size, size), mode="bilinear")
    return coarse + 0.5 * torch.randn(batch, 3, size, size, generator=generator)


# ---------------------------------------------------------------- the import is exact and complete


def test_reference_has_the_released_names():
    assert set(random_mutualvpr().state_dict()) == release_keys(2)


def test_import_gives_the_released_descriptors(released, tmp_path):
    ref, path = released
    summary = import_mutualvpr(path, tmp_path / "model.pt")
    assert summary.variant == "tiny_test" and summary.dropped_entries == ()
    assert summary.mapped_keys == len(ref.state_dict())

    model, cfg = load_model_checkpoint(tmp_path / "model.pt")
    assert (cfg.image_size, cfg.resize, cfg.pooling, cfg.adapter, cfg.descriptor_dim) == (
        SIZE, "squash", "gem", "mulconv", 512)
    assert load_pair_classifier(tmp_path / "model.pt") is None  # MutualVPR has no re-ranker
    x = images(2, seed=1)
    with torch.no_grad():
        expected = ref(x)
        tokens = model.forward_features(x)  # as evaluation embeds: tokens, then the head
        torch.testing.assert_close(tokens, ref.backbone(x), atol=1e-5, rtol=1e-5)  # class token and patches
        got = model.pool(tokens, model.token_grid(x))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        # A test that can fail: without the adapters' contribution the descriptors move far beyond the tolerance.
        for block in model.encoder.blocks:
            block.mlp.scale = 0.0
        assert (model(x) - expected).abs().max() > 1e-3


def test_import_at_the_pittsburgh_and_tokyo_size(released, tmp_path):
    """MutualVPR's Pittsburgh and Tokyo 24/7 loaders squash to 476 px: positions resized for 34 x 34."""
    ref, path = released
    import_mutualvpr(path, tmp_path / "model476.pt", image_size=476)
    model, cfg = load_model_checkpoint(tmp_path / "model476.pt")
    assert cfg.image_size == 476 and model.encoder.pos_embed.shape[1] == 1 + 34 * 34
    x = images(1, seed=2, size=476)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.backbone(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        import_mutualvpr(path, tmp_path / "model500.pt", image_size=500)


def test_every_tensor_lands_in_one_place_that_matters(released):
    """Each released tensor becomes exactly one placeforge tensor, and the ones checked here each move
    the reference's outputs far beyond the import test's tolerance (so a misplaced one would fail it)."""
    ref, _ = released
    state = ref.state_dict()
    x = images(1, seed=3)
    base, _ = map_mutualvpr_state(state, "tiny_test")
    assert len(base) == len(state)
    with torch.no_grad():
        tokens, descriptors = ref.backbone(x), ref(x)
    for key in ("backbone.blocks.1.adapter.branch3.1.conv.weight", "backbone.blocks.0.adapter.branch2.0.bn.running_var",
                "backbone.blocks.0.adapter.D_fc2.bias", "backbone.blocks.1.ls2.gamma", "aggregation.1.p"):
        moved = {**state, key: state[key] * 1.5 + 0.1}
        other, _ = map_mutualvpr_state(moved, "tiny_test")
        changed = [k for k in base if not torch.equal(base[k], other[k])]
        assert len(changed) == 1, (key, changed)
        reference = OfficialMutualVPR().eval()
        reference.load_state_dict(moved)
        with torch.no_grad():
            if key.startswith("aggregation."):  # unit 512-d descriptors: entries ~0.04
                assert (reference(x) - descriptors).abs().max() > 1e-4, key
            else:
                assert (reference.backbone(x) - tokens).abs().max() > 1e-3, key


@pytest.mark.parametrize("extra", ["backbone.blocks.0.adapter.branch4.conv.weight", "backbone.register_tokens",
                                   "linear.weight"])
def test_an_unknown_key_fails_naming_it(released, tmp_path, extra):
    ref, _ = released
    torch.save({**released_state(ref), f"module.{extra}": torch.zeros(1, 4, 64)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"no place in MutualVPR.*" + re.escape(extra)):
        import_mutualvpr(tmp_path / "extra.pth", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_a_missing_key_fails_naming_it(released):
    ref, _ = released
    state = dict(ref.state_dict())
    del state["backbone.blocks.1.adapter.branch2.1.bn.running_mean"]
    missing = re.escape("'backbone.blocks.1.adapter.branch2.1.bn.running_mean'")
    with pytest.raises(CheckpointError, match="missing key.*" + missing):
        map_mutualvpr_state(state, "tiny_test")
    del state["aggregation.1.p"]
    with pytest.raises(CheckpointError, match=r"missing key.*'aggregation\.1\.p'"):
        map_mutualvpr_state(state, "tiny_test")


def test_a_training_checkpoint_drops_its_training_state_by_name(released, tmp_path):
    ref, path = released
    content = {"epoch_num": 7, "model_state_dict": released_state(ref), "optimizer_state_dict": {"state": {}},
               "classifiers_state_dict": [{"weight": torch.randn(10, 512)}], "optimizers_state_dict": [{}],
               "best_val_recall1": 88.5}
    torch.save(content, tmp_path / "last_checkpoint.pth")
    summary = import_mutualvpr(tmp_path / "last_checkpoint.pth", tmp_path / "model.pt")
    assert set(summary.dropped_entries) == set(MUTUALVPR_DROPPED)
    assert "classifiers_state_dict" in summary.text()
    torch.save({**content, "scheduler": {"last_epoch": 3}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="scheduler"):
        import_mutualvpr(tmp_path / "other.pth", tmp_path / "other.pt")


def test_output_is_not_overwritten_and_variants_are_checked(released, tmp_path):
    _, path = released
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_mutualvpr(path, out)
    assert out.read_bytes() == b"keep me"
    import_mutualvpr(path, out, overwrite=True)
    assert load_model_checkpoint(out)[1].adapter == "mulconv"
    with pytest.raises(CheckpointError, match="asked for variant vitb"):
        import_mutualvpr(path, tmp_path / "other.pt", variant="vitb")


def test_the_released_vitb_layout_maps_onto_the_preset():
    """MutualVPR's ViT-B (shapes only, on the meta device): detected, and every key lands on a tensor
    of the preset's shape, the 37 x 37 position embedding resized to 36 x 36."""
    spec = encoder_spec(MUTUALVPR_VARIANTS["vitb"])
    with torch.device("meta"):
        ref = OfficialMutualVPR(spec.embed_dim, spec.depth, spec.num_heads)
    state = ref.state_dict()
    assert set(state) == release_keys(12)
    assert detect_mutualvpr_variant(state) == "vitb"
    model_state, cfg = map_mutualvpr_state(state, "vitb")  # shapes checked against the preset inside
    assert cfg.name == "vit_base_patch14_dinov2" and model_state["encoder.pos_embed"].shape == (1, 1 + 36 * 36, 768)
    assert model_state["encoder.blocks.11.mlp.adapter.branch_1x1.conv.weight"].shape == (192, 384, 1, 1)


def test_cli_imports_mutualvpr(released, tmp_path, capsys):
    _, path = released
    out = tmp_path / "mutualvpr.pt"
    assert cli_main(["import-checkpoint", "--from", "mutualvpr", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MutualVPR tiny_test" in printed and "global descriptor only" in printed
    assert load_model_checkpoint(out)[1].adapter == "mulconv"
    assert cli_main(["import-checkpoint", "--from", "mutualvpr", str(path), "--out", str(tmp_path / "x.pt"),
                     "--variant", "vitg"]) == 2
    assert "vitg" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    assert cli_main(["import-checkpoint", "--from", "mutualvpr", str(path), "--out", str(tmp_path / "y.pt"),
                     "--image-size", "476"]) == 0
    assert load_model_checkpoint(tmp_path / "y.pt")[1].image_size == 476
    assert cli_main(["import-checkpoint", "--from", "pairvpr", str(path), "--out", str(tmp_path / "z.pt"),
                     "--image-size", "476"]) == 2
    assert "--image-size is for --from mutualvpr" in capsys.readouterr().err
