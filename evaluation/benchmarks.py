"""The standard test sets, by name, in the folder layouts their tools write.

    database, queries = read_benchmark("nordland:/data/datasets/nordland")

Each entry names the database and queries folders below the dataset's root (the folder
the tool creates: `datasets/<name>` for gmberton/VPR-datasets-downloader, `msls` for its
`format_mapillary.py`, `sf_xl/processed` for SF-XL) and the coordinates its "@" names
carry: "utm" (east/north/zone/letter from lat/lon) or "planar" (mock coordinates, see
evaluation/positions.py).  Reading a set checks both, so a wrong root fails with the
folders that were expected instead of a recall of zero.  Folder names are constants here;
nothing is built from file names.

    database, queries = read_benchmark("msls-val-740:/data/msls", ground_truth_dir=Path("gsv-cities/datasets/msls_val"))

LISTED_BENCHMARKS are named by index files that ship apart from the images (GSV-Cities'
msls_val_*.npy): the images they list, relative to ROOT, and the right answers they give
(evaluation/ground_truth.py), not positions within a radius.  The files are read from
`ground_truth_dir`, else from ROOT/<folder>/.

    database, queries = read_benchmark("nordland-vprbench:/data/VPR-Bench/datasets/Nordland")

VPRBENCH_BENCHMARKS are in MubarizZaffar/VPR-Bench's template: ROOT/ref/ and ROOT/query/ of
<integer>.jpg in numeric order, and its ground-truth file (in ROOT, or `ground_truth_dir`) giving
each query's right ref images by those numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placeforge.catalog import REJECTS_SCHEMA, concat
from placeforge.evaluation.ground_truth import (
    ListedSide,
    numbered_images,
    read_listed_test_set,
    read_path_list,
    read_positives,
    read_vprbench_positives,
)
from placeforge.evaluation.npy_safe import load_npy
from placeforge.evaluation.testset import Split, check_comparable, read_split
from placeforge.ingest.common import SourceError

DOWNLOADER = "gmberton/VPR-datasets-downloader"


@dataclass(frozen=True)
class Benchmark:
    database: str  # folder below the dataset root
    queries: str  # folder below the dataset root
    frame: str  # "utm" or "planar": the coordinates the names carry
    written_by: str  # the tool (and script) whose output this layout is


def _downloader_test(script: str, frame: str = "utm", queries: str = "queries", database: str = "database"
                     ) -> Benchmark:
    return Benchmark(f"images/test/{database}", f"images/test/{queries}", frame, f"{DOWNLOADER} {script}")


def _sf_xl(queries: str) -> Benchmark:
    return Benchmark("test/database", f"test/{queries}", "utm", "SF-XL (gmberton/CosPlace), processed/test")


def _svox(queries: str) -> Benchmark:
    return _downloader_test("download_svox.py (a ready-made archive)", queries=queries, database="gallery")


BENCHMARKS: dict[str, Benchmark] = {
    "pitts30k": _downloader_test("format_pitts30k.py"),
    "pitts250k": _downloader_test("format_pitts250k.py"),
    "tokyo247": _downloader_test("format_tokyo247.py"),
    "msls-val": Benchmark("val/database", "val/queries", "utm", f"{DOWNLOADER} format_mapillary.py (all queries)"),
    "san-francisco": _downloader_test("download_san_francisco.py"),
    "st-lucia": _downloader_test("download_st_lucia.py"),
    "eynsham": _downloader_test("download_eynsham.py"),
    "nordland": _downloader_test("download_nordland.py", frame="planar"),
    "amstertime": _downloader_test("download_amstertime.py", frame="planar"),
    "sped": _downloader_test("download_sped.py", frame="planar"),
    "svox": _svox("queries"),
    "svox-night": _svox("queries_night"),
    "svox-overcast": _svox("queries_overcast"),
    "svox-rain": _svox("queries_rain"),
    "svox-snow": _svox("queries_snow"),
    "svox-sun": _svox("queries_sun"),
    "sf-xl-v1": _sf_xl("queries_v1"),
    "sf-xl-v2": _sf_xl("queries_v2"),
    "sf-xl-night": _sf_xl("queries_night"),
    "sf-xl-occlusion": _sf_xl("queries_occlusion"),
}


@dataclass(frozen=True)
class ListedBenchmark:
    """A test set named by .npy index files (GSV-Cities' layout); paths in them are relative to ROOT."""

    database: str  # 1-D strings: the database images
    queries: str  # 1-D strings: the query images
    evaluated: str  # 1-D ints: the rows of `queries` evaluated, in the order `positives` follows
    positives: str  # object array: per evaluated query, the rows of `database` that are right
    folder: str  # where the files are below ROOT when no ground_truth_dir is given
    root_holds: str  # the folder below ROOT that the listed paths start with
    written_by: str


LISTED_BENCHMARKS: dict[str, ListedBenchmark] = {
    "msls-val-740": ListedBenchmark(
        "msls_val_dbImages.npy", "msls_val_qImages.npy", "msls_val_qIdx.npy", "msls_val_pIdx.npy", "msls_val",
        "train_val", "GSV-Cities (amaralibey/gsv-cities datasets/msls_val/, the same files as Pair-VPR's "
                     "pairvpr/datasets/datasetfiles/msls_val/)"),
}


@dataclass(frozen=True)
class VprBenchBenchmark:
    """A test set in VPR-Bench's template: ROOT/ref/ (database) and ROOT/query/ of <integer>.jpg."""

    ground_truth: str  # the [Q, 2] ground-truth file, in ROOT unless ground_truth_dir is given
    written_by: str


VPRBENCH_DATABASE, VPRBENCH_QUERIES = "ref", "query"  # VPR-Bench's evaluate_vpr_techniques.py

VPRBENCH_BENCHMARKS: dict[str, VprBenchBenchmark] = {
    "nordland-vprbench": VprBenchBenchmark(
        "ground_truth_new.npy", "MubarizZaffar/VPR-Bench (datasets/Nordland/ground_truth_new.npy; images from "
                                "its surfdrive download): 27592 ref (summer), 2760 query (winter) images"),
}


def parse_benchmark_spec(spec: str) -> tuple[str, Path]:
    """"NAME:ROOT" -> (name, root), e.g. "svox-night:/data/datasets/svox"; SourceError naming the valid names."""
    name, colon, root = spec.partition(":")
    if name not in BENCHMARKS and name not in LISTED_BENCHMARKS and name not in VPRBENCH_BENCHMARKS:
        valid = [*BENCHMARKS, *LISTED_BENCHMARKS, *VPRBENCH_BENCHMARKS]
        raise SourceError(f"unknown benchmark {name!r}; valid: {', '.join(valid)}")
    if not colon or not root:
        raise SourceError(f"benchmark {spec!r} has no root; expected NAME:ROOT, e.g. {name}:/data/datasets/{name}")
    return name, Path(root)


def read_benchmark(spec: str, no_labels: bool = False, ground_truth_dir: Path | None = None
                   ) -> tuple[Split, Split]:
    """The database and queries of benchmark "NAME:ROOT", checked against its layout.

    For a LISTED_BENCHMARKS or VPRBENCH_BENCHMARKS name the queries carry the ground truth of its
    files (none with `no_labels`), read from `ground_truth_dir`, else ROOT/<folder>/ or ROOT.

    Raises:
        SourceError: an unknown name, a folder of the layout or an index file missing, names whose
            coordinates are not the kind the benchmark's names carry, or index files that disagree.
    """
    name, root = parse_benchmark_spec(spec)
    if name in LISTED_BENCHMARKS:
        return _read_listed(name, root, ground_truth_dir, no_labels)
    if name in VPRBENCH_BENCHMARKS:
        return _read_vprbench(name, root, ground_truth_dir, no_labels)
    if ground_truth_dir is not None:
        raise SourceError(f"{name} has no index files; --ground-truth-dir goes with "
                          f"{', '.join([*LISTED_BENCHMARKS, *VPRBENCH_BENCHMARKS])}")
    bench = BENCHMARKS[name]
    for folder in (bench.database, bench.queries):
        if not (root / folder).is_dir():
            raise SourceError(f"{name} expects {root / folder} (database {bench.database}/, queries "
                              f"{bench.queries}/ below the root, as written by {bench.written_by}); it is not a folder")
    database = read_split(f"atname:{root / bench.database}", "database", no_labels=no_labels)
    queries = read_split(f"atname:{root / bench.queries}", "queries", no_labels=no_labels)
    for split in (database, queries):
        if split.frame is not None and split.frame != bench.frame:
            raise SourceError(f"{name}: the {split.name} names carry {_FRAMES[split.frame]}, but {name}'s carry "
                              f"{_FRAMES[bench.frame]}; for another set use --test-set or --database/--queries")
    check_comparable(database, queries)
    return database, queries


def _read_listed(name: str, root: Path, ground_truth_dir: Path | None, no_labels: bool) -> tuple[Split, Split]:
    bench = LISTED_BENCHMARKS[name]
    folder = ground_truth_dir if ground_truth_dir is not None else root / bench.folder
    absent = [file for file in (bench.database, bench.queries, bench.evaluated, bench.positives)
              if not (folder / file).is_file()]
    if absent:
        where = "" if ground_truth_dir is not None else f" (ROOT/{bench.folder}/; or give --ground-truth-dir DIR)"
        raise SourceError(f"{name} reads {', '.join(absent)} from {folder}{where}: the index files of "
                          f"{bench.written_by}")
    if not (root / bench.root_holds).is_dir():
        raise SourceError(f"{name} expects {root / bench.root_holds}: ROOT is the folder that holds "
                          f"{bench.root_holds}/, as the paths in {bench.database} start with it; it is not a folder")
    database = read_path_list(folder / bench.database)
    query_images = read_path_list(folder / bench.queries)
    evaluated = _row_numbers(folder / bench.evaluated, len(query_images), bench.queries)
    positives = None if no_labels else read_positives(folder / bench.positives, len(evaluated))
    return read_listed_test_set(ListedSide(root, database, bench.database),
                                ListedSide(root, [query_images[i] for i in evaluated], bench.evaluated),
                                positives, str(folder / bench.positives))


def _read_vprbench(name: str, root: Path, ground_truth_dir: Path | None, no_labels: bool) -> tuple[Split, Split]:
    bench = VPRBENCH_BENCHMARKS[name]
    for folder in (VPRBENCH_DATABASE, VPRBENCH_QUERIES):
        if not (root / folder).is_dir():
            raise SourceError(f"{name} expects {root / folder} (database {VPRBENCH_DATABASE}/, queries "
                              f"{VPRBENCH_QUERIES}/ below the root, VPR-Bench's template); it is not a folder")
    truth = (ground_truth_dir if ground_truth_dir is not None else root) / bench.ground_truth
    if not no_labels and not truth.is_file():
        where = "" if ground_truth_dir is not None else " (ROOT; or give --ground-truth-dir DIR)"
        raise SourceError(f"{name} reads {bench.ground_truth} from {truth.parent}{where}: the ground truth of "
                          f"{bench.written_by}")
    database, db_aside = numbered_images(root.resolve(), VPRBENCH_DATABASE)
    queries, q_aside = numbered_images(root.resolve(), VPRBENCH_QUERIES)
    positives = None
    if not no_labels:
        positives = read_vprbench_positives(truth)
        if len(positives) != len(queries):
            raise SourceError(f"ground truth {truth} has {len(positives)} rows for the {len(queries)} images of "
                              f"{root / VPRBENCH_QUERIES}; VPR-Bench needs one row per query, in numeric order")
    db_split, q_split = read_listed_test_set(ListedSide(root, database, f"{VPRBENCH_DATABASE}/*.jpg"),
                                             ListedSide(root, queries, f"{VPRBENCH_QUERIES}/*.jpg"),
                                             positives, str(truth))
    return (dataclasses.replace(db_split, rejects=concat([db_split.rejects, db_aside], REJECTS_SCHEMA)),
            dataclasses.replace(q_split, rejects=concat([q_split.rejects, q_aside], REJECTS_SCHEMA)))


def _row_numbers(path: Path, rows: int, of: str) -> list[int]:
    """A 1-D .npy of row numbers into a list of `rows` entries (`of`, for messages)."""
    try:
        array = load_npy(path)
    except (OSError, ValueError) as err:
        raise SourceError(f"{path} cannot be read: {err}") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise SourceError(f"{path}: expected a 1-D array of row numbers, got {array.dtype} of shape {array.shape}")
    outside = array[(array < 0) | (array >= rows)]
    if outside.size:
        raise SourceError(f"{path} names row {outside[0]}, but {of} has rows 0..{rows - 1}")
    return array.tolist()


_FRAMES = {"utm": "UTM positions", "planar": "mock coordinates (@0@<metres>@ with no zone)"}
