"""Write the next version of the view-class labels of a shard set, as a Ray Data job.

    python pipelines/recluster.py --shards DIR --labels LABELS_DIR                      # v0: initial split
    python pipelines/recluster.py --shards DIR --labels LABELS_DIR --checkpoint M.pt   # a K-means round
    ray job submit --working-dir . -- python pipelines/recluster.py --shards /shared/DIR ...

Without --checkpoint: version 0 from DIR/catalog.parquet alone.  Images are grouped into
UTM cells of --cell-size-m (a landmark without coordinates is its own cell), and each cell
is split into --k view classes by compass heading (K-means on the unit circle) or, where
a heading is unknown, at random.  This is written once: if LABELS_DIR already has
versions the run refuses, unless --force, which writes a fresh initial split as the next
version (matched to the latest, so class ids stay stable where the split agrees).

With --checkpoint (a file written by models.checkpoint): every image in the shards is
embedded by the model (one copy per Ray actor, on a GPU when the cluster has them), and
the images of each cell are split into --k classes by K-means on their descriptors, cells
spread over --partitions processes.  The new classes are matched to the latest version
(Hungarian assignment on shared images), so a class id keeps meaning the same view; the
version records the checkpoint's path and sha256.  --keep-descriptors also stores the
descriptors (float16 Parquet) under LABELS_DIR/descriptors/<checkpoint>-<sha>/ and
reuses them when the same checkpoint is clustered again.

Checks: every image of the shard set gets exactly one label (compared with
index.parquet), descriptors are finite (a diverged model fails the run), the checkpoint
fits its architecture, the previous version is intact.  A failed run writes nothing;
versions are never overwritten.  Plots of --plots-cells sampled cells (classes as rows of
thumbnails, and a PCA of the descriptors) are written into LABELS_DIR/vNNNN/plots/.

On a Ray cluster, DIR, LABELS_DIR and the checkpoint must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from placeforge.clustering.job import ReclusterConfig
from placeforge.config import add_config_arguments, check_output_folder, config_from_args
from placeforge.logs import setup_logging
from placeforge.pipelines.shell import add_ray_arguments, run_guarded, script_parser


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser("recluster.py", __doc__)
    parser.add_argument("--shards", required=True, type=Path, help="a complete shard set (pipelines/build_shards.py)")
    parser.add_argument("--labels", required=True, type=Path, help="label-set folder: versions vNNNN/ are added here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint to embed with (else: v0)")
    parser.add_argument("--keep-descriptors", action="store_true", help="store the descriptors for reuse")
    parser.add_argument("--force", action="store_true", help="without --checkpoint: write a fresh initial split "
                        "as the next version even though versions exist")
    add_ray_arguments(parser, "--actor-resources",
                      "custom Ray resources each encoder actor asks for, e.g. placeforge_gpu_node=0.01")
    add_config_arguments(parser, ReclusterConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from placeforge.clustering.job import ReclusterError, recluster
    from placeforge.config import ConfigError
    from placeforge.models.checkpoint import CheckpointError
    from placeforge.raysession import parse_resources

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()

    def run() -> str:
        cfg = config_from_args(ReclusterConfig, args)
        check_output_folder(args.labels, "--labels")
        return recluster(
            args.shards, args.labels, cfg, checkpoint=args.checkpoint, keep_descriptors=args.keep_descriptors,
            force=args.force, ray_address=args.ray_address, num_cpus=args.num_cpus,
            actor_resources=parse_resources(args.actor_resources),
        ).report()

    return run_guarded("recluster", run, (ConfigError, CheckpointError, ReclusterError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
