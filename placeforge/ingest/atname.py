"""Reader for folders of images named in the "@" format (format name "atname").

This is the layout of gmberton/VPR-datasets-downloader, used by SF-XL, Pitts30k/250k,
Tokyo 24/7, St Lucia, MSLS-as-downloaded and others.  A file name holds 14 fields,
each of which may be empty, between a leading and a trailing "@", then the extension:

    @utm_east@utm_north@utm_zone_number@utm_zone_letter@lat@lon@pano_id@tile_num
        @heading@pitch@roll@height@timestamp@note@.jpg
    @0543037.38@4180974.80@10@S@037.77510@-122.51130@1ooZhwTQyuNt0xiue5YhLg@@134@@@@201311@@.jpg

Every file below the root is an input (or every path a file list names, see
`ingest.filelist`: then no folder is walked); `subset` is its folder relative to the root
(e.g. "images/test/queries"; null at the root).  Coordinates come from lat/lon when
both are present and valid, else from the UTM fields; UTM is then recomputed from
lat/lon per point.  `pano_id` identifies a panorama, not a place, so
`source_place_id` stays null.  The timestamp may be YYYY, YYYYMM, YYYYMMDD or
YYYYMMDD_hh[mm[ss]] (UTC); anything else leaves `captured_at` null.

`parse_at_name` parses one name (pure, for tests and tools); `parse_at_names` parses
[N] names at once with polars and accepts exactly the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from placeforge.catalog import IMAGE_EXTENSIONS
from placeforge.geo import is_northern_letter, utm_to_latlon, valid_latlon
from placeforge.ingest.common import (
    INT_PATTERN,
    NUMBER_PATTERN,
    IngestResult,
    RejectLog,
    SourceError,
    finish,
    latlon_problem,
    open_root,
    parse_float,
    parse_int,
    whole,
)
from placeforge.ingest.filelist import read_file_list_column
from placeforge.ingest.listing import list_files

SOURCE = "atname"
FIELDS = (
    "utm_east", "utm_north", "utm_zone_number", "utm_zone_letter", "lat", "lon", "pano_id",
    "tile_num", "heading", "pitch", "roll", "height", "timestamp", "note",
)  # fmt: skip
FLOAT_FIELDS = frozenset({"utm_east", "utm_north", "lat", "lon", "heading", "pitch", "roll", "height"})
INT_FIELDS = frozenset({"utm_zone_number", "tile_num"})
UTM_FIELDS = ("utm_east", "utm_north", "utm_zone_number", "utm_zone_letter")
# AtName attribute (and parse_at_names column) of each field, where the unit is in the name.
ATTRIBUTE = {f: {"heading": "heading_deg", "pitch": "pitch_deg", "roll": "roll_deg"}.get(f, f) for f in FIELDS}

# Patterns are unanchored (see common.NUMBER_PATTERN): re.fullmatch / whole().
_BAND_LETTER = r"[C-HJ-NP-Xc-hj-np-x]"  # latitude bands C..X without I and O
_TIMESTAMP = (
    r"[1-9][0-9]{3}(?:(?:0[1-9]|1[0-2])(?:(?:0[1-9]|[12][0-9]|3[01])"
    r"(?:_(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:[0-5][0-9])?)?)?)?)?"
)


class AtNameError(ValueError):
    """A file name that does not follow the "@" format; `why` says what is wrong."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name!r}: {why}")
        self.why = why


