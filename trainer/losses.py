"""Training losses: masked pixel MSE (stage 1), Multi-Similarity with its miner and pair BCE
(stage 2, Pair-VPR).  Pure functions of tensors.

Stage 2 of Pair-VPR, per batch of P places x 4 images:

    descriptors = model(images)                                        # [B, D], unit length
    anchor, positive, negative = hardest_pairs(descriptors, labels)
    loss = multi_similarity_loss(descriptors, labels) + 2.0 * pair_bce_loss(
        pair(patches[anchor], patches[positive], grid), pair(patches[anchor], patches[negative], grid))

With `anchors` (a slice of rows), the miners and the MS loss treat only those rows as anchors,
each against the whole batch: one rank's images in the global batch (trainer.mining).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_patch_mse(pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor,
                     normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over the masked patches only (MAE's loss).

    With `normalize` (MAE's `norm_pix_loss`), each target patch is first standardised by
    its own mean and unbiased variance: (t - mean) / sqrt(var + eps).

    Args:
        pred: [B, N, K] predicted pixel values per patch (K = p * p * 3).
        target_patches: [B, N, K] true values (models.decoder.patchify).
        mask: [B, N] bool, True where the patch was masked.
    Returns:
        scalar: the per-patch mean squared error averaged over masked patches.
    """
    target = target_patches
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, N]
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


def far_apart(positions: torch.Tensor, min_distance_m: float) -> torch.Tensor:
    """Which pairs of images are far enough apart to be shown to the pair classifier as negatives.

    The evaluation protocol counts a database image within 25 m of a query as a match, so
    an image of a neighbouring place 10 m down the same street is one of the candidates
    re-ranking must accept; trained as a negative, it teaches the pair classifier to reject
    them.  (The standard VPR training sets mine negatives the same way: NetVLAD's Pittsburgh
    and Tokyo, MSLS.)

    Args:
        positions: [B, 3] (UTM zone, east, north); NaN where an image has no position.
        min_distance_m: 0 makes every pair far.
    Returns:
        [B, B] bool: True where the two images are in different zones, either has no
        position, or they are more than min_distance_m apart.
    """
    if min_distance_m <= 0:
        return torch.ones(len(positions), len(positions), dtype=torch.bool, device=positions.device)
    zone, east_north = positions[:, 0], positions[:, 1:]
    near = (zone[:, None] == zone[None, :]) & (torch.cdist(east_north, east_north) <= min_distance_m)
    return ~near  # NaN compares unequal and unordered: an image without a position is far from all


def _pair_masks(labels: torch.Tensor, far: torch.Tensor | None = None, anchors: slice | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] labels -> (positive [A, B], negative [A, B]) bool for the anchor rows (None: all B);
    an image is neither its own positive nor negative.  With `far` ([B, B] bool, `far_apart`),
    only far pairs of other labels are negatives."""
    rows = slice(None) if anchors is None else anchors
    same = labels[rows, None] == labels[None, :]  # [A, B]
    index = torch.arange(len(labels), device=labels.device)
    positive = same & (index[rows, None] != index[None, :])
    return positive, ~same if far is None else ~same & far[rows]


def multi_similarity_mine(similarity: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1,
                          far: torch.Tensor | None = None, anchors: slice | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Multi-Similarity miner (as pytorch-metric-learning's, for cosine similarity).

    For each anchor, a positive is kept if its similarity < the anchor's hardest (largest)
    negative similarity + epsilon; a negative is kept if its similarity > the anchor's
    hardest (smallest) positive similarity - epsilon.  An anchor without negatives keeps
    no positives and vice versa.

    Args:
        similarity: [A, B] cosine similarities of the anchor rows to the whole batch.
        labels: [B] class ids.
        far: [B, B] bool (`far_apart`): the pairs of different labels that may be negatives;
            None: all of them.
        anchors: the rows of the batch that `similarity` holds (None: all, A = B).
    Returns:
        (kept positive pairs [A, B] bool, kept negative pairs [A, B] bool).
    """
    positive, negative = _pair_masks(labels, far, anchors)
    inf = torch.tensor(float("inf"), dtype=similarity.dtype, device=similarity.device)
    hardest_negative = torch.where(negative, similarity, -inf).amax(dim=1, keepdim=True)  # [A, 1]
    hardest_positive = torch.where(positive, similarity, inf).amin(dim=1, keepdim=True)  # [A, 1]
    keep_positive = positive & (similarity - epsilon < hardest_negative)
    keep_negative = negative & (similarity + epsilon > hardest_positive)
    return keep_positive, keep_negative


