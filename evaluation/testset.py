"""A test split (database or queries) as a table of image paths and UTM positions.

    split = read_split("atname:/data/pitts30k/images/test/database")
    split = read_split("msls:/data/msls", subset="*/query")          # a catalog reader + subset filter
    split = read_split("atname:/data/my_queries", no_labels=True)   # any image names, no positions

Positions come from the catalog readers (placeforge.ingest), so every layout they read is a
test layout too, and an image they set aside is counted and reported, never silently lost.
With `no_labels`, every image file below the folder is used as it is named: predictions
can be written, recall cannot.  Either way only regular files of at most
`placeforge.ingest.listing.MAX_IMAGE_BYTES` are kept; anything else (a FIFO or device
named *.jpg, a huge file) is set aside with a reason before any image is opened.
GLDv2 has landmark ids and no positions, so it is a test split only with `no_labels`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from placeforge.catalog import IMAGE_EXTENSIONS, rejects_table
from placeforge.ingest import parse_source_spec, read_source
from placeforge.ingest.common import SourceError
from placeforge.ingest.listing import check_files, list_files

# Formats whose catalog has no positions, and why recall cannot be computed on them.
NO_POSITIONS = {"gldv2": "GLDv2 has landmark ids, no positions"}


@dataclass(frozen=True)
class Split:
    """The images of one side of a test set, in a fixed order (sorted by path)."""

    name: str  # "database" or "queries"
    paths: list[str]  # [M] absolute image paths
    east_north: np.ndarray | None  # [M, 2] UTM metres; None with no_labels
    zone: np.ndarray | None  # [M] int: UTM zone number, negative in the southern hemisphere
    rejects: pa.Table | None  # catalog.REJECTS_SCHEMA rows the reader set aside

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
        subset: keep only catalog rows whose `subset` matches this glob (e.g. "*/query" for MSLS).
        no_labels: list image files without reading positions (any file names).
    Raises:
        SourceError: a folder that does not exist or holds no usable image, or a format
            without positions (NO_POSITIONS) read for recall.
    """
    fmt, root = parse_source_spec(spec) if ":" in spec else ("atname", Path(spec))
    if no_labels:
        return _listed(name, fmt, root)
    if fmt in NO_POSITIONS:
        raise SourceError(
            f"{name} {fmt}:{root}: {NO_POSITIONS[fmt]}, so Recall@N within a radius cannot be computed; "
            "use --no-labels for predictions only"
        )
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
    return Split(name, table.column("path").to_pylist(), east_north, np.where(southern, -zone, zone), result.rejects)


def _listed(name: str, fmt: str, root: Path) -> Split:
    """Every image file below `root` by name; folders not entered and files that are not
    regular, readable and small enough become rejects (non-image files are not inputs)."""
    if not root.is_dir():
        raise SourceError(f"{name} folder {root} does not exist")
    root = root.resolve()
    listing = list_files(root)
    images = [rel for rel in listing.relpaths if Path(rel).suffix.lower() in IMAGE_EXTENSIONS]
    status = check_files(root, images, "unreadable")
    set_aside = [(e.relpath, e.reason, e.detail) for e in listing.skipped]
    set_aside += [(rel, *problem) for rel, problem in zip(images, status.problem) if problem is not None]
    rejects = rejects_table(
        {"input": rel, "source": fmt, "dataset": root.name, "stage": "ingest", "reason": reason, "detail": detail}
        for rel, reason, detail in set_aside
    )
    paths = sorted(str(root / rel) for rel, problem in zip(images, status.problem) if problem is None)
    if not paths:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        why = f"; {rejects.num_rows} set aside, e.g. {rejects.column('detail')[0]}" if rejects.num_rows else ""
        raise SourceError(f"{name} folder {root} has no usable image files ({kinds}){why}")
    return Split(name, paths, None, None, rejects)
