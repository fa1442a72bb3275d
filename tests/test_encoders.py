"""Encoder registry, global-descriptor model, preprocessing and the checkpoint format.

Pure and fast: the tiny preset on CPU; the DINOv2 presets are only built on the meta device.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from placeforge.models.checkpoint import (
    CheckpointError,
    inspect_model_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)
from placeforge.models.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderConfig,
    build_model,
    encoder_spec,
    preprocess,
    resize_and_crop,
)
from tests.conftest import jpeg_bytes


def images(batch: int = 2, size: int = 112, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pooling", ["cls", "gem", "gem_grid"])
def test_tiny_model_shapes_and_unit_norm(pooling):
    torch.manual_seed(0)
    model = build_model(EncoderConfig(pooling=pooling, descriptor_dim=32)).eval()
    x = images(3)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + (112 // 14) ** 2, ENCODERS["vit_tiny_test"].embed_dim)
    descriptors = model(x)
    assert descriptors.shape == (3, 32)
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model(images(1, size=140)).shape == (1, 32)  # dynamic image size: other multiples of 14 work


@pytest.mark.parametrize("pooling", ["cls", "gem", "gem_grid"])
def test_every_parameter_receives_a_gradient(pooling):
    torch.manual_seed(0)
    model = build_model(EncoderConfig(pooling=pooling, descriptor_dim=16)).train()
    descriptors = model(images(4))
    target = torch.randn_like(descriptors)
    (descriptors * target).sum().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    if pooling != "cls":
        assert model.gem.p.grad is not None


def by_hand_grid_descriptor(model, x: torch.Tensor, cells: int) -> torch.Tensor:
    """gem_grid written out cell by cell: GeM over each cell's tokens, shared head, normalise, join."""
    patch = model.encoder.patch_embed.patch_size[0]
    rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
    tokens = torch.nn.functional.normalize(model.forward_features(x)[:, 1:], dim=-1)  # [B, N, C]
    grid = tokens.reshape(x.shape[0], rows, cols, -1)
    p, parts = model.gem.p, []
    for i in range(cells):
        for j in range(cells):
            cell = grid[:, rows * i // cells:-(-rows * (i + 1) // cells), cols * j // cells:-(-cols * (j + 1) // cells)]
            pooled = cell.flatten(1, 2).clamp(min=1e-6).pow(p).mean(dim=1).pow(1 / p)  # [B, C]
            parts.append(torch.nn.functional.normalize(model.head(pooled), dim=-1))
    return torch.nn.functional.normalize(torch.cat(parts, dim=1), dim=-1)


@pytest.mark.parametrize("size_hw", [(112, 112), (56, 98), (70, 112)])  # grids 8 x 8, 4 x 7 (uneven), 5 x 8
def test_gem_grid_is_gem_per_cell_through_one_head(size_hw):
    torch.manual_seed(0)
    model = build_model(EncoderConfig(pooling="gem_grid", pooling_grid=2, descriptor_dim=32)).eval()
    x = torch.randn(2, 3, *size_hw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand_grid_descriptor(model, x, 2), atol=1e-5, rtol=1e-4)
    assert model.head.weight.shape == (32 // 4, ENCODERS["vit_tiny_test"].embed_dim)  # one head shared by 4 cells


def test_gem_grid_needs_a_descriptor_that_splits_over_the_cells_and_the_grid_of_odd_shapes():
    with pytest.raises(ValueError, match="multiple of 9, got 32"):
        EncoderConfig(pooling="gem_grid", pooling_grid=3, descriptor_dim=32).validate()
    with pytest.raises(ValueError, match="pooling_grid must be >= 1"):
        EncoderConfig(pooling="gem_grid", pooling_grid=0).validate()
    model = build_model(EncoderConfig(pooling="gem_grid", descriptor_dim=16)).eval()
    x = torch.randn(1, 3, 56, 98)
    tokens = model.forward_features(x)  # 4 x 7 = 28 patches: not a square
    with pytest.raises(ValueError, match="not a square"):
        model.pool(tokens)
    torch.testing.assert_close(model.pool(tokens, model.token_grid(x)), model(x))


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown encoder 'vit_huge'.*vit_tiny_test.*vit_giant_patch14_dinov2"):
        encoder_spec("vit_huge")
    with pytest.raises(ValueError, match="valid: vit_tiny_test"):
        EncoderConfig(name="resnet50").validate()
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        EncoderConfig(image_size=100).validate()
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(pooling="avg").validate()


@pytest.mark.parametrize("name", [n for n, s in ENCODERS.items() if s.timm_name])
def test_dinov2_presets_have_the_shapes_their_names_spell(name):
    spec = ENCODERS[name]
    with torch.device("meta"):
        model = build_model(EncoderConfig(name=name, image_size=224))
    encoder = model.encoder
    assert encoder.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
    assert (encoder.embed_dim, len(encoder.blocks), encoder.blocks[0].attn.num_heads) == (
        spec.embed_dim, spec.depth, spec.num_heads)
    assert model.head.weight.shape == (512, spec.embed_dim)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    cfg = EncoderConfig(pooling="gem_grid", pooling_grid=2, descriptor_dim=24)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.gem.p.fill_(2.5)  # a non-default value must survive the round trip
    path = save_model_checkpoint(model, cfg, tmp_path / "ckpt" / "model.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary left behind
    loaded, loaded_cfg = load_model_checkpoint(path)
    assert loaded_cfg == cfg and not loaded.training
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert inspect_model_checkpoint(path) == cfg
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1 and raw["kind"] == "global_descriptor" and raw["encoder_config"]["pooling"] == "gem_grid"
    del raw["encoder_config"]["pooling_grid"]  # a file from before the grid option reads with its default
    raw["encoder_config"]["checkpoint"] = raw["encoder_config"].pop("weights")  # and `weights` had that name
    torch.save(raw, tmp_path / "older.pt")
    assert inspect_model_checkpoint(tmp_path / "older.pt") == cfg


def test_checkpoint_of_another_architecture_names_the_file_and_keys(tmp_path):
    cfg = EncoderConfig(descriptor_dim=16)
    path = save_model_checkpoint(build_model(cfg), cfg, tmp_path / "model.pt")
    content = torch.load(path, weights_only=True)
    content["encoder_config"]["descriptor_dim"] = 32  # the weights say 16
    torch.save(content, tmp_path / "wrong_dim.pt")
    with pytest.raises(CheckpointError, match=r"wrong_dim\.pt.*head\.weight \(16, 64\) != \(32, 64\)"):
        load_model_checkpoint(tmp_path / "wrong_dim.pt")

    content["encoder_config"].update(descriptor_dim=16, pooling="gem")  # expects gem.p, which is absent
    torch.save(content, tmp_path / "no_gem.pt")
    with pytest.raises(CheckpointError, match=r"no_gem\.pt.*missing key\(s\) \['gem\.p'\]"):
        inspect_model_checkpoint(tmp_path / "no_gem.pt")

    with pytest.raises(CheckpointError, match="does not match its encoder config"):
        save_model_checkpoint(build_model(cfg), dataclasses.replace(cfg, pooling="gem"), tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


class NotATensor:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


def test_checkpoint_with_pickled_objects_or_garbage_is_refused(tmp_path):
    cfg = EncoderConfig(descriptor_dim=8)
    content = torch.load(save_model_checkpoint(build_model(cfg), cfg, tmp_path / "ok.pt"), weights_only=True)
    content["extra"] = NotATensor()
    torch.save(content, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"pickled\.pt.*weights_only=True"):
        load_model_checkpoint(tmp_path / "pickled.pt")

    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a loadable model checkpoint"):
        load_model_checkpoint(tmp_path / "garbage.pt")
    torch.save({"model": content["state_dict"]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a placeforge global_descriptor checkpoint"):
        load_model_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model_checkpoint(tmp_path / "missing.pt")


def test_encoder_weights_load_from_a_local_timm_file(tmp_path):
    torch.manual_seed(2)
    source = build_model(EncoderConfig()).encoder
    torch.save(source.state_dict(), tmp_path / "encoder.pth")
    model = build_model(EncoderConfig(weights=str(tmp_path / "encoder.pth")))
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_preprocess_shapes_crop_and_normalisation():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 50, 100))  # blue left quarter: cut away by the centre crop
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    batch = preprocess([buffer.getvalue(), jpeg_bytes(3, size=(96, 72))], image_size=56)
    assert batch.shape == (2, 3, 56, 56) and batch.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = batch[0] * std + mean  # back to [0, 1]
    assert torch.allclose(pixels[:, 5:-5, 5:-5], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 46, 46),
                          atol=0.02)
    assert preprocess([], 28).shape == (0, 3, 28, 28)
    assert np.isfinite(batch.numpy()).all()


def test_pair_classifier_travels_with_the_model_and_scores_identically(tmp_path):
    from placeforge.models.checkpoint import load_pair_classifier
    from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
    from placeforge.models.heads import PairClassifier

    torch.manual_seed(3)
    cfg = EncoderConfig(descriptor_dim=16, image_size=56)
    model = build_model(cfg).eval()
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, 14), hidden_dim=32).eval()
    plain = save_model_checkpoint(model, cfg, tmp_path / "plain.pt")
    assert load_pair_classifier(plain) is None  # a model without one: global recall only

    path = save_model_checkpoint(model, cfg, tmp_path / "with_pair.pt", pair=pair, decoder="dec64d2b")
    loaded = load_pair_classifier(path)
    patches_a, patches_b = torch.randn(3, 16, 64), torch.randn(3, 16, 64)  # [B, N, C], 4 x 4 grid
    with torch.no_grad():
        assert torch.equal(pair.score(patches_a, patches_b, (4, 4)), loaded.score(patches_a, patches_b, (4, 4)))
    assert load_model_checkpoint(path)[1] == cfg  # the model part reads as before

    aligned = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, 14), hidden_dim=32, aligned=True)
    with torch.no_grad():
        aligned.aligned_scale.fill_(7.0)
    loaded = load_pair_classifier(save_model_checkpoint(model, cfg, tmp_path / "aligned.pt", pair=aligned.eval(),
                                                        decoder="dec64d2b"))
    assert loaded.aligned and loaded.aligned_scale.item() == 7.0
    assert load_pair_classifier(path).global_weight == 0.0  # Pair-VPR's score unless a recipe chose otherwise
    aligned.global_weight = 20.0
    weighted = save_model_checkpoint(model, cfg, tmp_path / "weighted.pt", pair=aligned.eval(), decoder="dec64d2b")
    assert load_pair_classifier(weighted).global_weight == 20.0
    older = torch.load(weighted, weights_only=True)
    del older["pair_classifier"]["global_weight"]  # a file from before the option
    torch.save(older, tmp_path / "older.pt")
    assert load_pair_classifier(tmp_path / "older.pt").global_weight == 0.0
    with torch.no_grad():
        assert torch.equal(aligned.score(patches_a, patches_b, (4, 4)), loaded.score(patches_a, patches_b, (4, 4)))

    content = torch.load(path, weights_only=True)
    content["pair_classifier"]["decoder"] = "dec768d12b"  # weights of another decoder width
    torch.save(content, tmp_path / "wrong_decoder.pt")
    with pytest.raises(CheckpointError, match=r"wrong_decoder\.pt: the stored pair classifier does not fit"):
        load_pair_classifier(tmp_path / "wrong_decoder.pt")


