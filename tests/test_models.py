"""Stage-1 MIM decoder, stage-2 heads, losses and schedules.

Pure and fast: tiny presets on CPU.  Expected loss values are worked out by hand in each
test from inputs chosen so the arithmetic is short, never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from placeforge.models.decoder import (
    SiameseMIM,
    SiameseMIMDecoder,
    decoder_config,
    encode_visible,
    patchify,
    random_patch_mask,
)
from placeforge.models.encoders import EncoderConfig, build_model, encoder_spec
from placeforge.models.heads import CosFaceClassifier, PairClassifier, aligned_similarity
from placeforge.trainer.losses import (
    far_apart,
    hardest_pairs,
    masked_patch_mse,
    multi_similarity_loss,
    multi_similarity_mine,
    pair_bce_loss,
    positive_keys,
)
from placeforge.trainer.schedules import (
    base_lr_for_batch,
    cosine_with_warmup,
    layer_decay_groups,
    set_optimizer_values,
    weight_decay_schedule,
)

PATCH = 14  # vit_tiny_test


def images(batch: int, height: int = 112, width: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width or height, generator=torch.Generator().manual_seed(seed))


def tiny_mim(image_size: int = 112, seed: int = 0) -> SiameseMIM:
    torch.manual_seed(seed)
    encoder = encoder_spec("vit_tiny_test").build(image_size)
    return SiameseMIM(encoder, SiameseMIMDecoder(decoder_config("dec64d2b"), encoder.embed_dim, PATCH))


def unit_vectors_deg(*angles_deg: float) -> torch.Tensor:
    """[len, 2] float64 unit vectors at the given angles, so cosines are cos(angle differences)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


# ---------------------------------------------------------------- masking, patches, encoder


@pytest.mark.parametrize("num_patches,ratio,masked", [(64, 0.9, 58), (256, 0.9, 230), (16, 0.75, 12), (4, 0.9, 3)])
def test_random_patch_mask_exact_count(num_patches, ratio, masked):
    g = torch.Generator().manual_seed(0)
    mask, keep_idx = random_patch_mask(5, num_patches, ratio, g)
    assert mask.shape == (5, num_patches) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == masked).all()
    assert keep_idx.shape == (5, num_patches - masked)
    assert not mask.gather(1, keep_idx).any()  # kept patches are exactly the unmasked ones
    assert (keep_idx.diff(dim=1) > 0).all()  # sorted, no repeats
    assert len({tuple(row.tolist()) for row in keep_idx}) > 1  # each image draws its own mask
    again, _ = random_patch_mask(5, num_patches, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_patchify_order_matches_the_grid():
    image = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)  # grid 2 x 3 of 2-px patches
    patches = patchify(image, 2)  # [2, 6, 12]
    assert patches.shape == (2, 6, 12)
    for row in range(2):
        for col in range(3):
            for i in range(2):
                for j in range(2):
                    for c in range(3):
                        value = patches[1, row * 3 + col, (i * 2 + j) * 3 + c]
                        assert value == image[1, c, row * 2 + i, col * 2 + j]


def test_encode_visible_equals_full_forward_when_nothing_is_masked():
    encoder = tiny_mim().encoder.eval()
    x = images(2)
    full = encoder.forward_features(x)  # [2, 65, 64]
    every = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(encode_visible(encoder, x, every), full, atol=1e-5, rtol=1e-5)
    # Any order of all patches gives the same tokens in that order: positions travel with the patches.
    perm = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    out = encode_visible(encoder, x, perm)
    torch.testing.assert_close(out[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 64)),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- shapes and gradients


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


# ---------------------------------------------------------------- losses, by hand


