"""Losses and heads by hand: MIM patch MSE, multi-similarity, hardest pairs, pair BCE, CosFace.

Pure and fast: tiny inputs on CPU.  Expected loss values are worked out by hand in each
test from inputs chosen so the arithmetic is short, never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from placeforge.models.heads import CosFaceClassifier
from placeforge.trainer.losses import (
    far_apart,
    hardest_pairs,
    masked_patch_mse,
    multi_similarity_loss,
    multi_similarity_mine,
    pair_bce_loss,
    positive_keys,
)


def unit_vectors_deg(*angles_deg: float) -> torch.Tensor:
    """[len, 2] float64 unit vectors at the given angles, so cosines are cos(angle differences)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


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
