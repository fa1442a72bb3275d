"""Evaluation speed on this machine, and what the dense-feature store costs per database image.

    python benchmarks/bench_eval.py                       # tiny preset, synthetic test split
    python benchmarks/bench_eval.py --test-set DIR --encoder vit_base_patch14_dinov2 --image-size 322 \\
        --decoder dec768d12b                              # the same on a GPU machine

Prints one table:
  * embedding (Ray Data actor pool, database + queries, images/s),
  * global retrieval: queries/s for exact faiss search alone, and for embed + search,
  * re-ranking: pairs/s with tokens read from the memory-mapped float16 store, and with the
    same tokens already in RAM (the store's cost is the ratio of the two),
  * store size per database image, on disk and in RAM during re-ranking, for the model
    benchmarked and, by arithmetic, for ViT-B/14 and ViT-L/14 at 322 px.
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from placeforge.evaluation.dense_store import StoreKey, bytes_per_image

REPO = Path(__file__).resolve().parents[1]


def store_bytes(tokens: int, width: int, descriptor_dim: int = 512) -> int:
    """Disk per database image, as the feature store lays it out (evaluation.dense_store)."""
    key = StoreKey(checkpoint_sha256="", images_sha256="", image_size=0, descriptor_dim=descriptor_dim,
                   tokens_shape=(tokens, width))
    return bytes_per_image(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--test-set", type=Path, default=None,
                        help="folder with database/ and queries/ (default: render the default synthetic city)")
    parser.add_argument("--encoder", default="vit_tiny_test")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--decoder", default="dec64d2b")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    """The benchmark proper; everything it writes lives under `work` (deleted afterwards)."""
    from placeforge.evaluation.job import EvalConfig, evaluate
    from placeforge.evaluation.rerank import pair_scores
    from placeforge.evaluation.testset import read_split
    from placeforge.models.checkpoint import load_pair_classifier, save_model_checkpoint
    from placeforge.models.decoder import SiameseMIMDecoder, decoder_config
    from placeforge.models.encoders import EncoderConfig, build_model, encoder_spec
    from placeforge.models.heads import PairClassifier

    test_set = args.test_set
    if test_set is None:
        from synthcity import generate
        from synthcity.synth_config import SynthConfig

        generate(work / "city", SynthConfig(), progress=False)
        test_set = work / "city" / "atname" / "test"
    spec = encoder_spec(args.encoder)
    torch.manual_seed(0)
    cfg = EncoderConfig(name=args.encoder, image_size=args.image_size)
    pair = PairClassifier(SiameseMIMDecoder(decoder_config(args.decoder), spec.embed_dim, spec.patch_size))
    checkpoint = save_model_checkpoint(build_model(cfg), cfg, work / "model.pt", pair=pair, decoder=args.decoder)

    database = read_split(str(test_set / "database"))
    queries = read_split(str(test_set / "queries"), "queries")
    out = work / "eval"
    summary = evaluate(checkpoint, database, queries, out, EvalConfig(rerank_top_k=args.top_k),
                       num_cpus=args.num_cpus)
    t = summary.report["timings_s"]
    k = summary.report["rerank"]["top_k"]
    q, m = len(queries), len(database)

    # Re-ranking with the tokens in RAM instead of the memory map: the same pairs, same batching.
    side = args.image_size // spec.patch_size
    grid = (side, side)
    q_tokens = np.load(out / "features" / "queries" / "tokens.npy", mmap_mode="r")
    db_tokens = np.load(out / "features" / "database" / "tokens.npy", mmap_mode="r")
    import pyarrow.parquet as pq

    candidates = np.stack(pq.read_table(out / "predictions.parquet").column("global_candidates").to_numpy(
        zero_copy_only=False))[:, :k]
    pair = load_pair_classifier(checkpoint)
    tick = time.perf_counter()
    pair_scores(pair, np.array(q_tokens), np.array(db_tokens), candidates, grid, progress=False)
    in_ram = time.perf_counter() - tick

    rows = [
        ("embed database + queries", f"{(m + q) / (t['embed_database'] + t['embed_queries']):.0f} images/s"),
        ("global: exact search only", f"{q / t['search']:.0f} queries/s"),
        ("global: embed queries + search", f"{q / (t['embed_queries'] + t['search']):.1f} queries/s"),
        (f"re-rank top {k}, tokens from the memmap store", f"{q * k / t['rerank']:.0f} pairs/s"),
        (f"re-rank top {k}, tokens in RAM", f"{q * k / in_ram:.0f} pairs/s"),
        ("store cost (RAM / memmap time)", f"{in_ram / t['rerank']:.2f}x"),
        (f"store per db image, {args.encoder} {args.image_size}px",
         f"{store_bytes(side * side, spec.embed_dim) / 1024:.1f} KiB disk"),
        ("store per db image, ViT-B/14 322px", f"{store_bytes(23 * 23, 768) / 2**20:.2f} MiB disk"),
        ("store per db image, ViT-L/14 322px", f"{store_bytes(23 * 23, 1024) / 2**20:.2f} MiB disk"),
        ("RAM while re-ranking (pairs_per_batch 256, ViT-B)",
         f"{2 * 256 * 23 * 23 * 768 * 4 / 2**20:.0f} MiB of float32 token batches"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"bench_eval on {platform.node()} ({platform.processor() or platform.machine()}), {date.today()}, "
          f"torch threads {torch.get_num_threads()}; {m} database images, {q} queries, "
          f"{args.encoder} at {args.image_size}px, decoder {args.decoder}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(json.dumps({"timings_s": t, "rerank_in_ram_s": round(in_ram, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
