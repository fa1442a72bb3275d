"""File lists: the images of a source named in a file instead of found by a folder walk.

A list stands in for `listing.list_files` where walking the tree is the slow part (SF-XL
has 41 M images, often on NFS).  It is either

    text      one path per line; blank lines and lines starting with '#' are ignored and
              surrounding whitespace (and a Windows '\\r') is stripped, so a name that
              starts with '#' or has outer spaces needs the Parquet form
    Parquet   a file named *.parquet with a string column `path`, one path per row

and every path is relative to the source's root (`find . -name '*.jpg'` output works:
'.' and empty components are dropped).  Lists are untrusted input.  Every listed path is
one input; the ones that cannot be used become rejects named "LIST:line N" (text) or
"LIST:row N" (Parquet), with the path in the detail:

    absolute path, or a '..' component           path_outside_root  (never opened, never
                                                 joined to the root)
    not UTF-8, a NUL byte, no name left ('./')   bad_name
    Parquet row whose path is null or empty      bad_row
    the same path again (after dropping '.')     duplicate          (the first is kept)

Nothing is opened or stat'ed here, nor by the readers for a list source: a listed file
that is missing, unreadable or too large is found when the shard build reads it (a
missing one is rejected as `unreadable`, "... does not exist", stage encode), and one
file listed under two names (a hard link, a symlink) is not found at all; byte-identical
images in one place sample still are, by the shard writer.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from placeforge.ingest.common import SourceError
from placeforge.ingest.listing import Listing, SkippedEntry, is_text, printable

PATH_COLUMN = "path"  # the column a Parquet list names its paths in


def read_file_list(list_path: Path) -> Listing:
    """The paths a file list names, checked to stay inside the root, sorted; opens no image.

    Args:
        list_path: a text list, or a Parquet list if its name ends in ".parquet".
    Returns:
        Listing whose `relpaths` are [N] normalised POSIX paths relative to the root (each
        once) and whose `skipped` entries are the listed paths set aside (see the module
        docstring); their `relpath` is the input name "LIST:line N".
    Raises:
        SourceError: the list cannot be read, or a Parquet list has no string `path` column.
    """
    if list_path.suffix == ".parquet":
        entries, skipped = _parquet_entries(list_path)
    else:
        entries, skipped = _text_entries(list_path)
    return _check_entries(entries, skipped)


def _text_entries(list_path: Path) -> tuple[pl.DataFrame, list[SkippedEntry]]:
    """(input, text) per non-blank, non-comment line, and the lines that are not UTF-8."""
    try:
        data = list_path.read_bytes()
    except OSError as err:
        raise SourceError(f"file list {list_path} cannot be read: {err.strerror}") from None
    skipped = []
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # rare: only then look for the lines that are not UTF-8, one by one
        lines = data.decode("utf-8", "surrogateescape").split("\n")
        for number, line in enumerate(lines, 1):
            if not is_text(line):
                skipped.append(SkippedEntry(f"{list_path.name}:line {number}", "bad_name",
                                            f"{printable(line)!r} is not valid UTF-8"))
                lines[number - 1] = ""
    frame = pl.DataFrame({"text": lines}, schema={"text": pl.String}).with_columns(
        input=_numbered(list_path, "line"),
        text=pl.col("text").str.strip_chars(),
    )
    frame = frame.filter((pl.col("text") != "") & ~pl.col("text").str.starts_with("#"))
    return frame.select("input", "text"), skipped


def _parquet_entries(list_path: Path) -> tuple[pl.DataFrame, list[SkippedEntry]]:
    """(input, text) per row of the `path` column, and the rows that have no path."""
    try:
        table = pq.read_table(list_path, columns=[PATH_COLUMN])
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise SourceError(f"file list {list_path} cannot be read as Parquet with a {PATH_COLUMN!r} column: "
                          f"{err}") from None
    column = table.column(PATH_COLUMN)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise SourceError(f"file list {list_path}: column {PATH_COLUMN!r} is {column.type}, not strings")
    frame = pl.DataFrame({"text": pl.from_arrow(column)}).with_columns(
        input=_numbered(list_path, "row"),
    )
    empty = pl.col("text").fill_null("") == ""
    skipped = [SkippedEntry(name, "bad_row", "path is empty") for name in frame.filter(empty)["input"]]
    return frame.filter(~empty).select("input", "text"), skipped


def _check_entries(entries: pl.DataFrame, skipped: list[SkippedEntry]) -> Listing:
    """Normalise (input, text) rows into relative paths; set aside the unsafe and the repeated."""
    text = pl.col("text")
    parts = text.str.split("/").list.eval(pl.element().filter((pl.element() != "") & (pl.element() != ".")))
    checks = [  # (condition, reason, detail); the first that holds is the reject
        (text.str.starts_with("/"), "path_outside_root", "absolute path; list paths relative to the source's root"),
        (text.str.contains(r"(^|/)\.\.(/|$)"), "path_outside_root", "'..' is not allowed in a listed path"),
        (text.str.contains("\x00", literal=True), "bad_name", "path holds a NUL byte"),
        (parts.list.len() == 0, "bad_name", "path names no file"),
    ]
    entries = entries.with_columns(
        relpath=parts.list.join("/"), reason=_first_that_holds(checks, 1), detail=_first_that_holds(checks, 2)
    )
    bad = entries.filter(pl.col("reason").is_not_null())
    for name, listed, why, says in bad.select("input", "text", "reason", "detail").iter_rows():
        skipped.append(SkippedEntry(name, why, f"{says}: {listed!r}; not opened"))
    entries = entries.filter(pl.col("reason").is_null())

    # The same path listed twice: keep the first, as a walk lists each file once.
    entries = entries.with_columns(first_input=pl.col("input").first().over("relpath"))
    repeated = entries.filter(~pl.col("relpath").is_first_distinct())
    for name, relpath, first in repeated.select("input", "relpath", "first_input").iter_rows():
        skipped.append(SkippedEntry(name, "duplicate", f"{relpath!r} is listed again (first at {first})"))
    relpaths = entries.filter(pl.col("relpath").is_first_distinct())["relpath"].sort()
    return Listing(relpaths.to_list(), skipped)


def _numbered(list_path: Path, unit: str) -> pl.Expr:
    """[N] input names "LIST:line 1", "LIST:line 2", ... (a list name may hold any character)."""
    return pl.concat_str(pl.lit(f"{list_path.name}:{unit} "), pl.int_range(1, pl.len() + 1).cast(pl.String))


def _first_that_holds(checks: list[tuple[pl.Expr, str, str]], field: int) -> pl.Expr:
    """checks[i][field] of the first check whose condition holds; null where none does."""
    expr = pl.when(checks[0][0]).then(pl.lit(checks[0][field]))
    for check in checks[1:]:
        expr = expr.when(check[0]).then(pl.lit(check[field]))
    return expr
