"""Write the next version of the view-class labels of a shard set, as a Ray Data job.

    python pipelines/recluster.py --shards DIR --labels LABELS_DIR                      # v0: initial split
    python pipelines/recluster.py --shards DIR --labels LABELS_DIR --checkpoint M.pt   # a K-means round
    python pipelines/recluster.py --shards DIR --labels LABELS_DIR --k 6 \
        --untrained-model configs/mutualvpr_vitb.yaml                                 # v0: K-means, untrained model
    ray job submit --working-dir . -- python pipelines/recluster.py --shards /shared/DIR ...

Without --checkpoint: version 0 from DIR/catalog.parquet alone.  Images are grouped into
UTM cells of --cell-size-m (a landmark without coordinates is its own cell), and each cell
is split into --k view classes by compass heading (K-means on the unit circle) or, where
a heading is unknown, at random (--initial heading, the default); --initial random splits
every cell at random, headings ignored, as MutualVPR's official code starts.  This is
written once: if LABELS_DIR already has versions the run refuses, unless --force, which
writes a fresh initial split as the next version (matched to the latest, so class ids
stay stable where the split agrees).

With --untrained-model RECIPE (a stage-2 training config, e.g. configs/mutualvpr_vitb.yaml):
version 0 is a K-means round, as below, with the model that recipe's training starts from,
before any step: the encoder from its encoder.weights (or init_from), new adapters and
global head drawn from its seed as trainer/train.py draws them.  That model is saved as
LABELS_DIR/untrained/model-<sha256[:12]>.pt, its resolved recipe beside it (.json), and
the version records it as its checkpoint.  Like the initial split, this is refused once
LABELS_DIR has versions, unless --force.

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
import dataclasses
import logging
import os
import sys
from pathlib import Path

from placeforge.clustering.job import ReclusterConfig
from placeforge.config import add_config_arguments, check_output_folder, config_from_args
from placeforge.logs import setup_logging
from placeforge.pipelines.shell import add_ray_arguments, run_guarded, script_parser

UNTRAINED_SUBDIR = "untrained"  # LABELS_DIR/untrained/: the models --untrained-model clustered with
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser("recluster.py", __doc__)
    parser.add_argument("--shards", required=True, type=Path, help="a complete shard set (pipelines/build_shards.py)")
    parser.add_argument("--labels", required=True, type=Path, help="label-set folder: versions vNNNN/ are added here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint to embed with (else: v0)")
    parser.add_argument("--untrained-model", type=Path, default=None, metavar="RECIPE",
                        help="v0 by K-means with the model a stage-2 training config starts from (saved under "
                             "LABELS_DIR/untrained/)")
    parser.add_argument("--keep-descriptors", action="store_true", help="store the descriptors for reuse")
    parser.add_argument("--force", action="store_true", help="without --checkpoint: write a fresh initial split "
                        "(or --untrained-model round) as the next version even though versions exist")
    add_ray_arguments(parser, "--actor-resources",
                      "custom Ray resources each encoder actor asks for, e.g. placeforge_gpu_node=0.01")
    add_config_arguments(parser, ReclusterConfig)
    return parser


def write_untrained_model(recipe_file: Path, folder: Path) -> Path:
    """Save the global-descriptor model a stage-2 run of `recipe_file` starts from into `folder`
    as model-<sha256[:12]>.pt (a models.checkpoint file; the name never points at other
    weights), the resolved recipe beside it as .json; return the model's path.

    The weights are those trainer/train.py starts from: torch seeded with the recipe's seed,
    then `build_finetune_model` (the encoder from encoder.weights or init_from; adapters,
    GeM and head new), whose global model is drawn before any CosFace row.
    """
    import torch

    from placeforge.config import ConfigError, from_mapping, load_file, save_config
    from placeforge.fileio import file_sha256
    from placeforge.models.checkpoint import save_model_checkpoint
    from placeforge.trainer.train_config import TrainConfig
    from placeforge.trainer.train_models import build_finetune_model, global_model_of

    recipe = from_mapping(TrainConfig, load_file(recipe_file), where=str(recipe_file))
    if recipe.stage != "finetune":
        raise ConfigError(f"--untrained-model {recipe_file}: stage {recipe.stage}; give a stage-2 (finetune) "
                          "config, the stage whose view classes these labels are")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # as trainer/train.py before it builds the model
        model = global_model_of(build_finetune_model(recipe, num_classes=1), recipe)
    encoder_cfg = dataclasses.replace(recipe.encoder, weights=None)  # the weights are in the file
    written = save_model_checkpoint(model, encoder_cfg, folder / f".model-{os.getpid()}.pt")
    try:
        path = folder / f"model-{file_sha256(written)[:12]}.pt"
        os.replace(written, path)
    except BaseException:
        written.unlink(missing_ok=True)
        raise
    save_config(recipe, path.with_suffix(".json"))
    log.info("untrained model of %s (seed %d) -> %s", recipe_file, recipe.seed, path)
    return path


def main(argv: list[str] | None = None) -> int:
    from placeforge.clustering.job import ReclusterError, recluster
    from placeforge.clustering.labels import latest_version
    from placeforge.config import ConfigError
    from placeforge.raysession import parse_resources

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()

    def run() -> str:
        cfg = config_from_args(ReclusterConfig, args)
        check_output_folder(args.labels, "--labels")
        checkpoint = args.checkpoint
        if args.untrained_model is not None:
            if checkpoint is not None:
                raise ConfigError("give --checkpoint or --untrained-model, not both")
            latest = latest_version(args.labels)
            if latest is not None and not args.force:
                raise ReclusterError(f"{args.labels} already holds label versions (latest v{latest:04d}); the "
                                     "initial split is only written once. Pass --force to write one with the "
                                     "untrained model as the next version")
            checkpoint = write_untrained_model(args.untrained_model, args.labels / UNTRAINED_SUBDIR)
        return recluster(
            args.shards, args.labels, cfg, checkpoint=checkpoint, keep_descriptors=args.keep_descriptors,
            force=args.force, ray_address=args.ray_address, num_cpus=args.num_cpus,
            actor_resources=parse_resources(args.actor_resources),
        ).report()

    # models.checkpoint.CheckpointError is a ValueError, caught as one: version 0 does not load that module (timm)
    return run_guarded("recluster", run, (ConfigError, ReclusterError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