def test_masked_patch_mse_by_hand_and_ignores_unmasked_patches():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 7.0]]])  # [1, 3, 4]
    mask = torch.tensor([[True, True, False]])
    pred = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]]], requires_grad=True)
    # Patch 0: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; the normalised target is
    # (x - 2.5) / sqrt(5/3 + 1e-6), so predicting 0 costs 1.25 / (5/3 + 1e-6).
    # Patch 1: a constant patch normalises to 0; predicting 1 costs 1.  Patch 2 is not masked.
    expected = (1.25 / (5 / 3 + 1e-6) + 1.0) / 2
    loss = masked_patch_mse(pred, target, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert pred.grad[0, 2].abs().sum() == 0 and pred.grad[0, :2].abs().sum() > 0
    changed = pred.detach().clone()
    changed[0, 2] = torch.tensor([-3.0, 100.0, 0.5, 2.0])
    assert masked_patch_mse(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)
    # Raw pixels: (1 + 4 + 9 + 16) / 4 = 7.5 and 1, mean 4.25.
    assert masked_patch_mse(pred, target, mask, normalize=False).item() == pytest.approx(4.25)


# Four unit vectors at 0, 60, 90 and 180 degrees, classes 0, 0, 1, 1:
#   S01 = 0.5, S02 = 0, S03 = -1, S12 = cos 30 = c, S13 = -0.5, S23 = 0.
# Miner (epsilon 0.1): keep a positive if S < max negative + 0.1, a negative if S > min positive - 0.1.
#   anchor 0: positive 1 (0.5) vs max negative 0 -> dropped; negatives > 0.4: none.
#   anchor 1: positive 0 (0.5) vs max negative c -> kept; negatives > 0.4: 2 (c).
#   anchor 2: positive 3 (0) vs max negative c -> kept; negatives > -0.1: 0 (0) and 1 (c).
#   anchor 3: positive 2 (0) vs max negative -0.5 -> dropped; negatives > -0.1: none.
C30 = math.sqrt(3) / 2
LABELS = torch.tensor([0, 0, 1, 1])


def test_multi_similarity_miner_keeps_the_hand_picked_pairs():
    e = unit_vectors_deg(0, 60, 90, 180)
    keep_pos, keep_neg = multi_similarity_mine(e @ e.T, LABELS, epsilon=0.1)
    assert keep_pos.nonzero().tolist() == [[1, 0], [2, 3]]
    assert keep_neg.nonzero().tolist() == [[1, 2], [2, 0], [2, 1]]


def test_multi_similarity_miner_epsilon_window():
    # Labels [0, 0, 1]; anchor 2 has no positive, so it keeps nothing.
    labels = torch.tensor([0, 0, 1])
    for s01, kept in [(0.55, True), (0.65, False)]:
        sim = torch.tensor([[1.0, s01, 0.5], [s01, 1.0, 0.7], [0.5, 0.7, 1.0]])
        keep_pos, keep_neg = multi_similarity_mine(sim, labels, epsilon=0.1)
        # Anchor 0: positive kept iff s01 < 0.5 + 0.1; negative 2 kept iff 0.5 > s01 - 0.1.
        # Anchor 1: positive 0 (s01 < 0.7 + 0.1) and negative 2 (0.7 > s01 - 0.1) always kept.
        assert keep_pos.nonzero().tolist() == ([[0, 1], [1, 0]] if kept else [[1, 0]])
        assert keep_neg.nonzero().tolist() == ([[0, 2], [1, 2]] if kept else [[1, 2]])


def test_multi_similarity_loss_by_hand():
    e = unit_vectors_deg(0, 60, 90, 180)
    # alpha 1, beta 50, base 0: only anchors 1 and 2 contribute; the mean is over all 4 anchors.
    anchor1 = math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(50 * C30)) / 50
    anchor2 = math.log(1 + math.exp(0)) + math.log(1 + math.exp(0) + math.exp(50 * C30)) / 50
    assert multi_similarity_loss(e, LABELS).item() == pytest.approx((anchor1 + anchor2) / 4, rel=1e-9)
    # alpha 2, base 0.5: exponents -2 (S - 0.5) for positives, 50 (S - 0.5) for negatives.
    anchor1 = math.log(1 + math.exp(0)) / 2 + math.log(1 + math.exp(50 * (C30 - 0.5))) / 50
    anchor2 = math.log(1 + math.exp(1)) / 2 + math.log(1 + math.exp(-25) + math.exp(50 * (C30 - 0.5))) / 50
    got = multi_similarity_loss(e, LABELS, alpha=2.0, base=0.5).item()
    assert got == pytest.approx((anchor1 + anchor2) / 4, rel=1e-9)


