"""Importing the released Pair-VPR checkpoints (models.import_released): every key, exact outputs.

The reference is a re-write of Pair-VPR's PairVPRNet as its evaluation runs it
(csiro-robotics/Pair-VPR: pairvpr/models/pairvpr.py, models/tools/blocks.py without xFormers,
models/tools/pos_embed.py) around the official DINOv2 re-write of test_dinov2_weights, at
width 64 with 2 encoder and 2 decoder blocks (the `tiny_test` variant); its state dict is the
release layout (`torch.save(model.state_dict())`, pairvpr/training/train_stagetwo.py).
Nothing of the importer, of placeforge's decoder or of timm computes the expected outputs.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from placeforge.models.checkpoint import CheckpointError, load_model_checkpoint, load_pair_classifier
from placeforge.models.decoder import decoder_config
from placeforge.models.encoders import encoder_spec
from placeforge.models.import_released import (
    PAIRVPR_DROPPED,
    PAIRVPR_VARIANTS,
    detect_pairvpr_variant,
    import_pairvpr,
    map_pairvpr_state,
    read_released_state,
)
from placeforge.pipelines.cli import main as cli_main
from tests.conftest import fill_like_trained
from tests.test_dinov2_weights import OfficialViT, official_keys

SIZE = 322  # Pair-VPR's evaluation size: a 23 x 23 patch grid
GRID = SIZE // 14
REGISTERS = 4


# ---------------------------------------------------------------- Pair-VPR, re-written


def pairvpr_positions(dim: int, side: int, class_row: bool) -> torch.Tensor:
    """get_2d_sincos_pos_embed: float64 as NumPy computes it; its meshgrid is width-first, so
    the first half of the channels codes the column, the second half the row.  -> [(1 +) N, dim]."""
    cols, rows = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def code(coord: np.ndarray) -> np.ndarray:
        angles = coord.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([code(cols), code(rows)], axis=1)
    if class_row:
        table = np.concatenate([np.zeros((1, dim)), table])
    return torch.from_numpy(table).float()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention, heads split from contiguous channels.  [B, N, C], [B, M, C] -> [B, N, C]."""
    b, n, c = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # [B, h, *, C/h]

    weights = (split(q) @ split(k).transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, n, c)


