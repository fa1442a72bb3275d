"""Reader for Google Landmarks v2, the train_clean subset (format name "gldv2").

Layout:
    train_clean.csv                 landmark_id,images   (images: space-separated ids)
    train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg

Inputs are the image ids listed in train_clean.csv.  Files under train/ that it does
not list are outside the clean subset (GLDv2's full train set is ~4.1 M images, the
clean one ~1.6 M): they are not inputs and are neither listed nor reported.  A row
that lists no image at all is one input, rejected as bad_row.

    id that is not 3+ characters of [0-9a-f]   bad_row (names from the CSV are untrusted;
                                               this is what keeps a path inside train/)
    landmark_id that is not an integer         bad_row, for every id of that row
    id whose file does not exist               missing_file
    id listed again (in any row)               duplicate

Rejects name the row ("train_clean.csv:row N", data rows counted from 1) and the id in
the detail.  There is no GPS: lat/lon/UTM are null; `source_place_id` is the
landmark id, `subset` is "train_clean".
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from placeforge.ingest.common import (
    IngestResult,
    RejectLog,
    SourceError,
    finish,
    missing_columns,
    open_root,
    problems,
    read_csv_strings,
    reject_rows,
    reject_unlisted,
    row_labels,
    whole,
)
from placeforge.ingest.filelist import read_file_list_column

SOURCE = "gldv2"
CSV_NAME = "train_clean.csv"
COLUMNS = ("landmark_id", "images")
_IMAGE_ID = r"[0-9a-f]{3,}"
_LANDMARK_ID = r"[0-9]{1,18}"


def read_gldv2(root: str | Path, file_list: Path | None = None) -> IngestResult:
    """Catalog the train_clean subset of a GLDv2 folder (see the module docstring).

    With `file_list` (see placeforge.ingest.filelist; paths like "train/0/0/0/000abc.jpg",
    relative to `root`) the list says which files exist: no image is stat'ed and an id
    whose file is not listed is missing_file.  Listed files the CSV does not name are not
    inputs (as files under train/ are not); listed paths that are unsafe or repeated are.
    """
    root = open_root(SOURCE, root)
    if not (root / CSV_NAME).is_file():
        raise SourceError(f"{SOURCE} source {root} has no {CSV_NAME}")
    if not (root / "train").is_dir():
        raise SourceError(f"{SOURCE} source {root} has no train/ folder")
    rejects = RejectLog()
    try:
        table = read_csv_strings(root / CSV_NAME)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise SourceError(f"{SOURCE} source {root}: {CSV_NAME} cannot be read as CSV: {err}") from err
    rows = table.with_columns(row_labels(CSV_NAME, table.height))
    absent = missing_columns(table, COLUMNS)
    if absent:
        raise SourceError(f"{SOURCE} source {root}: {CSV_NAME} has no column(s) {', '.join(absent)}")

    ids = rows.select(
        "input",
        pl.col("landmark_id").fill_null(""),
        pl.col("images").fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != "")),
    )
    empty = ids.filter(pl.col("images").list.len() == 0)
    reject_rows(rejects, empty, "bad_row", "row lists no images")
    ids = ids.filter(pl.col("images").list.len() > 0).explode("images").rename({"images": "image_id"})

    landmark = pl.col("landmark_id")
    image = pl.col("image_id")
    id_ok = image.str.contains(whole(_IMAGE_ID))
    ids = ids.with_columns(
        relpath=pl.when(id_ok).then(pl.format("train/{}/{}/{}/{}.jpg", image.str.slice(0, 1),
                                              image.str.slice(1, 1), image.str.slice(2, 1), image)),
        problem=problems([
            (~id_ok, pl.format("image id '{}' is not 3+ characters of [0-9a-f]", image)),
            (~landmark.str.contains(whole(_LANDMARK_ID)),
             pl.format("landmark_id '{}' (of image {}) is not a non-negative integer", landmark, image)),
        ]),
        source_place_id=landmark.cast(pl.Int64, strict=False).cast(pl.String),
        subset=pl.lit("train_clean"),
    )  # fmt: skip
    malformed = pl.col("problem") != ""
    reject_rows(rejects, ids.filter(malformed), "bad_row", pl.col("problem"))
    candidates = ids.filter(~malformed).select("input", "relpath", "subset", "source_place_id")
    if file_list is not None:
        relpaths, skipped = read_file_list_column(file_list)
        rejects.add_skipped(skipped)
        candidates = reject_unlisted(candidates, relpaths, rejects, f"file list {file_list.name}")
    return finish(SOURCE, root, candidates, rejects, missing_reason="missing_file", stat_files=file_list is None)