def test_multi_similarity_ignores_negatives_that_are_near():
    e = unit_vectors_deg(0, 60, 90, 180)
    far = torch.ones(4, 4, dtype=torch.bool)
    far[1, 2] = far[2, 1] = False  # images 1 and 2 are of different places within the radius
    keep_pos, keep_neg = multi_similarity_mine(e @ e.T, LABELS, epsilon=0.1, far=far)
    # Without `far`: positives [[1, 0], [2, 3]], negatives [[1, 2], [2, 0], [2, 1]].  Anchor 1's
    # hardest negative is now 3 (-0.5), so its positive 0 (0.5) is no longer kept.
    assert keep_pos.nonzero().tolist() == [[2, 3]]
    assert keep_neg.nonzero().tolist() == [[2, 0]]
    expected = (math.log(2) + math.log(2) / 50) / 4  # anchor 2 only: S = 0 to its positive and negative
    assert multi_similarity_loss(e, LABELS, far=far).item() == pytest.approx(expected, rel=1e-9)
    everything_far = torch.ones(4, 4, dtype=torch.bool)
    assert multi_similarity_loss(e, LABELS, far=everything_far).item() == multi_similarity_loss(e, LABELS).item()


def test_hardest_pairs_by_global_similarity():
    e = unit_vectors_deg(0, 60, 90, 180)
    anchor, positive, negative = hardest_pairs(e, LABELS)
    assert anchor.tolist() == [0, 1, 2, 3]
    assert positive.tolist() == [1, 0, 3, 2]  # each class has one other member
    assert negative.tolist() == [2, 2, 1, 1]  # most similar other-class image: 0 > -1, c > -0.5, c > 0, -0.5 > -1
    # An anchor whose place has no other image in the batch has no positive and is skipped.
    anchor, positive, negative = hardest_pairs(unit_vectors_deg(0, 10, 50, 90), torch.tensor([0, 0, 0, 1]))
    assert anchor.tolist() == [0, 1, 2]
    assert positive.tolist() == [2, 2, 0]  # least similar positive: 0 -> 50 deg, 10 -> 50 deg, 50 -> 0 deg
    assert negative.tolist() == [3, 3, 3]


def test_far_apart_by_zone_and_distance():
    positions = torch.tensor([[10, 0.0, 0.0], [10, 20.0, 0.0], [10, 30.0, 0.0], [55, 0.0, 0.0],
                              [float("nan")] * 3], dtype=torch.float64)
    far = far_apart(positions, 25.0)
    assert far.tolist() == [
        [False, False, True, True, True],  # 20 m away is near, 30 m far; another zone is far
        [False, False, False, True, True],
        [True, False, False, True, True],
        [True, True, True, False, True],
        [True, True, True, True, True],  # no position: far from everything, itself included
    ]
    assert far_apart(positions, 0.0).all()


def test_hardest_pairs_skip_negatives_that_are_near():
    e = unit_vectors_deg(0, 60, 90, 180)  # LABELS [0, 0, 1, 1]
    far = torch.ones(4, 4, dtype=torch.bool)
    far[0, 2] = far[2, 0] = far[1, 2] = far[2, 1] = False  # image 2 is within the radius of 0 and 1
    anchor, positive, negative = hardest_pairs(e, LABELS, far)
    assert anchor.tolist() == [0, 1, 3]  # anchor 2 has no far negative left
    assert negative.tolist() == [3, 3, 1]  # without `far`: [2, 2, 1] (2 is the most similar)
    none_far = ~torch.eye(4, dtype=torch.bool) & False
    assert hardest_pairs(e, LABELS, none_far)[0].numel() == 0  # no negative left: no anchor


def test_pair_bce_by_hand():
    got = pair_bce_loss(torch.tensor([2.0]), torch.tensor([-1.0, 0.0])).item()
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert got == pytest.approx(expected, rel=1e-6)


