"""What every reader shares: the result type, the rejects log, number grammar, and
`finish`, which turns a reader's candidate rows into catalog and rejects tables.

A reader lists files and parses metadata into a polars frame of candidates, one row
per input that has survived the reader's own checks, with columns

    relpath  str   POSIX path of the image relative to the root (never escapes it)
    input    str   how a reject names this input: the relpath, or "x.csv:row N"
    subset, lat, lon, heading_deg (f64), captured_at_s (i64, Unix seconds),
    source_place_id   optional; absent columns are null

and records every other input in a `RejectLog`.  `finish` then rejects the same
image listed twice, files that are missing or unreadable, and one file reached
under two names (hard links, symlinks), computes UTM per point with
`placeforge.geo`, and checks that every input ended up in exactly one table.
For a source given as a file list (`ingest.filelist`) nothing is stat'ed: the list
stands for the folder, and the shard build rejects the files it cannot read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from placeforge.catalog import (
    CATALOG_SCHEMA,
    IMAGE_EXTENSIONS,
    REASONS,
    REJECTS_SCHEMA,
    catalog_table,
    rejects_table,
    stable_ids,
)
from placeforge.geo import UTM_MAX_LAT_DEG, UTM_MIN_LAT_DEG, latlon_to_utm, valid_latlon
from placeforge.ingest.listing import SkippedEntry, check_files

# One grammar for numbers in names and CSVs, used by the scalar and the vectorised
# parsers alike so they accept exactly the same strings.  ASCII only (Python's float()
# would also take "1_0", " 1" and "١٢"; polars would not).  Letters are spelled as
# explicit classes, not with a case-insensitive flag: under Python's Unicode case
# folding "(?i:inf)" also matches "ınf" and "İnf", which float() then refuses.
# Patterns are unanchored: Python uses re.fullmatch, polars `whole(pattern)`
# (Python's "$" would also match before a trailing newline).
NUMBER_PATTERN = (
    r"(?:[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|[+-]?(?:[nN][aA][nN]|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?))"
)
INT_PATTERN = r"[+-]?[0-9]{1,18}"  # 18 digits always fit in int64

CANDIDATE_COLUMNS = {
    "relpath": pl.String,
    "input": pl.String,
    "subset": pl.String,
    "lat": pl.Float64,
    "lon": pl.Float64,
    "heading_deg": pl.Float64,
    "captured_at_s": pl.Int64,
    "source_place_id": pl.String,
}


class SourceError(ValueError):
    """A source folder that cannot be read as the format asked for; says what was expected."""


@dataclass(frozen=True)
class IngestResult:
    """One source read: its images, its rejects, and how many inputs were seen.

    Every input is in exactly one of the two tables: inputs == catalog rows + rejects rows.
    `warnings` are findings that reject nothing (e.g. two metadata files disagree).
    """

    catalog: pa.Table  # CATALOG_SCHEMA; place_key / place_id null
    rejects: pa.Table  # REJECTS_SCHEMA; stage "ingest"
    inputs: int
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.inputs != self.catalog.num_rows + self.rejects.num_rows:
            raise ValueError(
                f"ingest lost track of inputs: {self.inputs} seen, "
                f"{self.catalog.num_rows} catalogued + {self.rejects.num_rows} rejected"
            )


class RejectLog:
    """Rejected inputs of one source, in the order they were found."""

    def __init__(self) -> None:
        self._frames: list[pl.DataFrame] = []

    def add(self, input: str, reason: str, detail: str, relpath: str | None = None) -> None:
        self.add_frame(pl.DataFrame({"input": [input], "reason": [reason], "detail": [detail], "relpath": [relpath]}))

    def add_skipped(self, entries: list[SkippedEntry]) -> None:
        """Add a listing's skipped entries (one frame for all: a list can skip millions)."""
        self.add_frame(pl.DataFrame(
            {"input": [e.relpath for e in entries], "reason": [e.reason for e in entries],
             "detail": [e.detail for e in entries]},
            schema={"input": pl.String, "reason": pl.String, "detail": pl.String},
        ))  # fmt: skip

    def add_frame(self, frame: pl.DataFrame) -> None:
        """Add rows with columns input, reason, detail and optionally relpath (-> image_id)."""
        if frame.height == 0:
            return
        if "relpath" not in frame.columns:
            frame = frame.with_columns(relpath=pl.lit(None, pl.String))
        self._frames.append(frame.select(pl.col(c).cast(pl.String) for c in ("input", "reason", "detail", "relpath")))

    def __len__(self) -> int:
        return sum(f.height for f in self._frames)

    def table(self, source: str, dataset: str) -> pa.Table:
        if not self._frames:
            return rejects_table([])
        frame = pl.concat(self._frames)
        unknown = frame.filter(~pl.col("reason").is_in(sorted(REASONS)))["reason"].unique(maintain_order=True)
        if len(unknown):
            raise ValueError(f"unknown reject reason {unknown[0]!r}; valid: {sorted(REASONS)}")
        with_path = frame["relpath"].is_not_null()
        image_id = np.zeros(frame.height, dtype=np.int64)
        image_id[with_path.to_numpy()] = stable_ids(frame["relpath"].filter(with_path), f"{dataset}/")  # image_id_for
        table = frame.select(
            "input", pl.lit(source).alias("source"), pl.lit(dataset).alias("dataset"), pl.lit("ingest").alias("stage"),
            "reason", "detail", pl.when(with_path).then(pl.Series(image_id)).alias("image_id"),
        ).to_arrow()
        return table.cast(REJECTS_SCHEMA)


