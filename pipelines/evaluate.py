"""Recall@N of a checkpoint on a test set, before and after pair-classifier re-ranking.

    python pipelines/evaluate.py --checkpoint run/export/model_epoch0003.pt --test-set /data/pitts30k/test --out eval/
    python pipelines/evaluate.py --checkpoint M.pt --benchmark nordland:/data/datasets/nordland --out eval/
    python pipelines/evaluate.py --checkpoint M.pt --database msls:/data/msls --database-subset '*/database' \\
        --queries msls:/data/msls --queries-subset '*/query' --out eval/
    ray job submit --working-dir . -- python pipelines/evaluate.py --checkpoint /shared/M.pt ...

--test-set DIR is the standard layout: DIR/database/ and DIR/queries/ with "@"-named images.
--benchmark NAME:ROOT reads a standard test set in the layout its tool writes (ROOT is e.g.
the downloader's datasets/nordland; the names are in docs/evaluation.md and in the error for
an unknown one).  --database / --queries take FORMAT:PATH for any catalog reader (atname,
gsv_cities, msls, gldv2), with --*-subset globs over the catalog's subset.  "@"-named images
are placed by the UTM east/north in the name, as the reference evaluator does, or in a plane
of their own for mock coordinates (Nordland, AmsterTime, SPED: `@0@<metres>@` and no zone).

Global descriptors come from a Ray Data actor pool (GPUs when the cluster has them); the
database's patch tokens go to a float16 memory-mapped store under OUT/features/, so a
database larger than RAM works and a killed run resumes where it stopped.  Each query's
top --rerank-top-k candidates (exact faiss search) are re-ranked by the checkpoint's pair
classifier, scored in both directions; a checkpoint without one (a stage-1 export) gives
global recall only, and says so.  A database image within --radius-m (25 m) of the query
is right; a query with none counts as a miss at every N.  With --no-labels the images may
have any names: predictions are written, recall is not.  --resize crop|squash|short_side
overrides the checkpoint's preprocessing (short_side: aspect kept, no crop, as
gmberton/VPR-methods-evaluation; docs/evaluation.md); report.json records which was used.

Writes OUT/report.json (recall before/after, counts, timings, config), OUT/predictions.parquet
(per query: candidates, scores, right or not), OUT/rejects.parquet, and OUT/report.html with
OUT/recall.png, a page to open in a browser.  Nothing is written outside OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.job import EvalConfig
from pipelines.shell import add_ray_arguments, run_guarded, script_parser
from placeforge.config import add_config_arguments, check_output_folder, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser("evaluate.py", __doc__, split_epilog=True)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a model file from trainer export/")
    parser.add_argument("--test-set", type=Path, help="folder with database/ and queries/ (@-named images)")
    parser.add_argument("--benchmark", metavar="NAME:ROOT", help="a standard test set in its tool's layout, "
                        "e.g. svox-night:/data/datasets/svox (instead of --test-set)")
    parser.add_argument("--database", metavar="FORMAT:PATH", help="database images (instead of --test-set)")
    parser.add_argument("--queries", metavar="FORMAT:PATH", help="query images (instead of --test-set)")
    parser.add_argument("--database-subset", metavar="GLOB", help="keep catalog rows whose subset matches")
    parser.add_argument("--queries-subset", metavar="GLOB", help="keep catalog rows whose subset matches")
    parser.add_argument("--no-labels", action="store_true", help="images without positions: predictions only")
    parser.add_argument("--out", required=True, type=Path, help="output folder (nothing is written outside it)")
    parser.add_argument("--title", help="title of the report (default: checkpoint and test-set names)")
    add_ray_arguments(parser, "--actor-resources",
                      "custom Ray resources each encoder actor asks for, e.g. placeforge_gpu_node=0.01")
    add_config_arguments(parser, EvalConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from evaluation.benchmarks import read_benchmark
    from evaluation.job import EvaluationError, evaluate
    from evaluation.testset import read_split
    from models.checkpoint import CheckpointError
    from placeforge.config import ConfigError
    from placeforge.ingest import SourceError
    from placeforge.raysession import parse_resources

    parser = build_parser()
    args = parser.parse_args(argv)
    given = [flag for flag, value in (("--test-set", args.test_set), ("--benchmark", args.benchmark),
                                      ("--database/--queries", args.database or args.queries)) if value]
    if len(given) > 1:
        parser.error(f"give one of --test-set, --benchmark, or --database and --queries; got {' and '.join(given)}")
    if not given or (given == ["--database/--queries"] and not (args.database and args.queries)):
        parser.error("give --test-set DIR, --benchmark NAME:ROOT, or both --database and --queries")
    if args.benchmark and (args.database_subset or args.queries_subset):
        parser.error("--database-subset / --queries-subset go with --database / --queries, not --benchmark")
    if args.test_set is not None:
        args.database, args.queries = f"atname:{args.test_set / 'database'}", f"atname:{args.test_set / 'queries'}"

    def run() -> str:
        cfg = config_from_args(EvalConfig, args)
        check_output_folder(args.out)
        if args.benchmark:
            db_split, q_split = read_benchmark(args.benchmark, args.no_labels)
        else:
            db_split = read_split(args.database, "database", args.database_subset, args.no_labels)
            q_split = read_split(args.queries, "queries", args.queries_subset, args.no_labels)
        for split in (db_split, q_split):
            if split.rejected:
                print(f"{split.name}: {split.rejected} file(s) set aside by the reader (listed in rejects.parquet)")
        summary = evaluate(args.checkpoint, db_split, q_split, args.out, cfg, ray_address=args.ray_address,
                           num_cpus=args.num_cpus, title=args.title or _benchmark_title(args),
                           actor_resources=parse_resources(args.actor_resources))
        return summary.text()

    return run_guarded("evaluate", run, (ConfigError, SourceError, CheckpointError, EvaluationError,
                                         FileNotFoundError, ValueError))


def _benchmark_title(args: argparse.Namespace) -> str | None:
    """"model.pt on nordland" for --benchmark; None (the default title) otherwise."""
    return f"{args.checkpoint.name} on {args.benchmark.partition(':')[0]}" if args.benchmark else None


if __name__ == "__main__":
    sys.exit(main())