def test_cosface_margin_on_the_target_class_only():
    head = CosFaceClassifier(2, 3, scale=30.0, margin=0.4)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))  # rows are normalised too
    descriptors = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # unit: (0.6, 0.8), (0, -1)
    # cosines [0.6, 0.8, -0.6] and [0, -1, 0]; s * (cos - m) on the labels 1 and 0.
    torch.testing.assert_close(head(descriptors, torch.tensor([1, 0])),
                               torch.tensor([[18.0, 12.0, -18.0], [-12.0, -30.0, 0.0]]))
    torch.testing.assert_close(head(descriptors), torch.tensor([[18.0, 24.0, -18.0], [0.0, -30.0, 0.0]]))
    mutual = CosFaceClassifier(2, 3, scale=60.0, margin=0.5)  # MutualVPR's setting
    with torch.no_grad():
        mutual.weight.copy_(head.weight)
    assert mutual(descriptors, torch.tensor([1, 0]))[0, 1].item() == pytest.approx(60 * (0.8 - 0.5))


def test_cosface_grow_keeps_existing_rows():
    head = CosFaceClassifier(8, 3)
    old = head.weight.detach().clone()
    head.grow(5)
    assert head.num_classes == 5 and head.weight.shape == (5, 8)
    assert torch.equal(head.weight[:3], old)  # class ids 0..2 keep their rows
    assert head.weight[3:].abs().sum() > 0 and head.weight.requires_grad
    assert head(torch.randn(2, 8), torch.tensor([4, 0])).shape == (2, 5)
    head.grow(5)
    assert head.weight.shape == (5, 8)
    with pytest.raises(ValueError, match="shrink"):
        head.grow(2)


# ---------------------------------------------------------------- schedules


def test_cosine_with_warmup_at_its_landmarks():
    base, final = 1e-3, 1e-6
    assert cosine_with_warmup(0, 100, 10, base, final) == 0.0
    assert cosine_with_warmup(5, 100, 10, base, final) == pytest.approx(5e-4)
    assert cosine_with_warmup(10, 100, 10, base, final) == pytest.approx(base)
    assert cosine_with_warmup(55, 100, 10, base, final) == pytest.approx((base + final) / 2)  # half-way down
    assert cosine_with_warmup(100, 100, 10, base, final) == pytest.approx(final)
    assert cosine_with_warmup(150, 100, 10, base, final) == pytest.approx(final)
    assert cosine_with_warmup(0, 100, 0, base, final) == pytest.approx(base)


def test_weight_decay_schedule_and_batch_scaling():
    assert weight_decay_schedule(0, 1000) == pytest.approx(0.04)
    assert weight_decay_schedule(500, 1000) == pytest.approx(0.22)
    assert weight_decay_schedule(1000, 1000) == pytest.approx(0.4)
    assert base_lr_for_batch(3e-4, 512) == pytest.approx(1.5e-4)


def test_layer_decay_scales_and_no_decay():
    torch.manual_seed(0)
    model = build_model(EncoderConfig(name="vit_tiny_test", image_size=112))  # depth 4
    for p in model.encoder.blocks[0].parameters():
        p.requires_grad_(False)  # frozen blocks are left out
    groups = layer_decay_groups(model, base_lr=1.0, layer_decay=0.5, weight_decay=0.05)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(where)
    scale = {n: where[id(p)]["lr_scale"] for n, p in trainable}
    decay = {n: where[id(p)]["weight_decay"] for n, p in trainable}
    assert scale["encoder.pos_embed"] == scale["encoder.cls_token"] == scale["encoder.patch_embed.proj.weight"]
    assert scale["encoder.cls_token"] == pytest.approx(0.5 ** 5)  # embeddings: decay ** (depth + 1)
    assert scale["encoder.blocks.1.attn.qkv.weight"] == pytest.approx(0.5 ** 3)  # block 1 of 4
    assert scale["encoder.blocks.3.mlp.fc1.bias"] == pytest.approx(0.5)  # last block
    assert scale["encoder.norm.weight"] == scale["head.weight"] == 1.0
    assert decay["encoder.blocks.2.attn.qkv.weight"] == decay["head.weight"] == 0.05
    for name in ("encoder.cls_token", "encoder.pos_embed", "encoder.blocks.2.attn.qkv.bias",
                 "encoder.blocks.2.norm1.weight", "encoder.norm.bias", "head.bias"):
        assert decay[name] == 0.0, name
    optimizer = torch.optim.AdamW(groups)
    set_optimizer_values(optimizer, lr=2e-3, weight_decay=0.3)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-3 * group["lr_scale"])
        assert group["weight_decay"] == (0.3 if group["wd_scale"] else 0.0)