def open_root(source: str, root: str | os.PathLike) -> Path:
    """The absolute dataset root, or SourceError if it is not a usable folder."""
    path = Path(os.path.abspath(os.fspath(root)))
    if not path.exists():
        raise SourceError(f"{source} source {path} does not exist")
    if not path.is_dir():
        raise SourceError(f"{source} source {path} is not a folder")
    if not path.name:
        raise SourceError(f"{source} source {path} has no folder name to use as the dataset name")
    return path


def path_prefix(root: str | os.PathLike) -> str:
    """What a catalog row's `path` is made of besides its relpath: path = path_prefix(root) + relpath,
    with the root made absolute as `open_root` makes it (the shard build rebuilds paths so)."""
    return os.fspath(Path(os.path.abspath(os.fspath(root)))) + "/"


def read_csv_strings(path: Path) -> pl.DataFrame:
    """A CSV with every column as stripped text (numbers are parsed, and checked, later).

    Raises OSError or polars' error for a file that cannot be read as CSV.
    """
    frame = pl.read_csv(path, infer_schema=False, raise_if_empty=False)
    return frame.with_columns(pl.col(pl.String).str.strip_chars())


def row_labels(csv_relpath: str, n: int) -> pl.Series:
    """[n] reject names "csv_relpath:row i", i counting data rows from 1 (header excluded)."""
    return pl.Series("input", [f"{csv_relpath}:row {i}" for i in range(1, n + 1)], dtype=pl.String)


def whole(pattern: str) -> str:
    """`pattern` anchored for polars (Rust regex, where "$" is the end of the text)."""
    return f"^(?:{pattern})$"


