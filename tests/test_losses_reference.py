"""The stage-2 losses against a second implementation: pytorch-metric-learning (PML), the
library Pair-VPR's official code trains with.

Each check runs on several random P x K batches (8 places x 4 images, 32-d, place centres
plus noise so the miners have hard and easy pairs to choose between, rows shuffled).  Values
and gradients are compared in float64 at 1e-12, those of the MS loss also in float32 at 1e-6.

PML's CosineSimilarity L2-normalises its input again, so on unit-length embeddings its
gradient is ours with the radial part (along each embedding) removed; through an
`F.normalize`, as the model's descriptors come out, the two gradients are the same.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from placeforge.models.heads import CosFaceClassifier
from placeforge.trainer.losses import hardest_pairs, multi_similarity_loss, multi_similarity_mine

PLACES, IMAGES_PER_PLACE, DIM = 8, 4, 32
SEEDS = [0, 1, 2, 3, 4]
DTYPES = [torch.float64, torch.float32]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}  # absolute, on values of order 1
MS = {"alpha": 1.0, "beta": 50.0, "base": 0.0}  # Pair-VPR's settings
EPSILON = 0.1


def place_batch(seed: int, dtype: torch.dtype = torch.float64, places: int = PLACES,
                images_per_place: int = IMAGES_PER_PLACE) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw features [B, D], labels [B]): place centre + noise of the same scale, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(places).repeat_interleave(images_per_place)
    centres = torch.randn(places, DIM, generator=g, dtype=dtype)
    raw = centres[labels] + torch.randn(len(labels), DIM, generator=g, dtype=dtype)
    order = torch.randperm(len(labels), generator=g)
    return raw[order], labels[order]


def pml_multi_similarity(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pair-VPR's training loss as its code calls PML: the MS miner's pairs into the MS loss."""
    pairs = miners.MultiSimilarityMiner(epsilon=EPSILON)(embeddings, labels)
    return losses.MultiSimilarityLoss(**MS)(embeddings, labels, pairs)


def pair_mask(size: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


# ---------------------------------------------------------------- Multi-Similarity loss and miner


@pytest.mark.parametrize("seed", SEEDS)
def test_ms_miner_keeps_the_same_pairs(seed: int) -> None:
    raw, labels = place_batch(seed)
    embeddings = F.normalize(raw, dim=1)
    keep_positive, keep_negative = multi_similarity_mine(embeddings @ embeddings.T, labels, EPSILON)
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=EPSILON)(embeddings, labels)

    assert torch.equal(keep_positive, pair_mask(len(labels), a1, p))
    assert torch.equal(keep_negative, pair_mask(len(labels), a2, n))
    # The batch exercises the miner: it drops some positive and some negative pairs.
    same = labels[:, None] == labels[None, :]
    assert 0 < keep_positive.sum() < same.sum() - len(labels)
    assert 0 < keep_negative.sum() < (~same).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_ms_loss_value_and_gradient_match_pml(seed: int, dtype: torch.dtype) -> None:
    raw, labels = place_batch(seed, dtype)
    raw_ours = raw.clone().requires_grad_(True)
    raw_pml = raw.clone().requires_grad_(True)
    ours = multi_similarity_loss(F.normalize(raw_ours, dim=1), labels, **MS, epsilon=EPSILON)
    reference = pml_multi_similarity(F.normalize(raw_pml, dim=1), labels)
    ours.backward()
    reference.backward()

    tol = TOLERANCE[dtype]
    assert ours.item() > 0.1
    assert ours.item() == pytest.approx(reference.item(), abs=tol)
    torch.testing.assert_close(raw_ours.grad, raw_pml.grad, rtol=0, atol=tol)
    assert raw_ours.grad.abs().max() > 1e-3  # not two zero gradients


@pytest.mark.parametrize("seed", SEEDS)
def test_ms_gradient_on_unit_embeddings_differs_only_along_the_embeddings(seed: int) -> None:
    """Differentiated at the unit embeddings themselves, PML's gradient is ours projected
    onto each embedding's tangent plane (PML normalises again); ours keeps a radial part."""
    raw, labels = place_batch(seed)
    unit = F.normalize(raw, dim=1)
    ours_at, pml_at = unit.clone().requires_grad_(True), unit.clone().requires_grad_(True)
    multi_similarity_loss(ours_at, labels, **MS, epsilon=EPSILON).backward()
    pml_multi_similarity(pml_at, labels).backward()

    radial = (ours_at.grad * unit).sum(dim=1, keepdim=True) * unit  # [B, D]
    torch.testing.assert_close(ours_at.grad - radial, pml_at.grad, rtol=0, atol=1e-12)
    assert radial.abs().max() > 1e-3