# ---------------------------------------------------------------- it learns


def test_tiny_mim_overfits_one_batch():
    """A smooth image pair at 56 px (4 x 4 patches, 12 masked): the loss falls by more than half."""
    mim = tiny_mim(image_size=56)
    g = torch.Generator().manual_seed(0)
    x1 = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=56, mode="bilinear")
    x2 = x1.flip(-1)  # the same place seen mirrored
    mask, keep_idx = random_patch_mask(1, 16, 0.75, g)
    target = patchify(x1, PATCH)
    optimizer = torch.optim.Adam(mim.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = masked_patch_mse(mim(x1, x2, keep_idx), target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_positive_keys_use_view_classes_where_known():
    place = torch.tensor([10**12, 10**12, 10**12, 7 * 10**12, 7 * 10**12])
    view = torch.tensor([3, 3, 4, -1, -1])  # the last place has no view class in this version
    assert positive_keys(place, view, "place").tolist() == place.tolist()
    keys = positive_keys(place, view, "view_class")
    same = (keys[:, None] == keys[None, :]).int().tolist()
    # Images 0 and 1 share view 3; image 2 (same place, view 4) is no longer their positive;
    # the unlabelled images 3 and 4 fall back to their shared place.
    assert same == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="positives must be"):
        positive_keys(place, view, "views")


def test_gem_descriptor_overfits_one_batch():
    """From random weights the tiny ViT's class token barely depends on the image; GeM over the
    patch tokens does, which is why the tiny recipe pools with GeM.  MS loss on one batch of
    4 places x 4 images must fall by half within 40 steps with GeM."""
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=56, mode="bilinear")  # 4 places
    x = (base.repeat_interleave(4, dim=0) + 0.05 * torch.randn(16, 3, 56, 56, generator=g)).clamp(0, 1)
    labels = torch.arange(4).repeat_interleave(4)
    torch.manual_seed(0)
    model = build_model(EncoderConfig(name="vit_tiny_test", image_size=56, pooling="gem"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = multi_similarity_loss(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("pair_trains_encoder", [True, False])
def test_pair_bce_reaches_the_encoder_only_when_asked(pair_trains_encoder):
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_models import build_finetune_model

    torch.manual_seed(0)
    cfg = TrainConfig(stage="finetune", image_size=56, descriptor_dim=16, pair_trains_encoder=pair_trains_encoder)
    model = build_finetune_model(cfg, num_classes=4)
    out = model(images(4, 56), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    pair_bce_loss(out["pair_pos"], out["pair_neg"]).backward()
    encoder_grads = [p.grad for p in model.global_model.encoder.parameters() if p.grad is not None]
    assert bool(encoder_grads) == pair_trains_encoder
    assert all(p.grad is not None for p in model.pair.mlp.parameters())  # the classifier learns either way


@pytest.mark.parametrize("pooling", ["gem", "gem_grid"])  # gem_grid: CosFace rows of the whole descriptor
def test_a_batch_without_positives_still_reaches_every_parameter(pooling):
    """View-class positives can leave a P x K batch with no anchor that has a positive; the
    step must still run one graph over every parameter (ranks must agree) and add no pair loss."""
    from placeforge.trainer.data import GroupBatch
    from placeforge.trainer.engine import finetune_step
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_models import build_finetune_model

    torch.manual_seed(0)
    cfg = TrainConfig(stage="finetune", image_size=56, descriptor_dim=16, pooling=pooling)
    model = build_finetune_model(cfg, num_classes=8)
    assert model.cosface.weight.shape == (8, 16)
    pixels = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = GroupBatch(images=pixels, place_ids=torch.tensor([1, 1, 2, 2]),
                       image_ids=torch.arange(4), class_ids=torch.tensor([0, 1, 2, 3]))  # every view differs
    terms = finetune_step(model, batch, cfg, torch.device("cpu"))
    assert float(terms["pair_bce"]) == 0.0 and float(terms["ms"]) == 0.0
    terms["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not trainable
