"""Reader for GSV-Cities (format name "gsv_cities").

Layout:
    Dataframes/<City>.csv   columns place_id,year,month,northdeg,city_id,lat,lon,panoid
    Images/<City>/<City>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg

The CSVs are read as text: the file name repeats the CSV's lat/lon strings verbatim,
so they are not round-tripped through floats.  <City> is the CSV file's name (the
`city_id` column is not used).  Inputs are the CSV rows plus the image files that no
row names:

    row whose image does not exist            missing_file     "Dataframes/Rome.csv:row 3"
    row with an empty / non-integer / out-of-range place_id, year, month or
      northdeg, a non-numeric lat/lon, or a panoid that is not [A-Za-z0-9_-]+
                                              bad_row
    row with lat/lon NaN or out of range      bad_coordinates
    the same row (same image name) again      duplicate
    image file no row names                   not_in_metadata  "Images/Rome/..."

Given a file list (`ingest.filelist`) instead, the list stands for the Images/ folder:
nothing is walked or stat'ed, a row whose image is not listed is missing_file, a listed
path that no row names is not_in_metadata (or not_an_image), and a listed file that is
gone is found when the shard build reads it.

A CSV whose name is not alphanumeric (e.g. "a b.csv") is not trusted as a folder
name: every row in it is `bad_row`.  A CSV that cannot be parsed at all is one
`unreadable` input.  A file whose name a bad_row row could still spell (e.g. month
13) counts as that row's, not as not_in_metadata.  Row numbers count data rows from 1.

Place ids repeat across cities, so `source_place_id` is "<City>/<place_id>";
`heading_deg` is northdeg, `captured_at` the first day of year/month (UTC),
`subset` the city.
"""

from __future__ import annotations

import os
import re
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

SOURCE = "gsv_cities"
COLUMNS = ("place_id", "year", "month", "northdeg", "lat", "lon", "panoid")
_CITY = r"[A-Za-z0-9]+"
_PANOID = r"[A-Za-z0-9_-]+"
_DIGITS = r"[0-9]{1,18}"


def read_gsv_cities(root: str | Path, file_list: Path | None = None) -> IngestResult:
    """Catalog a GSV-Cities folder (see the module docstring).

    With `file_list` (see placeforge.ingest.filelist; paths like "Images/Rome/Rome_....jpg",
    relative to `root`) the list stands for the Images/ folder: it is not walked, no image is
    stat'ed, a row whose image is not listed is missing_file and a listed path no row names
    is not_in_metadata.  The CSVs are read as usual.
    """
    root = open_root(SOURCE, root)
    csv_names = _csv_names(root / "Dataframes")
    if not csv_names:
        raise SourceError(f"{SOURCE} source {root} has no Dataframes/*.csv")
    if not (root / "Images").is_dir():
        raise SourceError(f"{SOURCE} source {root} has no Images/ folder")
    rejects = RejectLog()
    for name in [n for n in csv_names if not is_text(n)]:
        rejects.add(f"Dataframes/{printable(name)}", "bad_name", "CSV name is not valid UTF-8")
        csv_names.remove(name)
    cities, claimed = [], []
    for csv_name in csv_names:
        rows, names = _read_city(root, csv_name, rejects)
        cities.append(rows)
        claimed.append(names)
    if file_list is None:
        walked = list_files(root, "Images")
        relpaths, skipped = pl.Series(walked.relpaths, dtype=pl.String), walked.skipped
    else:
        relpaths, skipped = read_file_list_column(file_list)
    reject_unclaimed(rejects, relpaths, skipped, pl.concat([pl.Series([], dtype=pl.String), *claimed]),
                     "Dataframes/*.csv")
    candidates = pl.concat(cities, how="diagonal_relaxed") if cities else pl.DataFrame()
    if file_list is not None and candidates.height:
        candidates = reject_unlisted(candidates, relpaths, rejects, f"file list {file_list.name}")
    return finish(SOURCE, root, candidates, rejects, missing_reason="missing_file", stat_files=file_list is None)


