"""Recall@N of a checkpoint on a test set, before and after pair-classifier re-ranking.

    python pipelines/evaluate.py --checkpoint run/export/model_epoch0003.pt --test-set /data/pitts30k/test --out eval/
    python pipelines/evaluate.py --checkpoint M.pt --benchmark nordland:/data/datasets/nordland --out eval/
    python pipelines/evaluate.py --checkpoint M.pt --database msls:/data/msls --database-subset '*/database' \\
        --queries msls:/data/msls --queries-subset '*/query' --out eval/
    python pipelines/evaluate.py --checkpoint M.pt --benchmark msls-val-740:/data/msls \\
        --ground-truth-dir gsv-cities/datasets/msls_val --out eval/
    python pipelines/evaluate.py --checkpoint M.pt --database atname:/data/db --database-list db.txt \\
        --queries atname:/data/q --queries-list q.txt --ground-truth gt.txt --out eval/
    ray job submit --working-dir . -- python pipelines/evaluate.py --checkpoint /shared/M.pt ...

--test-set DIR is the standard layout: DIR/database/ and DIR/queries/ with "@"-named images.
--benchmark NAME:ROOT reads a standard test set in the layout its tool writes (ROOT is e.g.
the downloader's datasets/nordland; the names are in docs/evaluation.md and in the error for
an unknown one).  msls-val-740 is MSLS-val's standard 740-query subset: ROOT holds train_val/
(the Mapillary SLS download) and the four msls_val_*.npy files GSV-Cities ships in
datasets/msls_val/ are read from --ground-truth-dir DIR (default ROOT/msls_val/); only the
listed queries and database images are evaluated, the positives are the files'.
--database / --queries take FORMAT:PATH for any catalog reader (atname, gsv_cities, msls,
gldv2), with --*-subset globs over the catalog's subset.

--database-list / --queries-list FILE keep only the images a list names (relative to the
side's PATH, or DIR/database, DIR/queries): a .npy array of strings, or text with one path per
line ('#' lines and blank lines skipped).  --ground-truth FILE (with both lists) gives the right
answers instead of a radius: row i (0-based, the i-th query of --queries-list) lists the right
rows of --database-list, as a .npy of integer lists (GSV-Cities' pIdx form; pickled object
arrays are read without running the pickle) or as text, one line per query with row numbers
separated by spaces or commas (an empty line: no positive; '#' lines skipped).  With
--ground-truth no position is read: any image names, and FORMAT is not used.  A listed image
that is missing or unreadable is set aside with a reason (rejects.parquet); a query left with no
positive is a miss at every N.  "@"-named images
are placed by the UTM east/north in the name, as the reference evaluator does, or in a plane
of their own for mock coordinates (Nordland, AmsterTime, SPED: `@0@<metres>@` and no zone).

Global descriptors come from a Ray Data actor pool (GPUs when the cluster has them); the
database's patch tokens go to a float16 memory-mapped store under OUT/features/, so a
database larger than RAM works and a killed run resumes where it stopped.  Each query's
top --rerank-top-k candidates (exact faiss search) are re-ranked by the checkpoint's pair
classifier, scored in both directions; a checkpoint without one (a stage-1 export) gives
global recall only, and says so.  A database image within --radius-m (25 m) of the query
is right (unless the positives come from a file, above); a query with none counts as a miss
at every N.  With --no-labels the images may
have any names: predictions are written, recall is not.  --resize crop|squash|short_side
overrides the checkpoint's preprocessing (short_side: aspect kept, no crop, as
gmberton/VPR-methods-evaluation; docs/evaluation.md); report.json records which was used.

Writes OUT/report.json (recall before/after, counts, timings, config), OUT/predictions.parquet
(per query: candidates, scores, right or not), OUT/rejects.parquet, and OUT/report.html with
OUT/recall.png, a page to open in a browser.  Nothing is written outside OUT.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from placeforge.config import add_config_arguments, check_output_folder, config_from_args
from placeforge.evaluation.job import EvalConfig
from placeforge.logs import setup_logging
from placeforge.pipelines.shell import add_ray_arguments, run_guarded, script_parser

log = logging.getLogger("placeforge.pipelines.evaluate")  # not __name__: run as a script, that is "__main__"


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
    parser.add_argument("--ground-truth-dir", type=Path, metavar="DIR", help="with --benchmark msls-val-740: the "
                        "folder of the four msls_val_*.npy files (default ROOT/msls_val/)")
    parser.add_argument("--database-list", type=Path, metavar="FILE", help="keep the database images this list "
                        "names (.npy of strings or text, one path per line, relative to the database PATH)")
    parser.add_argument("--queries-list", type=Path, metavar="FILE", help="keep the queries this list names "
                        "(as --database-list, relative to the queries PATH)")
    parser.add_argument("--ground-truth", type=Path, metavar="FILE", help="per --queries-list row, the right "
                        "--database-list rows (.npy of int lists, or text: one line per query); replaces --radius-m")
    parser.add_argument("--no-labels", action="store_true", help="images without positions: predictions only")
    parser.add_argument("--out", required=True, type=Path, help="output folder (nothing is written outside it)")
    parser.add_argument("--title", help="title of the report (default: checkpoint and test-set names)")
    add_ray_arguments(parser, "--actor-resources",
                      "custom Ray resources each encoder actor asks for, e.g. placeforge_gpu_node=0.01")
    add_config_arguments(parser, EvalConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from placeforge.config import ConfigError
    from placeforge.evaluation.benchmarks import read_benchmark
    from placeforge.evaluation.ground_truth import (
        ListedSide,
        read_listed_test_set,
        read_path_list,
        read_positives,
        restrict_split,
    )
    from placeforge.evaluation.job import EvaluationError, evaluate
    from placeforge.evaluation.testset import read_split
    from placeforge.ingest import SourceError
    from placeforge.models.checkpoint import CheckpointError
    from placeforge.raysession import parse_resources

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    given = [flag for flag, value in (("--test-set", args.test_set), ("--benchmark", args.benchmark),
                                      ("--database/--queries", args.database or args.queries)) if value]
    if len(given) > 1:
        parser.error(f"give one of --test-set, --benchmark, or --database and --queries; got {' and '.join(given)}")
    if not given or (given == ["--database/--queries"] and not (args.database and args.queries)):
        parser.error("give --test-set DIR, --benchmark NAME:ROOT, or both --database and --queries")
    if args.benchmark and (args.database_subset or args.queries_subset):
        parser.error("--database-subset / --queries-subset go with --database / --queries, not --benchmark")
    lists = args.database_list or args.queries_list or args.ground_truth
    if args.benchmark and lists:
        parser.error("--database-list / --queries-list / --ground-truth go with --test-set or --database / --queries; "
                     "a benchmark names its own images")
    if args.ground_truth_dir and not args.benchmark:
        parser.error("--ground-truth-dir goes with --benchmark msls-val-740:ROOT")
    if args.ground_truth and not (args.database_list and args.queries_list):
        parser.error("--ground-truth needs --database-list and --queries-list: its rows are the queries list's, "
                     "its numbers rows of the database list")
    if args.ground_truth and (args.no_labels or args.database_subset or args.queries_subset):
        parser.error("--ground-truth goes without --no-labels and --*-subset: the lists name the images")
    if args.test_set is not None:
        args.database, args.queries = f"atname:{args.test_set / 'database'}", f"atname:{args.test_set / 'queries'}"

    def run() -> str:
        cfg = config_from_args(EvalConfig, args)
        check_output_folder(args.out)
        if args.benchmark:
            db_split, q_split = read_benchmark(args.benchmark, args.no_labels, args.ground_truth_dir)
        elif args.ground_truth:  # the lists name the images; no position is read
            queries = ListedSide(_root(args.queries), read_path_list(args.queries_list), args.queries_list.name)
            db_split, q_split = read_listed_test_set(
                ListedSide(_root(args.database), read_path_list(args.database_list), args.database_list.name),
                queries, read_positives(args.ground_truth, len(queries.entries)), str(args.ground_truth))
        else:
            db_split = read_split(args.database, "database", args.database_subset, args.no_labels)
            q_split = read_split(args.queries, "queries", args.queries_subset, args.no_labels)
            if args.database_list:
                db_split = restrict_split(db_split, _root(args.database), read_path_list(args.database_list),
                                          args.database_list.name)
            if args.queries_list:
                q_split = restrict_split(q_split, _root(args.queries), read_path_list(args.queries_list),
                                         args.queries_list.name)
        for split in (db_split, q_split):
            if split.rejected:
                log.warning("%s: %d file(s) set aside by the reader (listed in rejects.parquet)", split.name,
                            split.rejected)
        summary = evaluate(args.checkpoint, db_split, q_split, args.out, cfg, ray_address=args.ray_address,
                           num_cpus=args.num_cpus, title=args.title or _benchmark_title(args),
                           actor_resources=parse_resources(args.actor_resources))
        return summary.text()

    return run_guarded("evaluate", run, (ConfigError, SourceError, CheckpointError, EvaluationError,
                                         FileNotFoundError, ValueError))


def _root(spec: str) -> Path:
    """The PATH of a --database / --queries FORMAT:PATH (a bare path is atname's)."""
    from placeforge.ingest import parse_source_spec

    return parse_source_spec(spec)[1] if ":" in spec else Path(spec)


def _benchmark_title(args: argparse.Namespace) -> str | None:
    """"model.pt on nordland" for --benchmark; None (the default title) otherwise."""
    return f"{args.checkpoint.name} on {args.benchmark.partition(':')[0]}" if args.benchmark else None


if __name__ == "__main__":
    sys.exit(main())
