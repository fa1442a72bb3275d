"""Stage-2 heads: Pair-VPR's pair classifier (re-ranking) and a CosFace classifier (MutualVPR).

    pair = PairClassifier(decoder)                         # decoder loaded with stage-1 weights
    logits = pair(patches_a, patches_b, grid)              # [B], same-place logits
    scores = pair.score(patches_q, patches_db, grid)       # [B], logit(q, db) + logit(db, q)

    cosface = CosFaceClassifier(512, num_classes, scale=30.0, margin=0.4)
    loss = F.cross_entropy(cosface(descriptors, labels), labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from placeforge.models.decoder import HEAD_ACTIVATIONS, SiameseMIMDecoder, sincos_2d_positions
from placeforge.models.recompute import run_blocks


class PairClassifier(nn.Module):
    """Same-place logit of an image pair from the stage-1 decoder's blocks.

    A new learnable class token goes before image A's projected patch tokens; the decoder
    blocks run self-attention over [class, A] and cross-attention to B; an MLP on the class
    token gives the logit.  The decoder's `embed`, `blocks` and `norm` are shared, not
    copied, so weights loaded into the decoder before this is built carry over; its mask
    token and pixel head are not part of this module (they would receive no gradient).

    With `aligned` (not in Pair-VPR; placeforge's option), the logit also gets a learned
    affine function of the *aligned token similarity*: the mean over grid positions of the
    cosine between A's and B's encoder tokens at the same position (B's grid resampled to
    A's when the two differ).  The MLP's last layer then starts at zero, so before any
    training the classifier ranks pairs by that similarity alone.  Why: on the synthetic
    city a small decoder trained with the pair BCE did not learn to compare positions
    (validation AUC 0.50 among the global top 20), while the encoder's own tokens, compared
    position by position, re-rank well (docs/benchmarks.md, issue 10, round 3).

    `global_weight` (not in Pair-VPR, whose re-ranking score is the two logits alone; 0 is
    that) is how much of the global descriptors' cosine the re-ranking score adds
    (evaluation.rerank.pair_scores): a recipe's choice, made on its validation split, that the
    model file carries so evaluation re-ranks as the recipe was validated.  Not learned: the
    classifier trains on each anchor's hardest pairs, chosen by that very cosine.

    Args:
        decoder: a SiameseMIMDecoder, typically holding stage-1 weights.
        hidden_dim: MLP hidden width (512 in Pair-VPR: width -> 512 -> 1).
        aligned: add the aligned token similarity term (scale and offset learned).
        global_weight: weight of the global cosine in the re-ranking score (0: Pair-VPR's score).
    """

    def __init__(self, decoder: SiameseMIMDecoder, hidden_dim: int = 512, aligned: bool = False,
                 global_weight: float = 0.0) -> None:
        super().__init__()
        self.global_weight = float(global_weight)
        self.width = decoder.width
        self.embed = decoder.embed
        self.blocks = decoder.blocks
        self.norm = decoder.norm
        self.class_token = nn.Parameter(torch.zeros(1, 1, decoder.width))
        self.activation_checkpointing = False  # recompute the blocks in backward (models.recompute)
        activation = HEAD_ACTIVATIONS[decoder.head_activation]()  # the decoder preset's: GELU, or ReLU as Pair-VPR
        self.mlp = nn.Sequential(nn.Linear(decoder.width, hidden_dim), activation, nn.Linear(hidden_dim, 1))
        nn.init.normal_(self.class_token, std=0.02)
        self.aligned = aligned
        if aligned:
            # logit = MLP(class token) + scale * (similarity - offset): a similarity of 1 is
            # a near-certain match, 0.5 an even one, before training moves either.
            self.aligned_scale = nn.Parameter(torch.tensor([10.0]))  # [1]: DeepSpeed cannot broadcast 0-d
            self.aligned_offset = nn.Parameter(torch.tensor([0.5]))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, patches_a: torch.Tensor, patches_b: torch.Tensor, grid_a: tuple[int, int],
                grid_b: tuple[int, int] | None = None) -> torch.Tensor:
        """Logit that A and B show the same place (A attends to B; not symmetric).

        Args:
            patches_a: [B, N, C] encoder patch tokens of image A (class and register tokens removed).
            patches_b: [B, M, C] encoder patch tokens of image B.
            grid_a: (gh, gw) of A, N = gh * gw; grid_b likewise, default grid_a.
        Returns:
            [B] logits.
        """
        grid_b = grid_a if grid_b is None else grid_b
        for name, tokens, grid in (("A", patches_a, grid_a), ("B", patches_b, grid_b)):
            if tokens.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"image {name} has {tokens.shape[1]} tokens, its grid {grid} has "
                                 f"{grid[0] * grid[1]} (pass patch tokens only: no class token, no registers)")
        x = self.embed(patches_a) + sincos_2d_positions(grid_a, self.width, patches_a.device)  # [B, N, D]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + N, D]
        y = self.embed(patches_b) + sincos_2d_positions(grid_b, self.width, patches_b.device)  # [B, M, D]
        x = run_blocks(self.blocks, x, y, recompute=self.activation_checkpointing)  # [B, 1 + N, D]
        logits = self.mlp(self.norm(x[:, 0])).squeeze(-1)  # [B]
        if self.aligned:
            similarity = aligned_similarity(patches_a, patches_b, grid_a, grid_b)  # [B]
            logits = logits + self.aligned_scale * (similarity - self.aligned_offset)
        return logits

    def score(self, patches_a: torch.Tensor, patches_b: torch.Tensor, grid_a: tuple[int, int],
              grid_b: tuple[int, int] | None = None) -> torch.Tensor:
        """Symmetric re-ranking score logit(a, b) + logit(b, a).  -> [B]."""
        grid_b = grid_a if grid_b is None else grid_b
        return self(patches_a, patches_b, grid_a, grid_b) + self(patches_b, patches_a, grid_b, grid_a)


def aligned_similarity(patches_a: torch.Tensor, patches_b: torch.Tensor, grid_a: tuple[int, int],
                       grid_b: tuple[int, int]) -> torch.Tensor:
    """Mean over A's grid positions of cos(A's token, B's token at the same place in the image).

    Args:
        patches_a: [B, N, C] on grid_a (gh, gw); patches_b: [B, M, C] on grid_b, bilinearly
            resampled to grid_a when the grids differ.
    Returns:
        [B] in [-1, 1].
    """
    a = F.normalize(patches_a.float(), dim=-1)
    b = patches_b.float()
    if tuple(grid_b) != tuple(grid_a):
        b = b.transpose(1, 2).reshape(b.shape[0], b.shape[2], *grid_b)  # [B, C, gh', gw']
        b = F.interpolate(b, size=tuple(grid_a), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    return (a * F.normalize(b, dim=-1)).sum(dim=-1).mean(dim=-1)


class CosFaceClassifier(nn.Module):
    """Large Margin Cosine Loss head (CosFace): logits s * (cos(x, w_c) - m * [c == label]).

    CosPlace uses s = 30, m = 0.4 (the defaults); MutualVPR uses s = 60, m = 0.5.  Class
    ids index the rows of `weight` and are stable across reclustering: `grow` only ever
    appends rows, never permutes or drops them.

    Args:
        in_features: descriptor dimension D.
        num_classes: initial number of classes C.
        scale: s, multiplies every cosine.
        margin: m, subtracted from the target class's cosine during training.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.4) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_features = in_features
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, descriptors: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """descriptors [B, D] (normalised here), labels [B] class ids -> logits [B, C].

        Without labels, the plain scaled cosines (no margin), e.g. for accuracy.
        """
        cosine = F.normalize(descriptors, dim=-1) @ F.normalize(self.weight, dim=-1).T  # [B, C]
        if labels is not None:
            cosine = cosine - self.margin * F.one_hot(labels, self.num_classes).to(cosine.dtype)
        return self.scale * cosine

    @torch.no_grad()
    def grow(self, num_classes: int) -> None:
        """Add rows for new class ids up to `num_classes`, keeping every existing row.

        This replaces the `weight` Parameter: rebuild the optimizer (or its parameter
        group) afterwards, or it keeps updating the old tensor.
        """
        old = self.weight
        if num_classes < old.shape[0]:
            raise ValueError(f"cannot shrink from {old.shape[0]} to {num_classes} classes: class ids are stable")
        if num_classes == old.shape[0]:
            return
        new_rows = torch.empty(num_classes - old.shape[0], self.in_features, dtype=old.dtype, device=old.device)
        nn.init.xavier_uniform_(new_rows)
        self.weight = nn.Parameter(torch.cat([old.detach(), new_rows], dim=0), requires_grad=old.requires_grad)


class CosFaceGroups(nn.Module):
    """One CosFace classifier per CosPlace group (CosPlace, MutualVPR); only the active group's
    classifier scores a batch, so the others get no gradient.

    Row r of group g's classifier is view class `class_ids[g][r]`.  Class ids are global and stable
    (clustering.matching) and every class belongs to one cell, so to one group; the rows of a group
    are its class ids in ascending order, and `regroup` carries rows over by class id when the
    label version changes.

    Args:
        in_features: descriptor dimension D.
        class_ids: per group, its class ids [R_g] (sorted, unique); a group without classes gets one
            row that is never a target.
        scale, margin: CosFace s and m of every classifier.
    """

    def __init__(self, in_features: int, class_ids: list, scale: float = 30.0, margin: float = 0.4) -> None:
        super().__init__()
        self.in_features, self.scale, self.margin = in_features, scale, margin
        self.classifiers = nn.ModuleList()
        for group, ids in enumerate(class_ids):
            ids = torch.as_tensor(ids, dtype=torch.int64)
            self.classifiers.append(CosFaceClassifier(in_features, max(1, len(ids)), scale, margin))
            self.register_buffer(f"class_ids_{group}", ids, persistent=False)  # derived from the labels, not saved
        self.active = 0  # the group whose classifier scores batches (trainer.engine.activate_cosface_group)

    def class_ids_of(self, group: int) -> torch.Tensor:
        """[R_g] the class id of each row of group `group`'s classifier."""
        return getattr(self, f"class_ids_{group}")

    def rows(self, class_ids: torch.Tensor) -> torch.Tensor:
        """[B] global class ids -> [B] rows of the active group's classifier, -1 for a class of another
        group (or -1, no class)."""
        table = self.class_ids_of(self.active)
        if table.numel() == 0:
            return torch.full_like(class_ids, -1)
        at = torch.searchsorted(table, class_ids).clamp(max=len(table) - 1)
        return torch.where(table[at] == class_ids, at, torch.full_like(at, -1))

    def forward(self, descriptors: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """descriptors [B, D], class ids [B] -> (margin logits [B', R] of the B' images of the active
        group, their rows [B'] as targets)."""
        rows = self.rows(class_ids)
        mine = rows >= 0
        targets = rows[mine]
        return self.classifiers[self.active](descriptors[mine], targets), targets

    @torch.no_grad()
    def regroup(self, class_ids: list) -> list[torch.Tensor]:
        """New class ids per group (a new label version): rows of class ids kept carry their weights,
        new ones start as CosFaceClassifier's, ids gone lose their rows.  Replaces every weight
        Parameter: rebuild the optimizer afterwards.

        Returns:
            per group, [R'_g] the old row of each new row, -1 for a new class.
        """
        if len(class_ids) != len(self.classifiers):
            raise ValueError(f"{len(class_ids)} groups of class ids for {len(self.classifiers)} classifiers")
        sources = []
        for group, ids in enumerate(class_ids):
            old_ids, head = self.class_ids_of(group), self.classifiers[group]
            ids = torch.as_tensor(ids, dtype=torch.int64, device=old_ids.device)
            if old_ids.numel():
                at = torch.searchsorted(old_ids, ids).clamp(max=len(old_ids) - 1)
                source = torch.where(old_ids[at] == ids, at, torch.full_like(at, -1))
            else:
                source = torch.full_like(ids, -1)
            fresh = CosFaceClassifier(self.in_features, max(1, len(ids)), self.scale, self.margin)
            weight = fresh.weight.to(head.weight.device, head.weight.dtype)
            kept = source >= 0
            weight[: len(ids)][kept] = head.weight[source[kept]]
            head.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
            setattr(self, f"class_ids_{group}", ids)
            sources.append(source if len(ids) else torch.full((1,), -1, dtype=torch.int64))
        return sources
