"""A test split (database or queries) as a table of image paths and positions.

    split = read_split("atname:/data/pitts30k/images/test/database")
    split = read_split("msls:/data/msls", subset="*/query")          # a catalog reader + subset filter
    split = read_split("atname:/data/my_queries", no_labels=True)   # any image names, no positions
    check_comparable(database, queries)                             # one coordinate frame for both

A queries Split may carry `ground_truth`: its positives given by a file (evaluation/ground_truth.py
builds them, e.g. MSLS-val's 740-query subset) instead of computed from positions within a radius.

"@"-named images (format atname, the downloader layout) are placed as the reference evaluator
places them: by the UTM east/north in the name, or in a plane of their own for mock
coordinates (evaluation/positions.py has the rules); a split, and a database with its
queries, must not mix the two.  Other formats take positions from their catalog reader
(placeforge.ingest).  Either way an image set aside is counted and reported, never silently
lost.  With `no_labels`, every image file below the folder is used as it is named:
predictions can be written, recall cannot.  Only regular files of at most
`placeforge.ingest.listing.MAX_IMAGE_BYTES` are kept; anything else (a FIFO or device
named *.jpg, a huge file) is set aside with a reason before any image is opened.
GLDv2 has landmark ids and no positions, so it is a test split only with `no_labels`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from placeforge.catalog import IMAGE_EXTENSIONS, rejects_table
from placeforge.evaluation.positions import PLANAR_ZONE, coordinate_frame, positions_from_fields
from placeforge.ingest import parse_at_names, parse_source_spec, read_source
from placeforge.ingest.atname import name_problem
from placeforge.ingest.common import SourceError
from placeforge.ingest.listing import check_files, list_files

# Formats whose catalog has no positions, and why recall cannot be computed on them.
NO_POSITIONS = {"gldv2": "GLDv2 has landmark ids, no positions"}


@dataclass(frozen=True)
class GroundTruth:
    """The right database images of each query, as a file gives them (not by distance).

    Rows follow the Splits, not the file: `positives[i]` belongs to the queries Split's i-th
    path and holds indices into `database_paths`, the paths of the database Split it was built
    with (evaluation checks that it is given that Split).
    """

    positives: list[np.ndarray]  # [Q] int64 arrays, ascending; empty: no positive (a miss at every N)
    database_paths: list[str]  # [M] the database Split's paths the indices point into
    source: str  # the ground-truth file, as reports name it
    positives_set_aside: int = 0  # listed positives whose database image was set aside (missing, unreadable)


@dataclass(frozen=True)
class Split:
    """The images of one side of a test set, in a fixed order (sorted by path)."""

    name: str  # "database" or "queries"
    paths: list[str]  # [M] absolute image paths
    east_north: np.ndarray | None  # [M, 2] metres (UTM, or planar mock coordinates); None with no_labels
    zone: np.ndarray | None  # [M] int zone key: UTM zone, negative south; 0: mock coordinates (planar)
    rejects: pa.Table | None  # catalog.REJECTS_SCHEMA rows the reader set aside
    frame: str | None = None  # "utm" or "planar" (mock coordinates); None with no_labels or from lists
    ground_truth: GroundTruth | None = None  # queries only: positives from a file instead of positions

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def rejected(self) -> int:
        return 0 if self.rejects is None else self.rejects.num_rows


def read_split(spec: str, name: str = "database", subset: str | None = None, no_labels: bool = False) -> Split:
    """Read one side of a test set.

    Args:
        spec: "FORMAT:PATH" with FORMAT a catalog reader (atname, gsv_cities, msls, gldv2); a
            bare path means atname.
        name: "database" or "queries", used in messages.
        subset: keep only images whose catalog `subset` matches this glob (e.g. "*/query" for
            MSLS; for atname the folder relative to PATH).
        no_labels: list image files without reading positions (any file names).
    Raises:
        SourceError: a folder that does not exist or holds no usable image, a format without
            positions (NO_POSITIONS) read for recall, or mock coordinates mixed with UTM zones.
    """
    fmt, root = parse_source_spec(spec) if ":" in spec else ("atname", Path(spec))
    if no_labels:
        return _listed(name, fmt, root)
    if fmt in NO_POSITIONS:
        raise SourceError(
            f"{name} {fmt}:{root}: {NO_POSITIONS[fmt]}, so Recall@N within a radius cannot be computed; "
            "use --no-labels for predictions only"
        )
    if fmt == "atname":
        return _read_at_names(name, root, subset)
    result = read_source(fmt, root)
    table = result.catalog
    if subset is not None:
        keep = [s is not None and fnmatch.fnmatchcase(s, subset) for s in table.column("subset").to_pylist()]
        table = table.filter(pa.array(keep, type=pa.bool_()))
    if table.num_rows == 0:
        why = f"{result.rejects.num_rows} file(s) set aside by the {fmt} reader" if result.rejects.num_rows else "none found"
        raise SourceError(f"{name} {root}{f' (subset {subset})' if subset else ''} has no usable images: {why}")
    table = table.sort_by("path")
    unplaced = table.column("utm_zone").null_count  # 0 for every format outside NO_POSITIONS: a backstop
    if unplaced:
        raise SourceError(
            f"{name} {fmt}:{root}: {unplaced} image(s) have no position, so Recall@N within a radius cannot be "
            "computed; use --no-labels for predictions only"
        )
    east_north = np.stack([table.column("utm_east").to_numpy(), table.column("utm_north").to_numpy()], axis=1)
    zone = table.column("utm_zone").to_numpy().astype(np.int64)
    southern = np.array([letter < "N" for letter in table.column("utm_letter").to_pylist()])
    return Split(name, table.column("path").to_pylist(), east_north, np.where(southern, -zone, zone),
                 result.rejects, "utm")


def check_comparable(database: Split, queries: Split) -> None:
    """Raise SourceError when one split has mock coordinates and the other UTM positions."""
    if database.frame is None or queries.frame is None or database.frame == queries.frame:
        return
    planar, utm = (database, queries) if database.frame == "planar" else (queries, database)
    raise SourceError(
        f"the {planar.name} have mock coordinates (e.g. {Path(planar.paths[0]).name}) and the {utm.name} UTM "
        f"positions (e.g. {Path(utm.paths[0]).name}); mock coordinates are metres in a plane of their own and "
        "cannot be compared with real positions: give the database and queries of one set"
    )


def _read_at_names(name: str, root: Path, subset: str | None) -> Split:
    """"@"-named images below `root`, placed by evaluation.positions; the rest become rejects."""
    root, images, set_aside = _list_images(name, root, subset)
    names = [rel.rsplit("/", 1)[-1] for rel in images]
    fields = parse_at_names(pl.Series(names, dtype=pl.String))
    ok = fields["ok"].to_numpy()
    set_aside += [(rel, "bad_name", name_problem(n)) for rel, n, good in zip(images, names, ok) if not good]
    images = [rel for rel, good in zip(images, ok) if good]
    found = positions_from_fields(fields.filter(pl.col("ok")))
    set_aside += [(rel, found.reason[i], found.detail[i]) for i, rel in enumerate(images) if not found.usable[i]]
    rejects = _rejects_table("atname", root, set_aside)
    keep = np.flatnonzero(found.usable)
    if len(keep) == 0:
        why = "none found"
        if rejects.num_rows:
            why = f"{rejects.num_rows} file(s) set aside, e.g. {rejects.column('detail')[0]}"
        raise SourceError(f"{name} {root}{f' (subset {subset})' if subset else ''} has no usable images: {why}")
    paths = [str(root / images[i]) for i in keep]  # sorted: the listing is sorted by relative path
    zone = found.zone[keep]
    try:
        frame = coordinate_frame(zone)
    except ValueError as err:
        planar = paths[int(np.argmax(zone == PLANAR_ZONE))]
        real = paths[int(np.argmax(zone != PLANAR_ZONE))]
        raise SourceError(
            f"{name} {root}: {err} (e.g. {Path(planar).name} and {Path(real).name}); mock coordinates "
            "are metres in a plane of their own and cannot be compared with real positions"
        ) from None
    return Split(name, paths, found.east_north[keep], zone, rejects, frame)


def _listed(name: str, fmt: str, root: Path) -> Split:
    """Every image file below `root` by name, without positions."""
    root, images, set_aside = _list_images(name, root, None)
    rejects = _rejects_table(fmt, root, set_aside)
    paths = [str(root / rel) for rel in images]  # sorted: the listing is sorted by relative path
    if not paths:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        why = f"; {rejects.num_rows} set aside, e.g. {rejects.column('detail')[0]}" if rejects.num_rows else ""
        raise SourceError(f"{name} folder {root} has no usable image files ({kinds}){why}")
    return Split(name, paths, None, None, rejects)


def _list_images(name: str, root: Path, subset: str | None) -> tuple[Path, list[str], list[tuple[str, str, str]]]:
    """(absolute root, image files below it that are regular, readable and small enough, the
    entries set aside as (relpath, reason, detail)).  Folders not entered and such files are set
    aside; files that are not images by extension are not inputs.  With `subset`, only files
    whose folder relative to the root matches the glob are listed."""
    if not root.is_dir():
        raise SourceError(f"{name} folder {root} does not exist")
    root = root.resolve()
    listing = list_files(root)
    images = [rel for rel in listing.relpaths if Path(rel).suffix.lower() in IMAGE_EXTENSIONS]
    if subset is not None:
        images = [rel for rel in images if "/" in rel and fnmatch.fnmatchcase(rel.rsplit("/", 1)[0], subset)]
    status = check_files(root, images, "unreadable")
    set_aside = [(e.relpath, e.reason, e.detail) for e in listing.skipped]
    set_aside += [(rel, *problem) for rel, problem in zip(images, status.problem) if problem is not None]
    return root, [rel for rel, problem in zip(images, status.problem) if problem is None], set_aside


def _rejects_table(fmt: str, root: Path, set_aside: list[tuple[str, str, str]]) -> pa.Table:
    return rejects_table(
        {"input": rel, "source": fmt, "dataset": root.name, "stage": "ingest", "reason": reason, "detail": detail}
        for rel, reason, detail in set_aside
    )