def test_ms_loss_where_pml_returns_zero_for_one_pair_of_each_kind() -> None:
    """The one difference found: when the miner keeps at most one positive and one negative
    pair in the whole batch, PML's GenericPairLoss returns 0 (`all(len(x) <= 1)`), while
    ours is the MS formula on those pairs, i.e. PML's own per-anchor terms averaged."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    g = torch.Generator().manual_seed(27)  # a batch where the miner keeps exactly 1 + 1 pairs
    centres = 2.0 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    embeddings = F.normalize(centres[labels] + torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=EPSILON)(embeddings, labels)
    assert (len(a1), len(a2)) == (1, 1)

    pml = losses.MultiSimilarityLoss(**MS)
    per_anchor = pml._compute_loss(embeddings @ embeddings.T, pair_mask(6, a1, p).double(),
                                   pair_mask(6, a2, n).double())["loss"]["losses"]  # [B, 1]
    ours = multi_similarity_loss(embeddings, labels, **MS, epsilon=EPSILON)
    assert ours.item() == pytest.approx(per_anchor.mean().item(), abs=1e-12)
    assert ours.item() > 0.1
    assert pml(embeddings, labels, (a1, p, a2, n)).item() == 0.0


# ---------------------------------------------------------------- hardest pairs


@pytest.mark.parametrize("seed", SEEDS)
def test_hardest_pairs_match_batch_hard_miner(seed: int) -> None:
    raw, labels = place_batch(seed)
    # Keep one image of place 0: it has negatives but no positive, so it is no anchor.
    keep = (labels != 0) | (torch.arange(len(labels)) == int(torch.nonzero(labels == 0)[0]))
    raw, labels = raw[keep], labels[keep]
    singleton = int(torch.nonzero(labels == 0)[0])
    embeddings = F.normalize(raw, dim=1)
    anchor, positive, negative = hardest_pairs(embeddings, labels)
    pml_anchor, pml_positive, pml_negative = miners.BatchHardMiner()(embeddings, labels)

    assert len(anchor) == len(labels) - 1 and singleton not in anchor.tolist()
    assert torch.equal(anchor, pml_anchor)
    assert torch.equal(positive, pml_positive)
    assert torch.equal(negative, pml_negative)


# ---------------------------------------------------------------- CosFace


@pytest.mark.parametrize("scale, margin", [(30.0, 0.4), (60.0, 0.5)])  # CosPlace, MutualVPR
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_cosface_matches_formula_and_pml(seed: int, scale: float, margin: float) -> None:
    classes = 10
    torch.manual_seed(seed)
    head = CosFaceClassifier(DIM, classes, scale=scale, margin=margin).double()
    # PML keeps the class weights as columns, W [D, C]: ours transposed.
    pml = losses.CosFaceLoss(classes, DIM, margin=margin, scale=scale).double()
    with torch.no_grad():
        pml.W.copy_(head.weight.T)
    g = torch.Generator().manual_seed(100 + seed)
    descriptors = torch.randn(PLACES * IMAGES_PER_PLACE, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (len(descriptors),), generator=g)
    ours_in, pml_in = descriptors.clone().requires_grad_(True), descriptors.clone().requires_grad_(True)

    logits = head(ours_in, labels)  # [B, C]
    cosine = F.normalize(descriptors, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    written_out = scale * (cosine - margin * F.one_hot(labels, classes).double())
    torch.testing.assert_close(logits.detach(), written_out, rtol=0, atol=1e-12)

    ours = F.cross_entropy(logits, labels)
    reference = pml(pml_in, labels)
    ours.backward()
    reference.backward()
    assert ours.item() > 1.0
    assert ours.item() == pytest.approx(reference.item(), abs=1e-12)
    torch.testing.assert_close(ours_in.grad, pml_in.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, pml.W.grad.T, rtol=0, atol=1e-12)
    assert head.weight.grad.abs().max() > 1e-3
