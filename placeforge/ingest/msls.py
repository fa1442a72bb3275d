"""Reader for Mapillary Street-Level Sequences in its native layout (format name "msls").

Layout, for each city and for query and database:
    train_val/<city>/query/raw.csv            key, lon, lat, ca, captured_at, pano, ...
                                              (often with a leading unnamed index column)
    train_val/<city>/query/postprocessed.csv  optional: key, easting, northing, night, ...
    train_val/<city>/query/images/<key>.jpg
    test/<city>/...                           the same, when present

The root is the folder that holds train_val/.  Given train_val/ itself, its parent is
used, so the dataset name and image ids do not depend on which of the two was given.

Coordinates come from raw.csv.  postprocessed.csv is only compared with it: keys in
one but not the other give a warning in the result, not a reject.  `heading_deg` is
`ca`, `captured_at` is `captured_at` (milliseconds since the epoch, UTC), `subset` is
"<city>/query" or "<city>/database" ("test/<city>/query" for the test split).
Inputs are raw.csv rows plus image files that no row names, with the same reasons as
GSV-Cities: missing_file, not_in_metadata, bad_row (no key column; a key that
is not [A-Za-z0-9_-]+, so never a path; a lat/lon/ca/captured_at that is not a
number), bad_coordinates, no_coordinates (lat and lon empty or their columns absent,
as in a test split with withheld positions), duplicate (a key repeated in
one raw.csv).  Row numbers count data rows from 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from placeforge.ingest.common import (
    IngestResult,
    RejectLog,
    SourceError,
    finish,
    missing_columns,
    open_root,
    parse_float,
    problems,
    read_csv_strings,
    reject_rows,
    reject_unclaimed,
    reject_unlisted,
    row_labels,
    split_unplaced,
    whole,
)
from placeforge.ingest.filelist import read_file_list_column
from placeforge.ingest.listing import is_text, list_files, printable

SOURCE = "msls"
SPLITS = ("train_val", "test")
SIDES = ("query", "database")
REQUIRED = ("key",)  # without lat/lon columns (withheld test sets) rows are no_coordinates
_KEY = r"[A-Za-z0-9_-]+"


def read_msls(root: str | Path, file_list: Path | None = None) -> IngestResult:
    """Catalog an MSLS folder (see the module docstring).

    With `file_list` (see placeforge.ingest.filelist; paths like
    "train_val/<city>/query/images/<key>.jpg", relative to the root that holds train_val/)
    the list stands for the images/ folders: they are not walked, no image is stat'ed, a
    row whose image is not listed is missing_file and a listed path no row names is
    not_in_metadata.  The CSVs are read as usual.
    """
    root = open_root(SOURCE, root)
    if root.name == "train_val" and not (root / "train_val").is_dir():
        root = open_root(SOURCE, root.parent)
    if not (root / "train_val").is_dir():
        raise SourceError(f"{SOURCE} source {root} has no train_val/ folder")
    rejects = RejectLog()
    folders = _side_folders(root, rejects)
    if not any((root / folder / "raw.csv").is_file() for folder, _ in folders):
        raise SourceError(f"{SOURCE} source {root} has no train_val/<city>/{{query,database}}/raw.csv")
    warnings: list[str] = []
    parts, all_claimed = [], set()
    for folder, subset in folders:
        rows, claimed = _read_side(root, folder, subset, rejects, warnings)
        parts.append(rows)
        if file_list is None:
            walked = list_files(root, f"{folder}/images")
            reject_unclaimed(rejects, pl.Series(walked.relpaths, dtype=pl.String), walked.skipped, claimed,
                             f"{folder}/raw.csv")
        all_claimed |= claimed
    candidates = pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()
    if file_list is not None:
        relpaths, skipped = read_file_list_column(file_list)
        reject_unclaimed(rejects, relpaths, skipped, all_claimed, "any <split>/<city>/<side>/raw.csv")
        if candidates.height:
            candidates = reject_unlisted(candidates, relpaths, rejects, f"file list {file_list.name}")
    return finish(SOURCE, root, candidates, rejects, missing_reason="missing_file", warnings=tuple(warnings),
                  stat_files=file_list is None)


def _side_folders(root: Path, rejects: RejectLog) -> list[tuple[str, str]]:
    """[(folder relative to root, subset label)] for every <split>/<city>/<side> that exists."""
    found = []
    for split in SPLITS:
        for city in _subfolders(root / split):
            if not is_text(city):
                rejects.add(f"{split}/{printable(city)}", "bad_name", "folder name is not valid UTF-8")
                continue
            for side in SIDES:
                if (root / split / city / side).is_dir():
                    label = f"{city}/{side}" if split == "train_val" else f"{split}/{city}/{side}"
                    found.append((f"{split}/{city}/{side}", label))
    return found


def _read_side(
    root: Path, folder: str, subset: str, rejects: RejectLog, warnings: list[str]
) -> tuple[pl.DataFrame, set[str]]:
    """Candidate rows of one <split>/<city>/<side>/raw.csv, and the image paths its rows name."""
    raw_rel = f"{folder}/raw.csv"
    empty = pl.DataFrame(schema={"input": pl.String, "relpath": pl.String})
    if not (root / raw_rel).is_file():
        return empty, set()
    try:
        table = read_csv_strings(root / raw_rel)
    except (OSError, pl.exceptions.PolarsError) as err:
        rejects.add(raw_rel, "unreadable", f"cannot be read as CSV: {err}")
        return empty, set()
    rows = table.with_columns(row_labels(raw_rel, table.height))
    absent = missing_columns(table, REQUIRED)
    if absent:
        reject_rows(rejects, rows, "bad_row", f"{raw_rel} has no column(s) {', '.join(absent)}")
        return empty, set()
    _compare_postprocessed(root, folder, table, warnings)

    text = {
        c: pl.col(c).fill_null("") if c in table.columns else pl.lit("")
        for c in ("key", "lat", "lon", "ca", "captured_at")
    }
    key_ok = text["key"].str.contains(whole(_KEY))
    numbers = {c: parse_float(text[c]) for c in ("lat", "lon", "ca", "captured_at")}
    millis = numbers["captured_at"][0]
    rows = rows.with_columns(
        relpath=pl.when(key_ok).then(pl.concat_str(pl.lit(f"{folder}/images/"), text["key"], pl.lit(".jpg"))),
        problem=problems([
            (~key_ok, pl.format("key '{}' is not [A-Za-z0-9_-]+", text["key"])),
            *((bad, pl.format(f"{c} '{{}}' is not a number", text[c])) for c, (_, bad) in numbers.items()),
        ]),  # fmt: skip
        lat=numbers["lat"][0],
        lon=numbers["lon"][0],
        heading_deg=numbers["ca"][0],
        captured_at_s=pl.when(millis.is_finite()).then((millis // 1000).cast(pl.Int64, strict=False)),
        subset=pl.lit(subset),
    )
    claimed = set(rows["relpath"].drop_nulls())
    malformed = pl.col("problem") != ""
    reject_rows(rejects, rows.filter(malformed), "bad_row", pl.col("problem"))
    rows = split_unplaced(rows.filter(~malformed), rejects)
    return rows.select("input", "relpath", "subset", "lat", "lon", "heading_deg", "captured_at_s"), claimed


def _compare_postprocessed(root: Path, folder: str, raw: pl.DataFrame, warnings: list[str]) -> None:
    post_rel = f"{folder}/postprocessed.csv"
    if not (root / post_rel).is_file():
        return
    try:
        post = read_csv_strings(root / post_rel)
    except (OSError, pl.exceptions.PolarsError) as err:
        warnings.append(f"{post_rel} cannot be read as CSV: {err}")
        return
    if "key" not in post.columns:
        warnings.append(f"{post_rel} has no key column")
        return
    raw_keys, post_keys = set(raw["key"].drop_nulls()), set(post["key"].drop_nulls())
    only_raw, only_post = sorted(raw_keys - post_keys), sorted(post_keys - raw_keys)
    if only_raw or only_post:
        example = (only_raw or only_post)[0]
        warnings.append(
            f"{folder}: {len(only_raw)} key(s) only in raw.csv, {len(only_post)} only in "
            f"postprocessed.csv (e.g. {example!r})"
        )


def _subfolders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_dir())
    except OSError:
        return []