class CoordinateError(ValueError):
    """A parsed name whose position cannot be used; `reason` is a catalog.REASONS code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AtName:
    """The fields of one "@" name; None where the field is empty."""

    utm_east: float | None  # metres
    utm_north: float | None  # metres
    utm_zone_number: int | None
    utm_zone_letter: str | None
    lat: float | None  # degrees
    lon: float | None  # degrees
    pano_id: str | None
    tile_num: int | None
    heading_deg: float | None  # as written, not normalised
    pitch_deg: float | None
    roll_deg: float | None
    height: float | None
    timestamp: str | None  # as written
    note: str | None
    extension: str  # e.g. ".jpg"; "" if none

    @property
    def captured_at(self) -> datetime | None:
        return timestamp_to_datetime(self.timestamp)


def parse_at_name(name: str) -> AtName:
    """Parse one file name (a leading folder path is ignored); raises AtNameError."""
    name = name.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    extension = name[dot:] if dot >= 0 else ""
    stem = name[: len(name) - len(extension)]
    if not stem.startswith("@"):
        raise AtNameError(name, "does not start with '@'")
    parts = stem.split("@")
    if len(parts) < 2 or parts[-1] != "":
        raise AtNameError(name, "does not end with '@' before the extension")
    texts = parts[1:-1]
    if len(texts) != len(FIELDS):
        raise AtNameError(name, f"has {len(texts)} '@' fields, expected {len(FIELDS)} ({'@'.join(FIELDS)})")
    values: dict[str, object] = {}
    for number, (field, text) in enumerate(zip(FIELDS, texts), start=1):
        if text == "":
            values[field] = None
        elif field in FLOAT_FIELDS or field in INT_FIELDS:
            values[field] = _number(name, number, field, text)
        else:
            values[field] = text
    return AtName(**{ATTRIBUTE[f]: v for f, v in values.items()}, extension=extension)  # type: ignore[arg-type]


def _number(name: str, number: int, field: str, text: str) -> float | int:
    """The value of number field `number` (1-based); AtNameError naming the field and text."""
    is_float = field in FLOAT_FIELDS
    kind = "a number" if is_float else "an integer"
    if not re.fullmatch(NUMBER_PATTERN if is_float else INT_PATTERN, text):
        raise AtNameError(name, f"field {number} ({field}) = {text!r} is not {kind}")
    try:  # the pattern admits only what float()/int() take; this keeps a slip a reject, not a crash
        return float(text) if is_float else int(text)
    except (ValueError, OverflowError) as err:
        raise AtNameError(name, f"field {number} ({field}) = {text!r} is not {kind} ({err})") from err


def timestamp_to_datetime(timestamp: str | None) -> datetime | None:
    """YYYY, YYYYMM, YYYYMMDD or YYYYMMDD_hh[mm[ss]] -> UTC datetime; anything else -> None."""
    if not timestamp or not re.fullmatch(_TIMESTAMP, timestamp):
        return None
    date, _, time = timestamp.partition("_")
    full = date + "0101"[len(date) - 4 :] + time.ljust(6, "0")
    try:
        return datetime.strptime(full, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:  # e.g. 30 February
        return None


def coordinates_of(at: AtName) -> tuple[float, float]:
    """(lat, lon) in degrees: lat/lon when both valid, else from UTM; raises CoordinateError."""
    found = locate([at])[0]
    if isinstance(found, CoordinateError):
        raise found
    return found


def locate(ats: list[AtName]) -> list[tuple[float, float] | CoordinateError]:
    """`coordinates_of` of [K] names, with one vectorised UTM conversion for all of them: (lat, lon)
    in degrees, or the CoordinateError that says why the name has no usable position."""
    found: list = [None] * len(ats)
    problems: list[list[str]] = [[] for _ in ats]
    need_utm = []
    for i, at in enumerate(ats):
        latlon_given = at.lat is not None or at.lon is not None
        utm_given = any(getattr(at, f) is not None for f in UTM_FIELDS)
        if not latlon_given and not utm_given:
            found[i] = CoordinateError("no_coordinates", "no lat/lon and no UTM fields")
            continue
        if latlon_given:
            problem = latlon_problem(at.lat, at.lon)
            if problem is None:
                found[i] = (at.lat, at.lon)
                continue
            problems[i].append(problem)
        if utm_given:
            need_utm.append(i)
    for i, position in zip(need_utm, _utm_positions([ats[i] for i in need_utm])):
        if isinstance(position, tuple):
            found[i] = position
        else:
            problems[i].append(position)
    return [f if f is not None else CoordinateError("bad_coordinates", "; ".join(p)) for f, p in zip(found, problems)]


def _utm_positions(ats: list[AtName]) -> list[tuple[float, float] | str]:
    """(lat, lon) in degrees from the UTM fields of [K] names, or why they give none."""
    found: list = [None] * len(ats)
    convert = []
    for i, at in enumerate(ats):
        missing = [f for f in UTM_FIELDS if getattr(at, f) is None]
        if missing:
            found[i] = f"UTM is incomplete ({', '.join(missing)} empty)"
        elif not re.fullmatch(_BAND_LETTER, at.utm_zone_letter):  # type: ignore[arg-type]
            found[i] = f"UTM zone letter {at.utm_zone_letter!r} is not a band C..X"
        elif not 1 <= at.utm_zone_number <= 60:  # type: ignore[operator]
            found[i] = f"{_utm_text(at)}: zone is not 1..60"
        else:
            convert.append(i)
    lat, lon, ok = utm_to_latlon(
        np.array([ats[i].utm_east for i in convert], dtype=np.float64),
        np.array([ats[i].utm_north for i in convert], dtype=np.float64),
        np.array([ats[i].utm_zone_number for i in convert], dtype=np.int64),
        is_northern_letter(np.array([ats[i].utm_zone_letter for i in convert], dtype="<U1")),
    )
    for j, i in enumerate(convert):
        problem = latlon_problem(float(lat[j]), float(lon[j])) if ok[j] else None
        if not ok[j]:
            found[i] = f"{_utm_text(ats[i])}: easting or northing is NaN or out of range"
        elif problem:
            found[i] = f"{_utm_text(ats[i])} gives {problem}"
        else:
            found[i] = (float(lat[j]), float(lon[j]))
    return found


def _utm_text(at: AtName) -> str:
    return f"UTM {at.utm_east} {at.utm_north} {at.utm_zone_number}{at.utm_zone_letter}"


def parse_at_names(names: pl.Series) -> pl.DataFrame:
    """Parse [N] file names at once.

    Returns:
        [N] rows: `ok` (bool, False where parse_at_name would raise), one column per
        AtName attribute except extension (f64 / i64 / str, null where the field is
        empty), and `captured_at_s` (i64 Unix seconds, null where the timestamp is
        unusable).  Fields are null on rows that are not ok.
    """
    frame = pl.DataFrame({"name": names.cast(pl.String)})
    return _parse_names(frame.with_columns(extension=_extension(pl.col("name"))))


def _parse_names(frame: pl.DataFrame, attributes: tuple[str, ...] | None = None) -> pl.DataFrame:
    """`parse_at_names` of the [N] rows of `frame` (columns name, extension).

    With `attributes` (AtName attribute names), only those field columns are returned, besides
    `ok` and `captured_at_s`, and fields of rows that are not ok are left as parsed (a reader
    drops those rows): every number field is still checked.
    """
    # A name is "@" + 14 fields joined by "@" + "@" + extension.  Split at the first 15 "@" into
    # "", the 14 fields and the rest: the rest is the extension exactly when the 15th "@" ends
    # the stem, so the stem has exactly 15 "@", its first and last characters.  (No count of the
    # "@" and no copy of the stem: a third of the time of the literal tests, one split stays.)
    at_signs = len(FIELDS) + 1
    texts = frame.select("extension", fields=pl.col("name").str.splitn("@", at_signs + 1)).unnest("fields")
    matched = ((pl.col("field_0") == "") & (pl.col(f"field_{at_signs}") == pl.col("extension"))).fill_null(False)

    typed, bad = [], []
    for number, field in enumerate(FIELDS, start=1):
        text = pl.col(f"field_{number}")
        if field in FLOAT_FIELDS or field in INT_FIELDS:
            value, is_bad = (parse_float if field in FLOAT_FIELDS else parse_int)(text)
            bad.append(is_bad)
        else:
            value = pl.when(text != "").then(text)
        if attributes is None or ATTRIBUTE[field] in attributes:
            typed.append(value.alias(ATTRIBUTE[field]))
    ok = matched & ~pl.any_horizontal(bad)
    timestamp = pl.col(f"field_{FIELDS.index('timestamp') + 1}")
    parsed = texts.select(ok.alias("ok"), *typed, captured_at_s=_timestamp_seconds(pl.when(timestamp != "")
                                                                                    .then(timestamp)))
    if attributes is None and not parsed["ok"].all():  # fields of names that are not ok are null
        parsed = parsed.with_columns(pl.when(pl.col("ok")).then(pl.col(a)).alias(a)
                                     for a in (*ATTRIBUTE.values(), "captured_at_s"))
    return parsed


def read_atname(root: str | Path, file_list: Path | None = None) -> IngestResult:
    """Catalog every file below `root` named in the "@" format (see the module docstring).

    With `file_list` (see placeforge.ingest.filelist) the files it names, relative to
    `root`, instead of a walk of the folder: nothing is listed or stat'ed.
    """
    root = open_root(SOURCE, root)
    if file_list is None:
        walked = list_files(root)
        relpaths, skipped = pl.Series(walked.relpaths, dtype=pl.String), walked.skipped
    else:
        relpaths, skipped = read_file_list_column(file_list)
    if not len(relpaths) and not skipped:
        where = f"file list {file_list} names no files" if file_list else "has no files"
        raise SourceError(f"{SOURCE} source {root} {where} (expected @...@.jpg images in any subfolder)")
    rejects = RejectLog()
    rejects.add_skipped(skipped)

    # In slices, so the parse's columns of text (14 fields a name) exist for one slice at a time.
    slices = [_read_names(relpaths.slice(start, SLICE_ROWS)) for start in range(0, len(relpaths), SLICE_ROWS)]
    del relpaths
    for kind in range(3):  # every slice's not_an_image, then bad_name, then coordinate rejects: one order
        for _, found in slices:
            rejects.add_frame(found[kind])
    candidates = pl.concat([c for c, _ in slices]) if slices else pl.DataFrame(schema={"relpath": pl.String,
                                                                                        "input": pl.String})
    del slices
    return finish(SOURCE, root, candidates, rejects, missing_reason="unreadable", stat_files=file_list is None)


SLICE_ROWS = 500_000  # names parsed at once: ~0.2 GB of transient text columns
# What the reader keeps of a name (and captured_at_s): positions, heading.  Other fields are only checked.
READER_ATTRIBUTES = ("utm_east", "utm_north", "utm_zone_number", "utm_zone_letter", "lat", "lon", "heading_deg")


def _read_names(relpaths: pl.Series) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Candidate rows of [N] listed paths, and the rejects (not_an_image, bad_name, coordinates)."""
    relpath = pl.col("relpath")
    files = pl.DataFrame({"relpath": relpaths}, schema={"relpath": pl.String})
    files = files.with_columns(name=relpath.str.split("/").list.last())  # (a regex with $ takes 6x as long)
    parent = relpath.str.head(relpath.str.len_chars() - pl.col("name").str.len_chars() - 1)
    files = files.with_columns(subset=pl.when(relpath.str.contains("/", literal=True)).then(parent))
    files = files.with_columns(extension=_extension(pl.col("name")))
    extension = pl.col("extension").str.to_lowercase()
    is_image = extension.is_in(sorted(IMAGE_EXTENSIONS))
    valid_list = ", ".join(sorted(IMAGE_EXTENSIONS))
    not_images = files.filter(~is_image).select(
        input="relpath", relpath="relpath", reason=pl.lit("not_an_image"),
        detail=pl.format("extension '{}' is not one of {}", extension, pl.lit(valid_list)),
    )  # fmt: skip
    files = files.filter(is_image)

    parsed = pl.concat([files.select("relpath", "subset", "name"),
                        _parse_names(files.select("name", "extension"), READER_ATTRIBUTES)], how="horizontal")
    del files
    bad = parsed.filter(~pl.col("ok"))
    bad_names = bad.select(
        input="relpath", relpath="relpath", reason=pl.lit("bad_name"),
        detail=pl.Series([name_problem(n) for n in bad["name"]], dtype=pl.String),
    )  # fmt: skip
    parsed = parsed.filter(pl.col("ok")).drop("ok", "name")

    lat, lon, usable = _resolve_coordinates(parsed)
    unplaced = parsed.filter(~usable)  # as parsed: lat/lon are replaced below
    problems = _coordinate_problems(unplaced)
    parsed = parsed.with_columns(lat=pl.Series(lat), lon=pl.Series(lon), usable=pl.Series(usable))
    unplaced = unplaced.select(
        input="relpath", relpath="relpath",
        reason=pl.Series([p[0] for p in problems], dtype=pl.String),
        detail=pl.Series([p[1] for p in problems], dtype=pl.String),
    )  # fmt: skip
    candidates = parsed.filter(pl.col("usable")).select(
        "relpath", "subset", "lat", "lon", "heading_deg", "captured_at_s", input="relpath"
    )
    return candidates, [not_images, bad_names, unplaced]