def _read_city(root: Path, csv_name: str, rejects: RejectLog) -> tuple[pl.DataFrame, pl.Series]:
    """Candidate rows of one city CSV, and every image name its rows spell."""
    city = csv_name.removesuffix(".csv")
    csv_rel = f"Dataframes/{csv_name}"
    empty = pl.DataFrame(schema={"input": pl.String, "relpath": pl.String})
    none = pl.Series("relpath", [], dtype=pl.String)
    try:
        table = read_csv_strings(root / csv_rel)
    except (OSError, pl.exceptions.PolarsError) as err:
        rejects.add(csv_rel, "unreadable", f"cannot be read as CSV: {err}")
        return empty, none
    rows = table.with_columns(row_labels(csv_rel, table.height))
    if not re.fullmatch(_CITY, city):
        reject_rows(rejects, rows, "bad_row", f"city name {city!r} (from the CSV name) is not alphanumeric")
        return empty, none
    absent = missing_columns(table, COLUMNS)
    if absent:
        reject_rows(rejects, rows, "bad_row", f"{csv_rel} has no column(s) {', '.join(absent)}")
        return empty, none

    text = {c: pl.col(c).fill_null("") for c in COLUMNS}
    ints = {
        c: pl.when(text[c].str.contains(whole(_DIGITS))).then(text[c].cast(pl.Int64, strict=False))
        for c in COLUMNS[:4]
    }
    lat, lat_bad = parse_float(text["lat"])
    lon, lon_bad = parse_float(text["lon"])
    panoid_ok = text["panoid"].str.contains(whole(_PANOID))
    spellable = pl.all_horizontal(*(v.is_not_null() for v in ints.values()), ~lat_bad, ~lon_bad, panoid_ok)
    spellable = spellable & (text["lat"] != "") & (text["lon"] != "")
    rows = rows.with_columns(
        relpath=pl.when(spellable).then(pl.concat_str(
            pl.lit(f"Images/{city}/{city}_"),
            ints["place_id"].cast(pl.String).str.zfill(7), pl.lit("_"),
            ints["year"].cast(pl.String).str.zfill(4), pl.lit("_"),
            ints["month"].cast(pl.String).str.zfill(2), pl.lit("_"),
            ints["northdeg"].cast(pl.String).str.zfill(3), pl.lit("_"),
            text["lat"], pl.lit("_"), text["lon"], pl.lit("_"), text["panoid"], pl.lit(".jpg"),
        )),
        problem=problems([
            *((ints[c].is_null(), pl.format(f"{c} '{{}}' is not a non-negative integer", text[c]))
              for c in COLUMNS[:4]),
            (~ints["year"].is_between(1, 9999), pl.format("year {} is out of range", ints["year"])),
            (~ints["month"].is_between(1, 12), pl.format("month {} is not 1..12", ints["month"])),
            (~ints["northdeg"].is_between(0, 360), pl.format("northdeg {} is not 0..360", ints["northdeg"])),
            (lat_bad, pl.format("lat '{}' is not a number", text["lat"])),
            (lon_bad, pl.format("lon '{}' is not a number", text["lon"])),
            (~panoid_ok, pl.format("panoid '{}' is not [A-Za-z0-9_-]+", text["panoid"])),
        ]),  # fmt: skip
        lat=lat,
        lon=lon,
        heading_deg=ints["northdeg"].cast(pl.Float64),
        # clipped so that pl.date never sees month 13; such rows are rejected as bad_row
        captured_at_s=pl.date(ints["year"].clip(1, 9999), ints["month"].clip(1, 12), 1)
        .cast(pl.Datetime("us"))
        .dt.epoch("s"),
        source_place_id=pl.format(f"{city}/{{}}", ints["place_id"]),
        subset=pl.lit(city),
    )
    claimed = rows["relpath"].drop_nulls()
    malformed = pl.col("problem") != ""
    reject_rows(rejects, rows.filter(malformed), "bad_row", pl.col("problem"))
    rows = split_unplaced(rows.filter(~malformed), rejects)
    columns = ("input", "relpath", "subset", "lat", "lon", "heading_deg", "captured_at_s", "source_place_id")
    return rows.select(columns), claimed


def _csv_names(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.name.endswith(".csv") and e.is_file())
    except OSError:
        return []
