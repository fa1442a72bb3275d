"""Stage-1 MIM decoder and stage-2 heads: shapes on tiny presets, the aligned similarity,
and every parameter receiving a gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from placeforge.models.decoder import SiameseMIMDecoder, decoder_config, patchify, random_patch_mask
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.models.heads import CosFaceClassifier, PairClassifier, aligned_similarity
from placeforge.trainer.losses import hardest_pairs, masked_patch_mse, multi_similarity_loss, pair_bce_loss
from tests.tiny_models import PATCH, images, tiny_mim


def test_shapes_with_tiny_presets_square_and_not():
    mim = tiny_mim()
    for height, width in [(112, 112), (112, 84)]:  # grids 8 x 8 and 8 x 6 (dynamic_img_size)
        n = (height // PATCH) * (width // PATCH)
        mask, keep_idx = random_patch_mask(2, n, 0.9, torch.Generator().manual_seed(0))
        pred = mim(images(2, height, width), images(2, height, width, seed=1), keep_idx)
        assert pred.shape == (2, n, PATCH * PATCH * 3)
        assert torch.isfinite(pred).all()

    pair = PairClassifier(mim.decoder)
    patches_a, patches_b = torch.randn(3, 64, 64), torch.randn(3, 48, 64)
    assert pair(patches_a, patches_b, (8, 8), (8, 6)).shape == (3,)
    assert pair.score(patches_a, patches_b, (8, 8), (8, 6)).shape == (3,)
    with pytest.raises(ValueError, match="class token"):
        pair(torch.randn(3, 65, 64), patches_a, (8, 8))
    assert CosFaceClassifier(512, 7)(torch.randn(3, 512), torch.tensor([0, 6, 3])).shape == (3, 7)


def test_aligned_similarity_by_hand_and_across_grids():
    torch.manual_seed(0)
    a = torch.randn(2, 6, 8)  # [B, N, C] on a 2 x 3 grid
    assert torch.allclose(aligned_similarity(a, 3.0 * a, (2, 3), (2, 3)), torch.ones(2))  # scale-free
    assert torch.allclose(aligned_similarity(a, -a, (2, 3), (2, 3)), -torch.ones(2))
    shifted = a.roll(1, dims=1)  # the same tokens, one position on
    by_hand = F.cosine_similarity(a, shifted, dim=-1).mean(dim=1)
    assert torch.allclose(aligned_similarity(a, shifted, (2, 3), (2, 3)), by_hand)
    b = a.reshape(2, 2, 3, 8).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 24, 8)  # 4 x 6 copy
    assert torch.allclose(aligned_similarity(a, b, (2, 3), (4, 6)), torch.ones(2), atol=1e-5)


def test_aligned_pair_classifier_starts_from_the_aligned_similarity_and_learns_its_scale():
    torch.manual_seed(0)
    pair = PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, PATCH), hidden_dim=32, aligned=True)
    a, b = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
    same = a + 0.1 * torch.randn(4, 64, 64)
    logits = pair(a, b, (8, 8))
    assert torch.allclose(logits, 10.0 * (aligned_similarity(a, b, (8, 8), (8, 8)) - 0.5), atol=1e-6)
    assert (pair.score(a, same, (8, 8)) > pair.score(a, b, (8, 8))).all()  # a near copy outranks a stranger
    pair_bce_loss(pair(a, same, (8, 8)), pair(a, b, (8, 8))).backward()
    assert pair.aligned_scale.grad.abs() > 0 and pair.aligned_offset.grad.abs() > 0
    assert pair.mlp[-1].weight.grad.abs().sum() > 0  # the decoder part learns from the start too
    assert not PairClassifier(SiameseMIMDecoder(decoder_config("dec64d2b"), 64, PATCH)).aligned  # Pair-VPR's: off


def test_unknown_decoder_lists_valid_names():
    with pytest.raises(ValueError, match="dec768d12b"):
        decoder_config("dec512d8b")
    cfg = decoder_config("dec768d12b")
    assert (cfg.width, cfg.depth, cfg.num_heads) == (768, 12, 12)


def test_every_mim_parameter_gets_a_gradient():
    mim = tiny_mim()
    x1, x2 = images(2), images(2, seed=1)
    mask, keep_idx = random_patch_mask(2, 64, 0.9, torch.Generator().manual_seed(0))
    masked_patch_mse(mim(x1, x2, keep_idx), patchify(x1, PATCH), mask).backward()
    missing = [name for name, p in mim.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_every_stage2_parameter_gets_a_gradient_and_stage1_weights_carry_over():
    torch.manual_seed(0)
    model = build_model(EncoderConfig(name="vit_tiny_test", image_size=112))
    stage1 = SiameseMIMDecoder(decoder_config("dec64d2b"), 64, PATCH)
    decoder = SiameseMIMDecoder(decoder_config("dec64d2b"), 64, PATCH)
    decoder.load_state_dict(stage1.state_dict())
    pair = PairClassifier(decoder)
    assert torch.equal(pair.blocks[1].cross_attn.kv.weight, stage1.blocks[1].cross_attn.kv.weight)
    assert not any("mask_token" in k or "pixel_head" in k for k in pair.state_dict())  # unused in stage 2
    cosface = CosFaceClassifier(512, 2)

    x, labels = images(4), torch.tensor([0, 0, 1, 1])
    patches = model.forward_features(x)[:, 1:]  # [4, 64, 64]
    descriptors = model(x)  # [4, 512]
    anchor, positive, negative = hardest_pairs(descriptors, labels)
    loss = (multi_similarity_loss(descriptors, labels)
            + 2.0 * pair_bce_loss(pair(patches[anchor], patches[positive], (8, 8)),
                                  pair(patches[anchor], patches[negative], (8, 8)))
            + F.cross_entropy(cosface(descriptors, labels), labels))
    loss.backward()
    for module in (model, pair, cosface):
        missing = [name for name, p in module.named_parameters() if p.grad is None]
        assert not missing