def _resolve_coordinates(parsed: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N] (lat, lon, usable) for parsed names, by the same rule as `coordinates_of`."""
    lat = parsed["lat"].fill_null(np.nan).to_numpy().copy()  # polars hands out read-only views
    lon = parsed["lon"].fill_null(np.nan).to_numpy().copy()
    from_latlon = valid_latlon(lat, lon)
    letter = parsed["utm_zone_letter"].fill_null("")
    utm_complete = (
        parsed["utm_east"].is_not_null() & parsed["utm_north"].is_not_null()
        & parsed["utm_zone_number"].is_not_null() & letter.str.contains(whole(_BAND_LETTER))
    ).to_numpy()  # fmt: skip
    need = np.flatnonzero(~from_latlon & utm_complete)  # usually none: lat/lon are given
    utm_lat, utm_lon, utm_ok = utm_to_latlon(
        parsed["utm_east"].to_numpy()[need],
        parsed["utm_north"].to_numpy()[need],
        parsed["utm_zone_number"].to_numpy()[need],
        is_northern_letter(letter.to_numpy()[need].astype("<U1")),
    )
    from_utm = need[utm_ok & valid_latlon(utm_lat, utm_lon)]
    lat[need], lon[need] = utm_lat, utm_lon
    usable = from_latlon.copy()
    usable[from_utm] = True
    return lat, lon, usable


# The scalar functions below only explain a rejection the vectorised code already made.
# Should the two ever disagree, that is a bug to report, but one file name must not stop
# the ingest: the file is still rejected, with a detail that says so.


def name_problem(name: str) -> str:
    """Why `name` is not a valid "@" name (for a reject's detail)."""
    try:
        parse_at_name(name)
    except AtNameError as err:
        return err.why
    return "not a valid '@' name for the vectorised parser, though parse_at_name accepts it (parser bug)"


def _coordinate_problems(unplaced: pl.DataFrame) -> list[tuple[str, str]]:
    """(reason, detail) of [K] parsed names (AtName columns) whose position the vectorised check refused."""
    given = [a for a in ATTRIBUTE.values() if a in unplaced.columns]  # `locate` reads lat/lon and UTM only
    empty = dict.fromkeys(ATTRIBUTE.values())
    ats = [AtName(**{**empty, **row}, extension="") for row in unplaced.select(given).iter_rows(named=True)]
    bug = ("bad_coordinates", "coordinates rejected by the vectorised check, though coordinates_of accepts them (bug)")
    return [(f.reason, f.detail) if isinstance(f, CoordinateError) else bug for f in locate(ats)]


def _extension(name: pl.Expr) -> pl.Expr:
    """Vectorised: the last dot and what follows it ("" if no dot), as in parse_at_name."""
    return name.str.extract(r"(\.[^.]*)$", 1).fill_null("")


def _timestamp_seconds(text: pl.Expr) -> pl.Expr:
    """Vectorised `timestamp_to_datetime`, as Unix seconds.

    Parsed once per distinct text: a dataset has a few hundred capture months, not millions.
    """
    distinct = text.unique(maintain_order=True)  # one order for the keys and their values
    return text.replace_strict(distinct, _timestamp_seconds_each(distinct), default=None, return_dtype=pl.Int64)


def _timestamp_seconds_each(text: pl.Expr) -> pl.Expr:
    length = text.str.len_chars()
    date = text.str.head(8)
    date = pl.when(length == 4).then(date + "0101").when(length == 6).then(date + "01").otherwise(date)
    full = date + text.str.slice(9).fill_null("").str.pad_end(6, "0")
    parsed = full.str.strptime(pl.Datetime("us", "UTC"), "%Y%m%d%H%M%S", strict=False)
    return pl.when(text.str.contains(whole(_TIMESTAMP))).then(parsed.dt.epoch("s"))
