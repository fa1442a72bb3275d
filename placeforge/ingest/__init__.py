"""Dataset readers: a folder a researcher already has -> catalog and rejects tables.

    result = read_source("gsv_cities", "/data/gsv-cities")
    result.catalog   # pa.Table, catalog.CATALOG_SCHEMA, one row per usable image
    result.rejects   # pa.Table, catalog.REJECTS_SCHEMA, one row per input set aside
    result.inputs    # == catalog.num_rows + rejects.num_rows
    read_source("atname", "/data/sf_xl/processed", Path("sfxl_files.parquet"))  # a file list, no walk

Readers list files and parse metadata; they never decode an image (that happens
later, in parallel).  Place assignment is done elsewhere: place_key and place_id
are left null.  The dataset name is the root folder's name and image ids hash it
with the POSIX path relative to the root, so they are stable across machines.
Every reader takes an optional file list (`placeforge.ingest.filelist`: a text or
Parquet list of paths relative to the root) that stands for the folder walk, so a
41 M-image tree on NFS is neither walked nor stat'ed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from placeforge.ingest.atname import AtName, AtNameError, parse_at_name, parse_at_names, read_atname
from placeforge.ingest.common import IngestResult, SourceError
from placeforge.ingest.gldv2 import read_gldv2
from placeforge.ingest.gsv_cities import read_gsv_cities
from placeforge.ingest.msls import read_msls

# reader(root, file_list=None) -> IngestResult
READERS: dict[str, Callable[..., IngestResult]] = {
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
    "Source",
    "SourceError",
    "parse_at_name",
    "parse_at_names",
    "parse_source_args",
    "parse_source_spec",
    "read_source",
]


class Source(NamedTuple):
    """One source of a build: a format, its root folder, and optionally a file list."""

    format: str  # a key of READERS
    root: Path
    file_list: Path | None = None  # text or .parquet list of paths relative to root; None: walk root

    def label(self) -> str:
        """How the source is shown in a manifest and in messages."""
        where = f"{self.format}:{Path(self.root).resolve()}"
        return f"{where} (file list {Path(self.file_list).resolve()})" if self.file_list else where


def read_source(fmt: str, root: str | Path, file_list: str | Path | None = None) -> IngestResult:
    """Read the dataset at `root` with the reader for format `fmt` (a key of READERS).

    `file_list`: the images as a list of paths relative to `root` instead of a folder walk
    (see placeforge.ingest.filelist).
    """
    return READERS[_check_format(fmt)](Path(root), file_list=Path(file_list) if file_list is not None else None)


def parse_source_spec(spec: str) -> tuple[str, Path]:
    """"FORMAT:PATH" -> (format, path), e.g. "atname:/data/sf_xl/processed"."""
    fmt, colon, path = spec.partition(":")
    if not colon:
        raise ValueError(f"source {spec!r} has no ':'; expected FORMAT:PATH with FORMAT one of {sorted(READERS)}")
    if not path:
        raise ValueError(f"source {spec!r} has no path after ':'; expected FORMAT:PATH")
    return _check_format(fmt), Path(path)


def parse_source_args(words: list[str]) -> Source:
    """The words of one `--source FORMAT:ROOT [LIST]` -> Source.

    e.g. ["atname:/data/sf_xl/processed", "/data/lists/sfxl.parquet"]; a LIST is a separate
    word, so neither path needs a separator that a path could hold.
    """
    if not 1 <= len(words) <= 2:
        raise ValueError(f"--source takes FORMAT:ROOT and at most one file list, got {len(words)} words: {words}")
    fmt, root = parse_source_spec(words[0])
    if len(words) == 1:
        return Source(fmt, root)
    file_list = Path(words[1])
    if not file_list.is_file():
        raise ValueError(f"file list {file_list} (after {words[0]}) is not a file; each source needs its own --source")
    return Source(fmt, root, file_list)


def _check_format(fmt: str) -> str:
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r}; valid formats: {', '.join(sorted(READERS))}")
    return fmt
