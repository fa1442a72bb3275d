"""Build place-aware WebDataset shards from VPR datasets, as a Ray Data job.

    python pipelines/build_shards.py --source atname:/data/sf_xl/train --source gsv_cities:/data/gsv --out /data/shards
    python pipelines/build_shards.py --source atname:/nfs/sf_xl/processed /nfs/sf_xl/files.parquet --out /data/shards
    ray job submit --working-dir . -- python pipelines/build_shards.py --source ... --out /shared/shards

Steps: ingest every source into one catalog (metadata only, on the driver), assign
places, plan which image goes to which sample and shard (pure, seeded), then one Ray
task per shard reads, re-encodes and packs its images.  Every input ends up in the
shards or in rejects.parquet with a reason; the counts are checked and printed.

A source given with a file list (a text file of paths, one per line, '#' comments, or a
.parquet file with a `path` column; paths relative to ROOT) is not walked or stat'ed:
the list stands for the folder (placeforge/ingest/filelist.py).  A listed path that is
absolute or has a '..' is rejected as path_outside_root and never opened; a listed file
that is not there is rejected when its shard task reads it.

--plan-only stops before any image is read: it ingests, assigns places and plans, writes
catalog.parquet, rejects.parquet, _work/plan.parquet and plan.json (not manifest.json: the
folder is a plan, not a shard set), prints the counts and starts no Ray.  The same command
without --plan-only then builds the shards from that plan.

Re-running into the same --out resumes an interrupted build (finished shards are kept),
does nothing for a complete one, and refuses if the config or the inputs changed
(unless --overwrite).  With a Ray cluster, --out and the sources must be on storage
every node can read and write (NFS, a shared disk).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from placeforge.config import add_config_arguments, check_output_folder, config_from_args
from placeforge.logs import setup_logging
from placeforge.pipelines.shell import add_ray_arguments, run_guarded, script_parser
from placeforge.shards.build import BuildConfig


def build_parser() -> argparse.ArgumentParser:
    from placeforge.ingest import READERS

    parser = script_parser("build_shards.py", __doc__)
    parser.add_argument(
        "--source",
        action="append",
        nargs="+",
        required=True,
        metavar=("FORMAT:ROOT", "LIST"),
        help=f"a dataset to ingest (repeatable): FORMAT:ROOT walks the folder ROOT; FORMAT:ROOT LIST "
        f"reads the images one file LIST names instead (text, one path per line, '#' comments; or .parquet with "
        f"a 'path' column; paths relative to ROOT). FORMAT is one of {', '.join(sorted(READERS))}",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; nothing is written outside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a shard set built with another config")
    parser.add_argument("--plan-only", action="store_true",
                        help="ingest, place and plan, write the catalog, rejects and plan, and stop: no image is "
                        "opened, no Ray is started")
    add_ray_arguments(parser, "--task-resources",
                      "custom Ray resources each shard task asks for, e.g. placeforge_cpu_node=0.01 "
                      "to keep decoding on CPU nodes (cluster.yaml)")
    add_config_arguments(parser, BuildConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from placeforge.config import ConfigError
    from placeforge.ingest import SourceError, parse_source_args
    from placeforge.raysession import parse_resources
    from placeforge.shards.build import BuildError, build

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()

    def run() -> str:
        cfg = config_from_args(BuildConfig, args)
        check_output_folder(args.out)  # before the sources are listed, which can take minutes
        sources = [parse_source_args(words) for words in args.source]
        return build(
            sources, args.out, cfg, overwrite=args.overwrite, ray_address=args.ray_address, num_cpus=args.num_cpus,
            task_resources=parse_resources(args.task_resources), plan_only=args.plan_only,
        ).report()

    return run_guarded("build_shards", run, (ConfigError, SourceError, BuildError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
