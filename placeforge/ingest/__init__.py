"""Dataset readers: a folder a researcher already has -> catalog and rejects tables.

    result = read_source("gsv_cities", "/data/gsv-cities")
    result.catalog   # pa.Table, catalog.CATALOG_SCHEMA, one row per usable image
    result.rejects   # pa.Table, catalog.REJECTS_SCHEMA, one row per input set aside
    result.inputs    # == catalog.num_rows + rejects.num_rows

Readers list files and parse metadata; they never decode an image (that happens
later, in parallel).  Place assignment is done elsewhere: place_key and place_id
are left null.  The dataset name is the root folder's name and image ids hash it
with the POSIX path relative to the root, so they are stable across machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from placeforge.ingest.atname import AtName, AtNameError, parse_at_name, parse_at_names, read_atname
from placeforge.ingest.common import IngestResult, SourceError
from placeforge.ingest.gldv2 import read_gldv2
from placeforge.ingest.gsv_cities import read_gsv_cities
from placeforge.ingest.msls import read_msls

READERS: dict[str, Callable[[Path], IngestResult]] = {
    "atname": read_atname,
    "gsv_cities": read_gsv_cities,
    "msls": read_msls,
    "gldv2": read_gldv2,
}

__all__ = [
    "READERS",
    "AtName",
    "AtNameError",
    "IngestResult",
    "SourceError",
    "parse_at_name",
    "parse_at_names",
    "parse_source_spec",
    "read_source",
]


def read_source(fmt: str, root: str | Path) -> IngestResult:
    """Read the dataset at `root` with the reader for format `fmt` (a key of READERS)."""
    return READERS[_check_format(fmt)](Path(root))


def parse_source_spec(spec: str) -> tuple[str, Path]:
    """"FORMAT:PATH" -> (format, path), e.g. "atname:/data/sf_xl/processed"."""
    fmt, colon, path = spec.partition(":")
    if not colon:
        raise ValueError(f"source {spec!r} has no ':'; expected FORMAT:PATH with FORMAT one of {sorted(READERS)}")
    if not path:
        raise ValueError(f"source {spec!r} has no path after ':'; expected FORMAT:PATH")
    return _check_format(fmt), Path(path)


def _check_format(fmt: str) -> str:
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r}; valid formats: {', '.join(sorted(READERS))}")
    return fmt