class PairVPRDecoderBlock(nn.Module):
    """blocks.py DecoderBlock as _set_decoder builds it: qkv_bias, norm_mem, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3, self.norm_y = (nn.LayerNorm(dim, eps=1e-6) for _ in range(4))
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.cross_attn = nn.ModuleDict({name: nn.Linear(dim, dim) for name in ("projq", "projk", "projv", "proj")})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn["qkv"](self.norm1(x)).chunk(3, dim=-1)  # reshape(B, N, 3, h, C/h): q, k, v blocks
        x = x + self.attn["proj"](attend(q, k, v, self.heads))
        y_, cross = self.norm_y(y), self.cross_attn
        x = x + cross["proj"](attend(cross["projq"](self.norm2(x)), cross["projk"](y_), cross["projv"](y_), self.heads))
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm3(x))))


class PairVPRNet(nn.Module):
    """PairVPRNet with train.classtoken (the stage-2 model): parameter names as released."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 2, swiglu: bool = False,
                 dec_width: int = 64, dec_depth: int = 2, dec_heads: int = 2) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"model": OfficialViT(518, width, depth, heads, REGISTERS, swiglu)})
        self.globalizer = nn.Sequential(nn.Linear(width, 512))
        self.decoder_embed = nn.Linear(width, dec_width)
        self.dec_blocks = nn.ModuleList(PairVPRDecoderBlock(dec_width, dec_heads) for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dec_width, eps=1e-6)
        self.decoder_clstoken = nn.Parameter(torch.zeros(1, 1, dec_width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
        self.prediction_head = nn.Linear(dec_width, 14 * 14 * 3)
        self.classvprmodule = nn.Sequential(nn.Linear(dec_width, 512), nn.ReLU(), nn.Linear(512, 1))
        self.register_buffer("dec_pos_embed_cls", pairvpr_positions(dec_width, GRID, class_row=True))
        self.register_buffer("dec_pos_embed", pairvpr_positions(dec_width, GRID, class_row=False))

    def global_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mode="global": (patch tokens [B, N, C], descriptor [B, 512])."""
        x = self.encoder["model"](images)  # [B, 1 + R + N, C]
        return x[:, 1 + REGISTERS:], F.normalize(self.globalizer(x[:, 0]), p=2, dim=-1)

    def pair_logit(self, feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
        """mode="pairvpr": A (with the class token) attends to B.  -> [B]."""
        a, b = self.decoder_embed(feat_a), self.decoder_embed(feat_b)
        a = torch.cat([self.decoder_clstoken.expand(a.shape[0], -1, -1), a], dim=1) + self.dec_pos_embed_cls
        b = b + self.dec_pos_embed
        for block in self.dec_blocks:
            a = block(a, b)
        return self.classvprmodule(self.dec_norm(a)[:, 0]).squeeze(-1)


def release_keys(depth: int, dec_depth: int, swiglu: bool) -> set[str]:
    """The released file's keys, as pairvpr/models/pairvpr.py names its parameters and buffers."""
    keys = {"encoder.model." + k for k in official_keys(depth, REGISTERS, swiglu)}
    keys |= {"decoder_clstoken", "mask_token", "dec_pos_embed", "dec_pos_embed_cls"}
    for layer in ("globalizer.0", "decoder_embed", "dec_norm", "prediction_head", "classvprmodule.0",
                  "classvprmodule.2"):
        keys |= {f"{layer}.weight", f"{layer}.bias"}
    block = ("norm1", "attn.qkv", "attn.proj", "cross_attn.projq", "cross_attn.projk", "cross_attn.projv",
             "cross_attn.proj", "norm2", "norm3", "norm_y", "mlp.fc1", "mlp.fc2")
    return keys | {f"dec_blocks.{i}.{layer}.{p}" for i in range(dec_depth) for layer in block
                   for p in ("weight", "bias")}


def random_pairvpr(seed: int = 0) -> PairVPRNet:
    """The tiny reference with every parameter random (none at its init value), buffers as built."""
    ref = PairVPRNet().eval()
    fill_like_trained(ref, seed, lambda name, p: name.endswith("gamma") or (
        p.ndim == 1 and "norm" in name and name.endswith("weight")))
    return ref


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[PairVPRNet, Path]:
    ref = random_pairvpr()
    path = tmp_path_factory.mktemp("release") / "pairvpr-tiny.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def images(batch: int, seed: int) -> torch.Tensor:
    """[B, 3, 322, 322]: a coarse pattern per image plus noise, so images differ as wholes."""
    generator = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(2 * torch.randn(batch, 3, 4, 4, generator=generator), size=(SIZE, SIZE), mode="bilinear")
    return coarse + 0.5 * torch.randn(batch, 3, SIZE, SIZE, generator=generator)


# ---------------------------------------------------------------- the import is exact and complete


def test_reference_has_the_released_names():
    assert set(random_pairvpr().state_dict()) == release_keys(2, 2, swiglu=False)


def test_import_gives_the_released_outputs(released, tmp_path):
    ref, path = released
    summary = import_pairvpr(path, tmp_path / "model.pt")
    assert summary.variant == "tiny_test" and summary.decoder == "pairvpr_dec64d2b"
    state = ref.state_dict()
    assert set(summary.dropped_keys) == set(PAIRVPR_DROPPED)
    assert summary.mapped_keys + len(PAIRVPR_DROPPED) == len(state)

    model, cfg = load_model_checkpoint(tmp_path / "model.pt")
    pair = load_pair_classifier(tmp_path / "model.pt")
    assert (cfg.image_size, cfg.resize, cfg.pooling, cfg.descriptor_dim) == (SIZE, "squash", "cls", 512)
    assert pair is not None and not pair.aligned
    x_a, x_b = images(2, seed=1), images(2, seed=2)
    with torch.no_grad():
        (ref_a, ref_desc_a), (ref_b, _) = ref.global_forward(x_a), ref.global_forward(x_b)
        tokens_a, tokens_b = model.forward_features(x_a), model.forward_features(x_b)  # as evaluation embeds
        prefix = model.encoder.num_prefix_tokens
        torch.testing.assert_close(model.pool(tokens_a), ref_desc_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens_a[:, prefix:], ref_a, atol=1e-5, rtol=1e-5)
        logits = pair(tokens_a[:, prefix:], tokens_b[:, prefix:], (GRID, GRID))
        expected = ref.pair_logit(ref_a, ref_b)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        swapped = ref.pair_logit(ref_b, ref_a)
        torch.testing.assert_close(pair.score(tokens_a[:, prefix:], tokens_b[:, prefix:], (GRID, GRID)),
                                   expected + swapped, atol=1e-5, rtol=1e-5)  # the re-ranking score
    # A test that can fail: the logits depend on the pair and its order far beyond the tolerance, and
    # so does the layout of the positions that the import converts (row code first vs column code first).
    assert (expected - swapped).abs().max() > 1e-2
    row_first = copy.deepcopy(ref)
    table = pairvpr_positions(64, GRID, class_row=True)
    row_first.dec_pos_embed_cls.copy_(torch.cat([table[:, 32:], table[:, :32]], dim=1))
    row_first.dec_pos_embed.copy_(row_first.dec_pos_embed_cls[1:])
    with torch.no_grad():
        assert (row_first.pair_logit(ref_a, ref_b) - expected).abs().max() > 1e-3


def test_every_key_is_used_and_each_changes_the_outputs(released):
    """Keys mapped or dropped cover the file; perturbing any mapped decoder tensor moves the mapped result."""
    ref, _ = released
    state = ref.state_dict()
    model_state, pair_state, _ = map_pairvpr_state(state, "tiny_test")
    # qkv splits into q and kv, projq / projk / projv merge into q and kv: as many keys out as in
    assert len(model_state) + len(pair_state) + len(PAIRVPR_DROPPED) == len(state)
    for key in ("dec_blocks.1.cross_attn.projv.bias", "dec_blocks.0.attn.qkv.weight", "decoder_clstoken"):
        moved = {**state, key: state[key] + 1.0}
        _, other, _ = map_pairvpr_state(moved, "tiny_test")
        assert any(not torch.equal(other[k], pair_state[k]) for k in pair_state), key


@pytest.mark.parametrize("extra", ["dec_blocks.0.attn.q_bias", "encoder.model.blocks.0.attn.q_bias",
                                   "dec_blocks.1.norm4.weight", "stage_three_head.weight"])
def test_an_unknown_key_fails_naming_it(released, tmp_path, extra):
    ref, _ = released
    state = {**ref.state_dict(), extra: torch.zeros(64)}
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"neither mapped nor dropped.*" + extra.replace(".", r"\.")):
        import_pairvpr(tmp_path / "extra.pth", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_a_missing_key_or_other_positions_fail(released, tmp_path):
    ref, _ = released
    state = dict(ref.state_dict())
    del state["dec_blocks.1.cross_attn.projk.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'dec_blocks\.1\.cross_attn\.projk\.weight'"):
        map_pairvpr_state(state, "tiny_test")
    state = {**ref.state_dict(), "dec_pos_embed": pairvpr_positions(64, 16, class_row=False)}  # a 224 px table
    with pytest.raises(CheckpointError, match="dec_pos_embed .* not Pair-VPR's sine-cosine"):
        map_pairvpr_state(state, "tiny_test")


def test_wrapped_and_dataparallel_files_read_the_same(released, tmp_path):
    ref, path = released
    state = ref.state_dict()
    torch.save({"model_state_dict": {f"module.{k}": t for k, t in state.items()}, "epoch": 3}, tmp_path / "w.pth")
    read = read_released_state(tmp_path / "w.pth")
    assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)


def test_files_that_need_unpickling_are_refused(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        read_released_state(tmp_path / "pickled.pth")


def test_output_is_not_overwritten_unless_asked(released, tmp_path):
    _, path = released
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_pairvpr(path, out)
    assert out.read_bytes() == b"keep me"
    import_pairvpr(path, out, overwrite=True)
    assert load_pair_classifier(out) is not None
    with pytest.raises(CheckpointError, match="asked for variant vitb"):
        import_pairvpr(path, tmp_path / "other.pt", variant="vitb")


@pytest.mark.parametrize("variant", ["vitb", "vitg"])
def test_full_size_release_layouts_map_onto_the_presets(variant):
    """The released ViT-B and ViT-G layouts (shapes only, on the meta device) are detected and every
    key lands on a tensor of the presets' shapes; ViT-G's encoder has SwiGLU (w12 / w3)."""
    spec = encoder_spec(PAIRVPR_VARIANTS[variant].encoder)
    dec = decoder_config(PAIRVPR_VARIANTS[variant].decoder)
    swiglu = variant == "vitg"
    with torch.device("meta"):
        ref = PairVPRNet(spec.embed_dim, spec.depth, spec.num_heads, swiglu, dec.width, dec.depth, dec.num_heads)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("dec_pos_embed")}  # meta: no values
    assert set(state) | {"dec_pos_embed", "dec_pos_embed_cls"} == release_keys(spec.depth, dec.depth, swiglu)
    assert detect_pairvpr_variant(state) == variant
    model_state, pair_state, cfg = map_pairvpr_state(state, variant)  # shapes checked against the presets inside
    assert cfg.name == PAIRVPR_VARIANTS[variant].encoder and model_state["encoder.pos_embed"].shape[1] == GRID * GRID


# ---------------------------------------------------------------- the command line


def test_cli_imports_and_refuses_what_it_cannot(released, tmp_path, capsys):
    _, path = released
    out = tmp_path / "pairvpr.pt"
    assert cli_main(["import-checkpoint", "--from", "pairvpr", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_test" in printed and "--rerank-top-k 100" in printed
    assert load_pair_classifier(out) is not None and load_model_checkpoint(out)[1].resize == "squash"

    assert cli_main(["import-checkpoint", "--from", "pairvpr", str(path), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["import-checkpoint", "--from", "mutualvpr", str(path), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err  # a Pair-VPR file is no MutualVPR model
    assert "not a MutualVPR checkpoint" in err and not (tmp_path / "m.pt").exists()
    torch.save({**torch.load(path, weights_only=True), "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    assert cli_main(["import-checkpoint", "--from", "pairvpr", str(tmp_path / "extra.pth"),
                     "--out", str(tmp_path / "x.pt")]) == 2
    assert "extra.weight" in capsys.readouterr().err