def _log_one_plus_sum_exp(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_j exp(values[i, j]) over kept j), stably.  [A, B] -> [A]; 0 where none kept."""
    zero = torch.zeros(values.shape[0], 1, dtype=values.dtype, device=values.device)  # the "1 +"
    masked = values.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(torch.cat([zero, masked], dim=1), dim=1)


def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
                          beta: float = 50.0, base: float = 0.0, epsilon: float = 0.1,
                          far: torch.Tensor | None = None, anchors: slice | None = None) -> torch.Tensor:
    """Multi-Similarity loss on the pairs its miner keeps (Pair-VPR: 1, 50, 0, 0.1).

    Per anchor i, over kept positives P_i and negatives N_i:
        1/alpha * log(1 + sum_P exp(-alpha (S_ip - base))) + 1/beta * log(1 + sum_N exp(beta (S_in - base)))
    averaged over all B anchors (an anchor with nothing kept adds 0), as pytorch-metric-learning.

    Args:
        embeddings: [B, D], L2-normalised (the dot product is the cosine).
        labels: [B] place ids.
        far: as `multi_similarity_mine`: with it, an image of another place nearer than the
            evaluation radius is neither pulled nor pushed.
        anchors: average over these rows' terms only, each still mined against all B
            (trainer.mining: a rank's own images in the global batch); None: all B.
    Returns:
        scalar loss.
    """
    rows = embeddings if anchors is None else embeddings[anchors]  # [A, D]
    similarity = rows @ embeddings.T  # [A, B]
    keep_positive, keep_negative = multi_similarity_mine(similarity.detach(), labels, epsilon, far, anchors)
    positive_term = _log_one_plus_sum_exp(-alpha * (similarity - base), keep_positive) / alpha  # [A]
    negative_term = _log_one_plus_sum_exp(beta * (similarity - base), keep_negative) / beta  # [A]
    return (positive_term + negative_term).mean()


def positive_keys(place_ids: torch.Tensor, class_ids: torch.Tensor, mode: str) -> torch.Tensor:
    """Which images of a P x K batch count as positives of each other, as one id per image.

    "place": the same place.  "view_class": the same view class where an image has one
    (class id >= 0), else the same place, so two images of one street corner looking in
    opposite directions are not pulled together.  Class ids are small (< 2**40) and
    place ids are 63-bit hashes, so the two never collide in practice.

    Args:
        place_ids, class_ids: [B] int64.
    Returns:
        [B] int64.
    """
    if mode == "place":
        return place_ids
    if mode != "view_class":
        raise ValueError(f"positives must be 'place' or 'view_class', got {mode!r}")
    return torch.where(class_ids >= 0, class_ids, place_ids)


def hardest_pairs(embeddings: torch.Tensor, labels: torch.Tensor, far: torch.Tensor | None = None,
                  anchors: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each anchor with a positive and a negative in the batch: its least similar
    positive and its most similar negative by global-descriptor similarity.

    Args:
        embeddings: [B, D] L2-normalised descriptors.
        labels: [B] place ids.
        far: [B, B] bool (`far_apart`): the pairs that may be negatives; None = every other label.
        anchors: the rows that may be anchors, mined against all B (trainer.mining); None: all.
    Returns:
        (anchor_idx, positive_idx, negative_idx), each [A] int64 indices into the B rows, A <= B.
    """
    with torch.no_grad():
        rows = embeddings if anchors is None else embeddings[anchors]  # [R, D]
        similarity = rows @ embeddings.T  # [R, B]
        positive, negative = _pair_masks(labels, far, anchors)
        inf = torch.tensor(float("inf"), dtype=similarity.dtype, device=similarity.device)
        positive_idx = torch.where(positive, similarity, inf).argmin(dim=1)  # [R]
        negative_idx = torch.where(negative, similarity, -inf).argmax(dim=1)  # [R]
        row_idx = torch.nonzero(positive.any(dim=1) & negative.any(dim=1)).squeeze(1)  # [A]
    first = 0 if anchors is None else anchors.start
    return row_idx + first, positive_idx[row_idx], negative_idx[row_idx]


def first_per_label(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the first `k` entries of each label, in their original order.

    Args:
        labels: [A] int labels (e.g. the place ids of the pair classifier's anchors).
        k: entries kept per label, >= 1.
    Returns:
        [A'] int64 positions into `labels`, ascending; A' = sum over labels of min(k, count).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sorted_labels, order = torch.sort(labels, stable=True)  # equal labels keep their order
    position = torch.arange(len(labels), device=labels.device)
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    group_start = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    rank = position - group_start  # [A] 0 for the first entry of a label, 1 for the second, ...
    return torch.sort(order[rank < k]).values


def pair_bce_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor, mean_over: float | None = None
                  ) -> torch.Tensor:
    """Binary cross-entropy over same-place logits: targets 1 for logits_pos [A], 0 for
    logits_neg [A'], averaged over all A + A' pairs.  Pair-VPR weighs it 2.0 against MS
    (the caller applies the weight).

    mean_over: divide the summed BCE by this count instead of A + A' (global mining: the mean
    number of pair logits per rank, trainer.mining)."""
    logits = torch.cat([logits_pos, logits_neg])
    targets = torch.cat([torch.ones_like(logits_pos), torch.zeros_like(logits_neg)])
    if mean_over is None:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / mean_over
