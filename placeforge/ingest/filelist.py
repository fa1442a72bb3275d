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
    relpaths, skipped = read_file_list_column(list_path)
    return Listing(relpaths.to_list(), skipped)


def read_file_list_column(list_path: Path) -> tuple[pl.Series, list[SkippedEntry]]:
    """`read_file_list` with the paths as one polars String column, the form readers use: a list
    of 41 M paths as Python strings would cost ~6 GB and most of the time."""
    if list_path.suffix == ".parquet":
        entries, skipped = _parquet_entries(list_path)
        unit = "row"
    else:
        entries, skipped = _text_entries(list_path)
        unit = "line"
    return _check_entries(entries, skipped, f"{list_path.name}:{unit} ")


def _text_entries(list_path: Path) -> tuple[pl.DataFrame, list[SkippedEntry]]:
    """(number, text) per non-blank, non-comment line, and the lines that are not UTF-8."""
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
        number=pl.int_range(1, pl.len() + 1, dtype=pl.Int64),
        text=pl.col("text").str.strip_chars(),
    )
    frame = frame.filter((pl.col("text") != "") & ~pl.col("text").str.starts_with("#"))
    return frame.select("number", "text"), skipped


def _parquet_entries(list_path: Path) -> tuple[pl.DataFrame, list[SkippedEntry]]:
    """(number, text) per row of the `path` column, and the rows that have no path."""
    try:
        schema = pq.read_schema(list_path)
        kind = schema.field(PATH_COLUMN).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise SourceError(f"file list {list_path}: column {PATH_COLUMN!r} is {kind}, not strings")
        # polars reads the column straight into its own string layout (pyarrow + conversion: ~2x the time)
        frame = pl.read_parquet(list_path, columns=[PATH_COLUMN]).rename({PATH_COLUMN: "text"})
    except (OSError, pa.ArrowInvalid, KeyError, pl.exceptions.PolarsError) as err:
        raise SourceError(f"file list {list_path} cannot be read as Parquet with a {PATH_COLUMN!r} column: "
                          f"{err}") from None
    frame = frame.with_columns(number=pl.int_range(1, pl.len() + 1, dtype=pl.Int64))
    empty = pl.col("text").fill_null("") == ""
    skipped = [SkippedEntry(f"{list_path.name}:row {n}", "bad_row", "path is empty")
               for n in frame.filter(empty)["number"]]
    return frame.filter(~empty).select("number", "text"), skipped


def _check_entries(entries: pl.DataFrame, skipped: list[SkippedEntry], prefix: str) -> tuple[pl.Series, list[SkippedEntry]]:
    """Normalise (number, text) rows into relative paths; set aside the unsafe and the repeated.

    Input names ("LIST:line N": `prefix` + number) are made only for the entries set aside.
    """
    text = pl.col("text")
    # Only a path with an empty or '.' component ("./a", "a//b", "a/") needs the split and
    # rejoin; nearly every listed path is already normal and is kept as it is.  (Literal tests:
    # the one regex (^|/)\.?(/|$) takes twice as long.)
    relpath = entries["text"]
    messy = (
        relpath.str.contains("//", literal=True) | relpath.str.contains("/./", literal=True)
        | relpath.str.starts_with("/") | relpath.str.starts_with("./") | relpath.str.ends_with("/")
        | relpath.str.ends_with("/.") | relpath.is_in([".", ""])
    ).arg_true()  # fmt: skip
    if len(messy):
        kept_parts = pl.element().filter((pl.element() != "") & (pl.element() != "."))
        normal = relpath.gather(messy).str.split("/").list.eval(kept_parts).list.join("/")
        relpath = relpath.scatter(messy, normal)
    checks = [  # (condition, reason, detail); the first that holds is the reject
        (text.str.starts_with("/"), "path_outside_root", "absolute path; list paths relative to the source's root"),
        (text.str.contains(r"(^|/)\.\.(/|$)"), "path_outside_root", "'..' is not allowed in a listed path"),
        (text.str.contains("\x00", literal=True), "bad_name", "path holds a NUL byte"),
        (pl.col("relpath") == "", "bad_name", "path names no file"),
    ]
    entries = entries.with_columns(relpath=relpath).with_columns(reason=_first_that_holds(checks, 1))
    bad = entries.filter(pl.col("reason").is_not_null())
    if bad.height:
        bad = bad.with_columns(detail=_first_that_holds(checks, 2))
        for number, listed, why, says in bad.select("number", "text", "reason", "detail").iter_rows():
            skipped.append(SkippedEntry(f"{prefix}{number}", why, f"{says}: {listed!r}; not opened"))
        entries = entries.filter(pl.col("reason").is_null())

    # The same path listed twice: keep the first, as a walk lists each file once.
    entries = entries.select("number", "relpath")
    first = entries["relpath"].is_first_distinct()
    repeated = entries.filter(~first)
    if repeated.height:
        firsts = entries.filter(first & pl.col("relpath").is_in(repeated["relpath"].unique()))
        repeated = repeated.join(firsts.rename({"number": "first"}), on="relpath", how="left", maintain_order="left")
        for number, relpath, first_number in repeated.select("number", "relpath", "first").iter_rows():
            skipped.append(SkippedEntry(f"{prefix}{number}", "duplicate",
                                        f"{relpath!r} is listed again (first at {prefix}{first_number})"))
    # Sorting moves only the strings' 16-byte views: their bytes stay in listing order, so every
    # later pass over the sorted paths would read memory at random (at 5 M paths the name parse and
    # the image-id hashing took ~1.3x as long).  One copy puts the bytes in sorted order.
    relpaths = entries.filter(first)["relpath"].sort()
    return pl.Series(relpaths.name, relpaths.to_arrow(compat_level=pl.CompatLevel.oldest()), dtype=pl.String), skipped


def _first_that_holds(checks: list[tuple[pl.Expr, str, str]], field: int) -> pl.Expr:
    """checks[i][field] of the first check whose condition holds; null where none does."""
    expr = pl.when(checks[0][0]).then(pl.lit(checks[0][field]))
    for check in checks[1:]:
        expr = expr.when(check[0]).then(pl.lit(check[field]))
    return expr
