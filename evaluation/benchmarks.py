"""The standard test sets, by name, in the folder layouts their tools write.

    database, queries = read_benchmark("nordland:/data/datasets/nordland")

Each entry names the database and queries folders below the dataset's root (the folder
the tool creates: `datasets/<name>` for gmberton/VPR-datasets-downloader, `msls` for its
`format_mapillary.py`, `sf_xl/processed` for SF-XL) and the coordinates its "@" names
carry: "utm" (east/north/zone/letter from lat/lon) or "planar" (mock coordinates, see
evaluation/positions.py).  Reading a set checks both, so a wrong root fails with the
folders that were expected instead of a recall of zero.  Folder names are constants here;
nothing is built from file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evaluation.testset import Split, check_comparable, read_split
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


def parse_benchmark_spec(spec: str) -> tuple[str, Path]:
    """"NAME:ROOT" -> (name, root), e.g. "svox-night:/data/datasets/svox"; SourceError naming the valid names."""
    name, colon, root = spec.partition(":")
    if name not in BENCHMARKS:
        raise SourceError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    if not colon or not root:
        raise SourceError(f"benchmark {spec!r} has no root; expected NAME:ROOT, e.g. {name}:/data/datasets/{name}")
    return name, Path(root)


def read_benchmark(spec: str, no_labels: bool = False) -> tuple[Split, Split]:
    """The database and queries of benchmark "NAME:ROOT", checked against its layout.

    Raises:
        SourceError: an unknown name, a folder of the layout missing under ROOT, or names whose
            coordinates are not the kind the benchmark's names carry.
    """
    name, root = parse_benchmark_spec(spec)
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


_FRAMES = {"utm": "UTM positions", "planar": "mock coordinates (@0@<metres>@ with no zone)"}
