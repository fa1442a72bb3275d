"""Stage-2 mining over the global batch: every rank's micro-batch treated as rows of one batch.

Pair-VPR trained stage 2 under DataParallel, so the Multi-Similarity miner and the pair
classifier's hardest positive / negative saw the whole batch (8 GPUs x 12 places = one batch
of 96 places).  Under DeepSpeed each of R ranks holds 1/R of it; with `mining_scope: global`
the ranks exchange what mining needs:

    group = mining_group("global", rank, world_size)     # None: mine within the micro-batch
    all_descriptors = gather_rows(descriptors, group)    # [R*B, D], gradient back to each owner
    rows = group.rows(B)                                 # this rank's anchors in the global batch
    tokens, index, total = fetch_rows(patches, partner_idx, group)  # tokens[index]: partners on any rank

The global batch is rank-major: rank r's micro-batch is rows r*B .. r*B+B-1.  Every rank
must hold the same B (DeepSpeed's micro-batch is fixed and the loader yields only full batches).

Why the gradients equal a 1-process run on the concatenated batch: DeepSpeed averages
parameter gradients over ranks, so rank r's loss must be L_r with mean_r L_r = L_global and
every term's gradient delivered to the rank that owns its input.  The MS loss of the global
batch is a mean of per-anchor terms, each a function of one anchor's row of similarities
to the whole batch; rank r computes the terms of its own B anchors against the gathered
descriptors and averages them (over B = B_global / R), so mean_r L_r = L_global.
`gather_rows` is differentiable: the gradient that rank r's terms send into another rank's
descriptors is summed back to that rank in backward (torch.distributed.nn.functional.all_gather),
so each descriptor receives the gradient of every term that reads it, as in one process.
The pair BCE is a mean over all 2 A_global pairs; rank r sums its own pairs' BCE and divides
by 2 A_global / R, the mean count per rank (ranks may mine different numbers of anchors),
which again averages to the global mean.  (Each rank computing the whole batch's loss, with
only its own rows carrying a gradient, would be exact too once scaled by R, but would run the
pair classifier on all R*B anchors on every rank.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

MINING_SCOPES = ("rank", "global")


@dataclass(frozen=True)
class MiningGroup:
    """The ranks whose micro-batches form one global batch (the default process group)."""

    rank: int
    world_size: int

    def rows(self, local_size: int) -> slice:
        """This rank's rows in the rank-major global batch of world_size x local_size."""
        return slice(self.rank * local_size, (self.rank + 1) * local_size)


def mining_group(scope: str, rank: int, world_size: int) -> MiningGroup | None:
    """The group to mine over: None (within the micro-batch) for scope "rank" or one process,
    where "global" is the same batch; global mining then takes the same path as rank."""
    if scope not in MINING_SCOPES:
        raise ValueError(f"mining_scope must be one of {', '.join(MINING_SCOPES)}, got {scope!r}")
    if scope == "rank" or world_size == 1:
        return None
    return MiningGroup(rank, world_size)


def gather_rows(local: torch.Tensor, group: MiningGroup) -> torch.Tensor:
    """[B, ...] on each rank -> [R*B, ...], rank-major, on every rank.

    With a gradient, backward sums what every rank's loss sends to rank r's rows and hands
    it to rank r (a reduce-scatter; on gloo, torch emulates it with scatters).  Every rank
    must take the same branch, so `local.requires_grad` must agree across ranks (it does:
    the same model and the same grad mode everywhere).
    """
    if group.world_size == 1:
        return local
    if torch.is_grad_enabled() and local.requires_grad:
        return torch.cat(dist_fn.all_gather(local.contiguous()))
    parts = [torch.empty_like(local) for _ in range(group.world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def fetch_rows(local: torch.Tensor, wanted: torch.Tensor, group: MiningGroup
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of the global batch that this rank wants, wherever they live; only rows some
    rank wants from another rank travel.

    Each rank wants at most 2 B rows (a hardest positive and negative per anchor).  One
    all-gather of the wanted indices (ints, padded with -1) tells every rank what every other
    wants, so all ranks agree without a second round: rank s sends its M_s distinct rows that
    others want, padded to M = max_s M_s (the collective needs one size), and receives R x M.
    With whole places on each rank (the P x K loader), hardest positives are always local and
    only hardest negatives travel.

    Memory, ViT-B at 322 px: 23 x 23 = 529 patch tokens x 768 = 406 k values per image,
    0.78 MiB in bf16 (1.55 MiB fp32).  Gathering every rank's tokens of a 400-image global
    batch would hold 400 x 0.78 = 310 MiB per rank (as much again for its gradient when
    pair_trains_encoder); here the received buffer is R x M x 0.78 MiB with M <= B, e.g.
    8 ranks x 50 images: at most 310 MiB, and 8 x 20 x 0.78 = 125 MiB when no rank supplies
    more than 20 of its 50 images; the table adds one copy of this rank's own 50 (39 MiB).
    Detached tokens (pair_trains_encoder false) travel without a gradient, so backward sends
    nothing.

    Args:
        local: [B, ...] this rank's rows (patch tokens [B, T, C]).
        wanted: [K] int64, K <= 2 B, indices into the global batch.
    Returns:
        (table [B + R*M, ...]: this rank's rows, then the received ones; index [K] of each wanted
        row in the table, so row i of the global batch is table[i - r*B] on its owner r;
        the number of rows all ranks wanted together).
    """
    size = len(local)
    rows = group.rows(size)
    if group.world_size == 1:
        return local, wanted, len(wanted)
    padded = torch.full((2 * size,), -1, dtype=torch.long, device=wanted.device)
    padded[:len(wanted)] = wanted
    every = gather_rows(padded, group).view(group.world_size, 2 * size)  # [R, 2B]: what each rank wants
    total = int((every >= 0).sum())
    owner = torch.where(every >= 0, every.div(size, rounding_mode="floor"), -1)  # [R, 2B]
    requester = torch.arange(group.world_size, device=every.device)[:, None].expand_as(every)
    remote = (owner >= 0) & (owner != requester)
    supplies = [torch.unique(every[remote & (owner == s)]) for s in range(group.world_size)]  # sorted global ids
    most = max(len(s) for s in supplies)
    is_remote = (wanted < rows.start) | (wanted >= rows.stop)
    if most == 0:  # every rank's partners are its own (the same decision on every rank)
        return local, wanted - rows.start, total
    mine = supplies[group.rank] - rows.start
    send = local[torch.cat([mine, mine.new_zeros(most - len(mine))])]  # [M, ...], padded with row 0
    received = gather_rows(send, group)  # [R*M, ...]
    slot = torch.zeros_like(wanted)
    for s in range(group.world_size):
        from_s = is_remote & (wanted.div(size, rounding_mode="floor") == s)
        slot[from_s] = s * most + torch.searchsorted(supplies[s], wanted[from_s])
    return torch.cat([local, received]), torch.where(is_remote, size + slot, wanted - rows.start), total