def parse_float(text: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(value, bad) for a text column: empty or null -> null value, not bad; see NUMBER_PATTERN."""
    value = pl.when(text.str.contains(whole(NUMBER_PATTERN))).then(text.cast(pl.Float64, strict=False))
    return value, ((text != "") & value.is_null()).fill_null(False)


def parse_int(text: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(value, bad) for a text column of integers; see INT_PATTERN."""
    value = pl.when(text.str.contains(whole(INT_PATTERN))).then(text.cast(pl.Int64, strict=False))
    return value, ((text != "") & value.is_null()).fill_null(False)


def latlon_problem(lat: float | None, lon: float | None) -> str | None:
    """Why (lat, lon) in degrees cannot be placed in UTM, or None if it can."""
    problems = []
    for name, value, limit in (("lat", lat, 90.0), ("lon", lon, 180.0)):
        if value is None:
            problems.append(f"{name} is missing")
        elif not math.isfinite(value):
            problems.append(f"{name} is {value}")
        elif abs(value) > limit:
            problems.append(f"{name} {value} is outside -{limit:g}..{limit:g}")
    if not problems and not UTM_MIN_LAT_DEG <= lat <= UTM_MAX_LAT_DEG:  # type: ignore[operator]
        problems.append(f"lat {lat} is outside UTM's {UTM_MIN_LAT_DEG:g}..{UTM_MAX_LAT_DEG:g} (polar)")
    return "; ".join(problems) or None


def problems(checks: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    """'; '-joined messages of the (condition, message) checks that hold; "" when none does."""
    return pl.concat_str([pl.when(cond).then(msg) for cond, msg in checks], separator="; ", ignore_nulls=True)


def missing_columns(frame: pl.DataFrame, required: tuple[str, ...]) -> list[str]:
    return [c for c in required if c not in frame.columns]


def reject_rows(rejects: RejectLog, rows: pl.DataFrame, reason: str, detail: str | pl.Expr) -> None:
    """Reject every row of `rows` (columns input, optionally relpath) for one reason."""
    detail_expr = pl.lit(detail) if isinstance(detail, str) else detail
    rejects.add_frame(rows.select(
        "input", *(["relpath"] if "relpath" in rows.columns else []), reason=pl.lit(reason), detail=detail_expr
    ))


def split_unplaced(rows: pl.DataFrame, rejects: RejectLog) -> pl.DataFrame:
    """Reject rows whose lat/lon (f64 columns, degrees) cannot be placed in UTM; return the others.

    Both empty -> no_coordinates; anything else unusable -> bad_coordinates.
    """
    lat = rows["lat"].fill_null(np.nan).to_numpy()
    lon = rows["lon"].fill_null(np.nan).to_numpy()
    usable = valid_latlon(lat, lon)
    unplaced = rows.filter(~usable)
    reasons, details = [], []
    for la, lo in zip(unplaced["lat"], unplaced["lon"]):
        none_given = la is None and lo is None
        reasons.append("no_coordinates" if none_given else "bad_coordinates")
        details.append("lat and lon are empty" if none_given else latlon_problem(la, lo))
    rejects.add_frame(unplaced.select(
        "input", *(["relpath"] if "relpath" in rows.columns else []),
        reason=pl.Series(reasons, dtype=pl.String), detail=pl.Series(details, dtype=pl.String),
    ))  # fmt: skip
    return rows.filter(usable)


def reject_unclaimed(rejects: RejectLog, relpaths: pl.Series, skipped: list[SkippedEntry],
                     claimed: pl.Series | set[str], metadata: str) -> None:
    """Listed files that no metadata row names: not_an_image, or not_in_metadata.

    Args:
        relpaths, skipped: a listing (a walk's, or a file list's from filelist.read_file_list_column).
        claimed: the relpaths metadata rows name.
        metadata: where a row would have been, for the detail, e.g. "Dataframes/Rome.csv".
    """
    rejects.add_skipped(skipped)
    if not isinstance(claimed, pl.Series):
        claimed = pl.Series(sorted(claimed), dtype=pl.String)
    files = pl.DataFrame({"relpath": relpaths}, schema={"relpath": pl.String})
    files = files.filter(~pl.col("relpath").is_in(claimed.implode()))
    extension = pl.col("relpath").str.extract(r"(\.[^./]*)$", 1).fill_null("").str.to_lowercase()
    is_image = extension.is_in(sorted(IMAGE_EXTENSIONS))
    rejects.add_frame(files.select(
        "relpath",
        input="relpath",
        reason=pl.when(is_image).then(pl.lit("not_in_metadata")).otherwise(pl.lit("not_an_image")),
        detail=pl.when(is_image)
        .then(pl.lit(f"no row in {metadata} names this file"))
        .otherwise(pl.format("extension '{}' is not an image type", extension)),
    ))  # fmt: skip


def reject_unlisted(rows: pl.DataFrame, relpaths: pl.Series, rejects: RejectLog, list_name: str) -> pl.DataFrame:
    """Rows (input, relpath) whose image a file list (its [N] `relpaths`) does not name are
    missing_file; return the others.

    The list stands for the folder: what it does not name is taken not to exist.
    """
    listed = pl.col("relpath").is_in(relpaths.cast(pl.String).implode())
    reject_rows(rejects, rows.filter(~listed), "missing_file", pl.format(f"{{}} is not in {list_name}", "relpath"))
    return rows.filter(listed)


def normalise_heading(heading_deg: np.ndarray) -> np.ndarray:
    """[N] compass headings in degrees -> [N] float32 in [0, 360); non-finite -> NaN."""
    heading = np.asarray(heading_deg, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        wrapped = np.mod(heading, 360.0).astype(np.float32)
    # mod(-1e-20, 360) is 360.0 in floating point, and so is 359.99999999 in float32.
    return np.where(wrapped >= 360.0, np.float32(0.0), wrapped)


def finish(
    source: str,
    root: Path,
    candidates: pl.DataFrame,
    rejects: RejectLog,
    missing_reason: str,
    warnings: tuple[str, ...] = (),
    stat_files: bool = True,
) -> IngestResult:
    """Reject repeats and unreadable files among `candidates`, add UTM, build both tables.

    Args:
        source: reader format name.
        root: absolute dataset root; its name is the dataset name.
        candidates: [N] rows with CANDIDATE_COLUMNS (relpath and input required).
        rejects: the reader's rejects so far; finish adds its own.
        missing_reason: reason for a candidate file that does not exist ("missing_file"
            for metadata-driven readers, "unreadable" for listing-driven ones).
        stat_files: False for a source given as a file list: no file is stat'ed, so missing,
            unreadable and hard-linked files are found only when the shard build reads them.
    """
    dataset = root.name
    inputs = candidates.height + len(rejects)
    n = candidates.height
    cand = pl.DataFrame([
        candidates[name].cast(dtype) if name in candidates.columns else pl.Series(name, [None] * n, dtype)
        for name, dtype in CANDIDATE_COLUMNS.items()
    ])  # fmt: skip
    _check_inside_root(cand["relpath"])
    # The relpaths as an Arrow string column, made once: hashed for the ids, then the catalog's
    # relpath and path columns (polars' own strings would be converted, and path concatenated, again).
    # Chunked as polars holds them, so that no chunk exceeds the 2 GB of a string array.
    relpaths = cand.select("relpath").to_arrow(compat_level=pl.CompatLevel.oldest()).column(0).cast(pa.string())
    cand = cand.with_columns(
        image_id=pl.Series(stable_ids(relpaths, f"{dataset}/"), dtype=pl.Int64),  # image_id_for, per row
        order=pl.int_range(pl.len()),
    )

    # The same image listed twice (a repeated metadata row): keep the first.
    first = cand["image_id"].is_first_distinct()
    if not first.all():
        repeated = cand.filter(~first)
        firsts = cand.filter(first & pl.col("image_id").is_in(repeated["image_id"].implode()))
        repeated = repeated.join(firsts.select("image_id", first_input="input"), on="image_id", how="left",
                                 maintain_order="left")
        rejects.add_frame(repeated.select(
            "input", "relpath", reason=pl.lit("duplicate"), detail=pl.format("same image as {}", "first_input")
        ))
        cand = cand.filter(first)

    if not stat_files:
        return IngestResult(_catalog(source, root, cand, relpaths), rejects.table(source, dataset), inputs, warnings)

    # Files that are missing, unreadable, or not regular files.
    status = check_files(root, cand["relpath"].to_list(), missing_reason)
    cand = cand.with_columns(
        reason=pl.Series([p[0] if p else None for p in status.problem], dtype=pl.String),
        detail=pl.Series([p[1] if p else None for p in status.problem], dtype=pl.String),
        file_key=pl.Series([f"{k[0]}:{k[1]}" if k else None for k in status.identity], dtype=pl.String),
        is_symlink=pl.Series(status.is_symlink, dtype=pl.Boolean),
    )
    rejects.add_frame(cand.filter(pl.col("reason").is_not_null()).select("input", "relpath", "reason", "detail"))
    cand = cand.filter(pl.col("reason").is_null())

    # One file under two names: keep a real file over a symlink, then the first listed.
    cand = cand.sort("is_symlink", "order").with_columns(first_input=pl.col("input").first().over("file_key"))
    repeated = ~pl.col("file_key").is_first_distinct()
    rejects.add_frame(cand.filter(repeated).select(
        "input", "relpath", reason=pl.lit("duplicate"), detail=pl.format("same file as {}", "first_input")
    ))
    cand = cand.filter(~repeated).sort("order")

    catalog = _catalog(source, root, cand, relpaths)
    return IngestResult(catalog, rejects.table(source, dataset), inputs, warnings)


def _catalog(source: str, root: Path, cand: pl.DataFrame, relpaths: pa.ChunkedArray) -> pa.Table:
    """Catalog rows of `cand`: rows `order` of the [N] candidates, whose relpaths are `relpaths`."""
    order = cand["order"]  # ascending: rows were only removed
    relpath = relpaths if len(order) == len(relpaths) else relpaths.take(order.to_arrow())
    lat = cand["lat"].fill_nan(None).fill_null(np.nan).to_numpy()
    lon = cand["lon"].fill_nan(None).fill_null(np.nan).to_numpy()
    utm = latlon_to_utm(lat, lon)
    if (~np.isnan(lat) & ~utm.valid).any():
        raise AssertionError("a reader passed coordinates it should have rejected")
    valid = pl.Series(utm.valid)
    frame = cand.select(
        "image_id",
        pl.lit(source).alias("source"),
        pl.lit(root.name).alias("dataset"),
        "subset",
        pl.col("lat").fill_nan(None),
        pl.col("lon").fill_nan(None),
        pl.Series("utm_east", utm.east_m).fill_nan(None),
        pl.Series("utm_north", utm.north_m).fill_nan(None),
        pl.when(valid).then(pl.Series(utm.zone_number)).alias("utm_zone"),
        pl.when(valid).then(pl.Series(utm.zone_letter.astype(object), dtype=pl.String)).alias("utm_letter"),
        pl.Series("heading_deg", normalise_heading(cand["heading_deg"].fill_null(np.nan).to_numpy())).fill_nan(None),
        # years 1..9999 only, so that every timestamp converts to a Python datetime
        pl.when(pl.col("captured_at_s").is_between(-62_135_596_800, 253_402_300_799))
        .then(pl.col("captured_at_s"))
        .alias("captured_at"),
        "source_place_id",
    ).to_arrow(compat_level=pl.CompatLevel.newest())  # strings as views, no copy: catalog_table makes the one copy
    del cand
    columns = {name: frame.column(name) for name in frame.column_names if name in CATALOG_SCHEMA.names}
    columns.update(relpath=relpath, path=pc.binary_join_element_wise(path_prefix(root), relpath, ""))
    return catalog_table(columns)


def _check_inside_root(relpaths: pl.Series) -> None:
    """Readers validate names from metadata; this is the backstop against a path escaping the root."""
    # (^|/)\.\.?(/|$)|^/|//|\x00 as literal tests, which take a third of the regex's time, and only
    # on the paths that could match: those that start with "/" or ".", or hold "//", "/." or NUL.
    suspect = (
        relpaths.str.starts_with("/") | relpaths.str.starts_with(".") | (relpaths == "")
        | relpaths.str.contains_any(["//", "/.", "\x00"])
    )  # fmt: skip
    relpaths = relpaths.filter(suspect)
    escapes = (
        relpaths.str.starts_with("/") | relpaths.str.contains("//", literal=True)
        | relpaths.str.contains("\x00", literal=True) | relpaths.str.starts_with("./")
        | relpaths.str.starts_with("../") | relpaths.str.contains("/./", literal=True)
        | relpaths.str.contains("/../", literal=True) | relpaths.str.ends_with("/.")
        | relpaths.str.ends_with("/..") | relpaths.is_in(["", ".", ".."])
    )  # fmt: skip
    if escapes.any():
        raise AssertionError(f"reader built a path outside the root: {relpaths.filter(escapes)[0]!r}")