def test_per_image_input_norm_ignores_each_channels_gain_and_offset():
    torch.manual_seed(0)
    per_image = build_model(EncoderConfig("vit_w128_d4_patch8", 64, 32, "gem", input_norm="per_image")).eval()
    imagenet = build_model(EncoderConfig("vit_w128_d4_patch8", 64, 32, "gem")).eval()
    imagenet.load_state_dict(per_image.state_dict())  # the same weights: the norm has none
    images = torch.randn(3, 3, 64, 64)
    darker = images * torch.tensor([0.3, 0.5, 0.4]).view(1, 3, 1, 1) - 1.0  # a night-like tint, per channel
    with torch.no_grad():
        assert torch.allclose(per_image(images), per_image(darker), atol=1e-4)
        assert not torch.allclose(imagenet(images), imagenet(darker), atol=1e-2)


def test_squash_keeps_the_whole_view_where_crop_cuts_the_sides():
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # a red stripe at the left edge of a 4:3 image
    image = Image.fromarray(pixels)
    assert resize_and_crop(image, 30, "squash")[:, 0, 0].min() > 200
    assert resize_and_crop(image, 30, "crop")[:, 0, 0].max() < 50


def test_input_norm_and_resize_travel_with_the_checkpoint(tmp_path):
    cfg = EncoderConfig("vit_tiny_test", 28, 16, "gem", input_norm="per_image", resize="squash")
    path = save_model_checkpoint(build_model(cfg), cfg, tmp_path / "m.pt")
    assert inspect_model_checkpoint(path) == cfg
    content = torch.load(path, weights_only=True)
    for key in ("input_norm", "resize"):  # a checkpoint written before these existed
        del content["encoder_config"][key]
    torch.save(content, tmp_path / "old.pt")
    old = inspect_model_checkpoint(tmp_path / "old.pt")
    assert (old.input_norm, old.resize) == ("imagenet", "crop")
    with pytest.raises(ValueError, match="input_norm"):
        EncoderConfig("vit_tiny_test", 28, input_norm="per_batch").validate()
