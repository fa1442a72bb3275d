"""Multi-Similarity loss + miner, forward and backward: placeforge's against pytorch-metric-learning's.

    .venv/bin/python benchmarks/bench_losses.py [--places 16,64,100] [--dim 512] [--repeats 20] [--threads 1]

Each batch is P places x 4 images of random D-d features (place centre of std 0.5 + noise of
std 1), L2-normalised inside the timed step as the model's head does.  At this spread the
miner keeps most positive pairs and 5-10 % of the negative ones (hard and easy pairs
mixed); with centres of std 1 it keeps none, both losses are 0 and there is nothing to time.

One step: normalise, mine, loss, backward, with Pair-VPR's settings (alpha 1, beta 50,
base 0, epsilon 0.1).  Time is the median over `--repeats` steps after two warm-up steps,
on `--threads` CPU threads (default 1: on a shared 2-core machine two threads stall
whenever another process holds a core, and the medians swing by up to 30x); the two
implementations alternate step by step, so load hits both alike.  The table also gives the
pairs the miner kept and the loss (first timed step), and the largest difference between
the two losses over all steps (a check that both computed the same thing;
tests/test_losses_reference.py checks values and gradients properly).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from placeforge.trainer.losses import multi_similarity_loss, multi_similarity_mine

IMAGES_PER_PLACE = 4
ALPHA, BETA, BASE, EPSILON = 1.0, 50.0, 0.0, 0.1
CENTRE_STD = 0.5  # against noise of std 1: see the module docstring


def features(places: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw features [P * 4, D] float32, labels [P * 4])."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(places).repeat_interleave(IMAGES_PER_PLACE)
    centres = CENTRE_STD * torch.randn(places, dim, generator=g)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def own_step(raw: torch.Tensor, labels: torch.Tensor) -> float:
    raw = raw.detach().requires_grad_(True)
    loss = multi_similarity_loss(F.normalize(raw, dim=1), labels, ALPHA, BETA, BASE, EPSILON)
    loss.backward()
    return loss.item()


def library_step(raw: torch.Tensor, labels: torch.Tensor, miner: miners.BaseMiner,
                 loss_fn: losses.BaseMetricLossFunction) -> float:
    raw = raw.detach().requires_grad_(True)
    embeddings = F.normalize(raw, dim=1)
    loss = loss_fn(embeddings, labels, miner(embeddings, labels))
    loss.backward()
    return loss.item()


def timed(step, *args) -> tuple[float, float]:
    """(milliseconds, loss) of one step."""
    started = time.perf_counter()
    value = step(*args)
    return (time.perf_counter() - started) * 1e3, value


def compare(places: int, dim: int, repeats: int) -> str:
    miner = miners.MultiSimilarityMiner(epsilon=EPSILON)
    loss_fn = losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=BASE)
    own_ms, library_ms, largest_difference = [], [], 0.0
    raw, labels = features(places, dim, seed=2)
    embeddings = F.normalize(raw, dim=1)
    keep_positive, keep_negative = multi_similarity_mine(embeddings @ embeddings.T, labels, EPSILON)
    same = labels[:, None] == labels[None, :]
    kept = (f"{int(keep_positive.sum()):,} / {int(same.sum()) - len(labels):,}, "
            f"{int(keep_negative.sum()):,} / {int((~same).sum()):,}")
    for i in range(repeats + 2):
        raw, labels = features(places, dim, seed=i)
        own_t, own_loss = timed(own_step, raw, labels)
        library_t, library_loss = timed(library_step, raw, labels, miner, loss_fn)
        largest_difference = max(largest_difference, abs(own_loss - library_loss))
        if i == 2:
            loss = own_loss
        if i >= 2:  # the first two are warm-up
            own_ms.append(own_t)
            library_ms.append(library_t)
    own, library = statistics.median(own_ms), statistics.median(library_ms)
    batch = places * IMAGES_PER_PLACE
    return (f"| {batch} ({places} x {IMAGES_PER_PLACE}) | {kept} | {loss:.3f} | {own:.2f} | {library:.2f} "
            f"| {library / own:.2f}x | {largest_difference:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--places", default="16,64,100", help="places per batch (4 images each), comma-separated")
    parser.add_argument("--dim", type=int, default=512, help="descriptor dimension D")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import pytorch_metric_learning

    print(f"bench_losses on {platform.node()} ({platform.processor() or platform.machine()}), {date.today()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"pytorch-metric-learning {pytorch_metric_learning.__version__}, D = {args.dim}, "
          f"median of {args.repeats} steps\n")
    print("| batch (P x K) | kept pairs: positive, negative | loss | placeforge ms | library ms "
          "| library / placeforge | max abs loss difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for places in (int(p) for p in args.places.split(",") if p):
        print(compare(places, args.dim, args.repeats), flush=True)


if __name__ == "__main__":
    main()
