"""Test sets given by files: a list of database images, a list of queries, the right answers.

    entries = read_path_list(Path("queries.txt"))     # [L] paths relative to a root, in the file's order
    queries = restrict_split(read_split("atname:/data/q", "queries"), Path("/data/q"), entries, "queries.txt")
    database, queries = read_listed_test_set(ListedSide(root, db_entries, "db.txt"),
                                             ListedSide(root, query_entries, "queries.txt"),
                                             read_positives(Path("gt.npy"), len(query_entries)), "gt.npy")
    queries.ground_truth.positives[i]                 # database rows right for queries.paths[i]

Published protocols ship their ground truth (GSV-Cities' MSLS-val subset: a database list, a
query list, and per query the rows of the database list that are right).  A file indexes its
own lists' order, a Split is sorted by path, so each list row is first mapped through its path
to its row in the Split, then each query's positives through the database's map.

Every list row ends as an image of its Split or as a row of its rejects, with a reason:

    absolute path, or a '..' component      path_outside_root  (never opened)
    no file name, or a NUL byte              bad_name
    not an image by its extension            not_an_image
    nothing at the path                      missing_file
    not a regular file, unreadable, huge     unreadable, too_large
    the same path again                      duplicate  (one image, under its first row; for a
                                             query, the first row's positives are the ones used)

A positive whose database image is set aside is dropped and counted
(`GroundTruth.positives_set_aside`).  A query left with no positive stays in the denominator, a
miss at every N, as GSV-Cities' `get_validation_recalls` divides by every query.  A query whose
own image is set aside is not evaluated (it is in the rejects, and the report counts the
queries that were).

List files (`read_path_list`): a .npy array of strings, or text with one path per line (blank
lines and lines starting with '#' skipped, outer whitespace stripped).  Ground-truth files
(`read_positives`): a .npy with one integer list per query row (GSV-Cities' pickled object
array, read by evaluation/npy_safe.py without running its pickle), or text with one line per
query row holding the right database-list rows, separated by spaces or commas, an empty line
for none (lines starting with '#' skipped).  Rows count from 0 in both, in the lists' order.

VPR-Bench's template (MubarizZaffar/VPR-Bench, evaluate_vpr_techniques.py and
performance_comparison.py) ships no lists: `ref/` and `query/` hold `<integer>.jpg`, read in
numeric order, and `ground_truth_new.npy` is a pickled [Q, 2] object array whose row i is
[i, list of the right rows of ref/] for the i-th query.  `numbered_images` turns a folder into
the list that order implies, `read_vprbench_positives` the file into one int array per query.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from placeforge.catalog import IMAGE_EXTENSIONS, REJECTS_SCHEMA, concat, rejects_table
from placeforge.evaluation.npy_safe import load_index_lists, load_npy
from placeforge.evaluation.testset import GroundTruth, Split
from placeforge.ingest.common import SourceError
from placeforge.ingest.listing import check_files, list_files


@dataclass(frozen=True)
class ListedSide:
    """One side of a test set named by a list: paths relative to `root`, in the list's order."""

    root: Path
    entries: list[str]  # [L] as listed
    list_name: str  # the list as rejects name it: "LIST:row N"


@dataclass(frozen=True)
class ListedImages:
    """What `list_images` found for one list."""

    paths: list[str]  # [M] absolute image paths, sorted, each once: the usable listed images
    rows: np.ndarray  # [L] int64: each list row's index into `paths`; -1 where set aside
    rejects: pa.Table  # catalog.REJECTS_SCHEMA rows of the list rows set aside


def read_path_list(path: Path) -> list[str]:
    """[L] listed paths in the file's order: a .npy array of strings, or text, one path per line.

    Raises:
        SourceError: the file cannot be read, or is a .npy that is not a 1-D array of strings.
    """
    try:
        if path.suffix == ".npy":
            array = load_npy(path)
            if array.ndim != 1 or not (array.dtype.kind == "U" or (array.dtype.kind == "O" and all(
                    isinstance(item, str) for item in array))):
                raise SourceError(f"list {path}: expected a 1-D array of path strings, got {array.dtype} "
                                  f"of shape {array.shape}")
            return [str(item) for item in array]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, SourceError):
            raise
        raise SourceError(f"list {path} cannot be read: {err}") from None
    lines = (line.strip() for line in text.split("\n"))
    return [line for line in lines if line and not line.startswith("#")]


def read_positives(path: Path, rows: int) -> list[np.ndarray]:
    """[rows] int64 arrays: the database-list rows right for each query-list row.

    Raises:
        SourceError: the file cannot be read, a row is not a list of row numbers, or the file
            does not hold `rows` rows.
    """
    try:
        if path.suffix == ".npy":
            positives = load_index_lists(path)
        else:
            positives = _text_positives(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, SourceError):
            raise
        raise SourceError(f"ground truth {path} cannot be read: {err}") from None
    if len(positives) != rows:
        raise SourceError(f"ground truth {path} has {len(positives)} rows for {rows} listed queries; "
                          "it needs one row per query, in the query list's order")
    return positives


def read_vprbench_positives(path: Path) -> list[np.ndarray]:
    """[Q] int64 arrays from VPR-Bench's ground_truth_new.npy: row i is [i, [right ref rows]].

    Raises:
        SourceError: not a [Q, 2] array, a row whose first entry is not its own number, or a
            second entry that is not a list of non-negative row numbers; a pickle that names
            anything but NumPy's array parts is refused without being run (evaluation/npy_safe.py).
    """
    try:
        table = load_npy(path)
    except (OSError, ValueError) as err:
        raise SourceError(f"ground truth {path} cannot be read: {err}") from None
    if table.ndim != 2 or table.shape[1] != 2:
        raise SourceError(f"ground truth {path}: expected VPR-Bench's [queries, 2] array (query number, right "
                          f"ref rows), got shape {table.shape}")
    positives = []
    for row, (number, right) in enumerate(table):
        if isinstance(number, (bool, np.bool_)) or not isinstance(number, (int, np.integer)) or number != row:
            raise SourceError(f"ground truth {path} row {row}: the query number is {number!r}, not {row}; VPR-Bench "
                              "reads row i as the i-th query in numeric order")
        values = np.asarray(right)
        if values.ndim != 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)) or (
                values.size and values.min() < 0):
            raise SourceError(f"ground truth {path} row {row}: {str(right)[:80]} is not a list of ref row numbers "
                              "(0-based)")
        positives.append(values.astype(np.int64))
    return positives


def numbered_images(root: Path, folder: str) -> tuple[list[str], pa.Table]:
    """VPR-Bench's image list of ROOT/folder: `folder/<integer>.jpg` in numeric order, and rejects.

    Only `.jpg` files directly in the folder are its images (its glob); another image file there
    is a `bad_name` reject, as is a `.jpg` whose name is not a number.  The numbers must be
    0..n-1, each once: the ground truth indexes images by their place in numeric order, so a
    missing image would move every later one onto another image's answers.

    Raises:
        SourceError: the numbers are not 0..n-1, or no image is numbered.
    """
    numbered: dict[int, str] = {}
    set_aside = []
    for rel in list_files(root, folder).relpaths:
        name = rel[len(folder) + 1:]
        stem, dot, extension = name.rpartition(".")
        if "/" in name or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            continue  # not an input: VPR-Bench reads the folder's own *.jpg only
        if extension != "jpg" or not dot or not (stem.isascii() and stem.isdigit()):
            set_aside.append((rel, "bad_name", "VPR-Bench reads <integer>.jpg (evaluate_vpr_techniques.py); "
                                               "not one of its images"))
        elif int(stem) in numbered:
            raise SourceError(f"{root / folder}: {numbered[int(stem)]} and {rel} are both image number {int(stem)}")
        else:
            numbered[int(stem)] = rel
    if not numbered:
        raise SourceError(f"{root / folder} has no images named <integer>.jpg (VPR-Bench's template)")
    gaps = sorted(set(range(len(numbered))) - set(numbered))
    if gaps:
        raise SourceError(f"{root / folder} holds {len(numbered)} numbered images, but not the numbers "
                          f"0..{len(numbered) - 1} (first missing: {gaps[0]}); the ground truth indexes images by "
                          "their place in numeric order, so a gap would move every later image onto another's "
                          "answers: complete the folder")
    return [numbered[number] for number in range(len(numbered))], _rejects(root, set_aside)


def _text_positives(text: str, path: Path) -> list[np.ndarray]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last row
    positives = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line.startswith("#"):
            continue
        words = line.replace(",", " ").split()
        if not all(word.isascii() and word.isdigit() for word in words):
            raise SourceError(f"ground truth {path} line {number}: {line[:80]!r} is not a list of database-list "
                              "row numbers (0-based, separated by spaces or commas)")
        positives.append(np.array([int(word) for word in words], dtype=np.int64))
    return positives


def list_images(side: ListedSide) -> ListedImages:
    """The usable images a list names below its root, and each list row's place among them.

    Raises:
        SourceError: the root is not a folder.
    """
    if not side.root.is_dir():
        raise SourceError(f"the images of {side.list_name} are looked for below {side.root}, which is not a folder")
    root = side.root.resolve()
    first: dict[str, int] = {}  # relative path -> the first row naming it
    relpaths: list[str | None] = []  # [L] normalised; None where the path itself is refused
    set_aside: list[tuple[str, str, str]] = []  # (input, reason, detail)
    for row, entry in enumerate(side.entries):
        rel, problem = _normalise(entry)
        relpaths.append(rel)
        if problem is not None:
            set_aside.append((f"{side.list_name}:row {row}", problem[0], f"{problem[1]}: {entry!r}; not opened"))
        elif rel in first:
            set_aside.append((f"{side.list_name}:row {row}", "duplicate",
                              f"{rel!r} is listed again (first at row {first[rel]}): one image, under its first row"))
        else:
            first[rel] = row
    listed = sorted(first)
    usable = []
    for rel, problem in zip(listed, check_files(root, listed, "missing_file").problem):
        if problem is None:
            usable.append(rel)
        else:
            set_aside.append((rel, problem[0], f"{problem[1]} (listed at {side.list_name}:row {first[rel]})"))
    index = {rel: i for i, rel in enumerate(usable)}
    rows = np.array([-1 if rel is None else index.get(rel, -1) for rel in relpaths], dtype=np.int64)
    return ListedImages([str(root / rel) for rel in usable], rows, _rejects(root, set_aside))


def remap_positives(positives: list[np.ndarray], query_rows: np.ndarray, database_rows: np.ndarray,
                    num_queries: int) -> tuple[list[np.ndarray], int]:
    """Positives in the files' order -> positives in the Splits' order.

    Args:
        positives: [Lq] int arrays of database-list rows, one per query-list row.
        query_rows: [Lq] each query-list row's index in the queries Split; -1: set aside.
        database_rows: [Ld] each database-list row's index in the database Split; -1: set aside.
        num_queries: Q, the length of the queries Split (every index of it occurs in query_rows).
    Returns:
        [Q] ascending int64 arrays of database-Split rows, and how many listed positives of the
        evaluated queries name a database image that was set aside (dropped).
    Raises:
        SourceError: not one list per query row, or a row number beyond the database list.
    """
    if len(positives) != len(query_rows):
        raise SourceError(f"{len(positives)} rows of positives for {len(query_rows)} listed queries")
    remapped: list[np.ndarray | None] = [None] * num_queries
    dropped = 0
    for row, (query, listed) in enumerate(zip(query_rows, positives)):
        listed = np.asarray(listed, dtype=np.int64)
        if listed.size and (listed.min() < 0 or listed.max() >= len(database_rows)):
            bad = listed.min() if listed.min() < 0 else listed.max()
            raise SourceError(f"query row {row} names database row {bad}; the database list has rows "
                              f"0..{len(database_rows) - 1}")
        if query < 0 or remapped[query] is not None:  # set aside, or listed again: its first row counts
            continue
        rows = database_rows[listed]
        dropped += int((rows < 0).sum())
        remapped[query] = np.unique(rows[rows >= 0])
    if any(p is None for p in remapped):
        raise ValueError("query_rows does not cover every row of the queries Split")
    return remapped, dropped


def read_listed_test_set(database: ListedSide, queries: ListedSide, positives: list[np.ndarray] | None,
                         source: str) -> tuple[Split, Split]:
    """Database and queries Splits of the listed images; `positives` (None: no labels) per
    query-list row as database-list rows become the queries' `ground_truth`, named `source`.

    Raises:
        SourceError: a side with no usable image, or positives that do not fit the lists.
    """
    db, q = list_images(database), list_images(queries)
    for name, side, listed in (("database", database, db), ("queries", queries, q)):
        if not listed.paths:
            example = f", e.g. {listed.rejects.column('detail')[0]}" if listed.rejects.num_rows else ""
            raise SourceError(f"{name}: none of the {len(side.entries)} images listed in {side.list_name} is usable "
                              f"below {side.root}{example}")
    ground_truth = None
    if positives is not None:
        try:
            remapped, dropped = remap_positives(positives, q.rows, db.rows, len(q.paths))
        except SourceError as err:
            raise SourceError(f"ground truth {source}: {err}") from None
        ground_truth = GroundTruth(remapped, db.paths, source, dropped)
    return (Split("database", db.paths, None, None, db.rejects),
            Split("queries", q.paths, None, None, q.rejects, ground_truth=ground_truth))


def restrict_split(split: Split, root: Path, entries: list[str], list_name: str) -> Split:
    """The images of `split` that the list names (paths relative to `root`), in the Split's order.

    A listed path that is not among them becomes a reject: missing_file, unreadable or
    too_large by the file, else not_in_metadata (the reader set it aside, or a subset left it out).

    Raises:
        SourceError: no listed path is among the split's images.
    """
    index = {path: i for i, path in enumerate(split.paths)}
    bases = dict.fromkeys((os.path.abspath(root), str(root.resolve())))  # catalog readers / atname spell roots so
    seen: dict[str, int] = {}
    keep, unmatched, set_aside = set(), [], []
    for row, entry in enumerate(entries):
        rel, problem = _normalise(entry)
        if problem is not None:
            set_aside.append((f"{list_name}:row {row}", problem[0], f"{problem[1]}: {entry!r}; not opened"))
            continue
        if rel in seen:
            set_aside.append((f"{list_name}:row {row}", "duplicate", f"{rel!r} is listed again (first at row "
                                                                     f"{seen[rel]})"))
            continue
        seen[rel] = row
        found = [index[path] for path in (os.path.join(base, rel) for base in bases) if path in index]
        if found:
            keep.add(found[0])
        else:
            unmatched.append(rel)
    for rel, problem in zip(unmatched, check_files(root.resolve(), unmatched, "missing_file").problem):
        reason, detail = problem or ("not_in_metadata", f"{rel} is not among the {split.name} images read from "
                                                        f"{root} (set aside by the reader, or outside the subset)")
        set_aside.append((rel, reason, f"{detail} (listed at {list_name}:row {seen[rel]})"))
    if not keep:
        example = f", e.g. {set_aside[0][2]}" if set_aside else ""
        raise SourceError(f"{split.name}: none of the {len(entries)} paths listed in {list_name} is among the "
                          f"{len(split)} images below {root}{example}")
    rows = np.array(sorted(keep), dtype=np.int64)
    rejects = [t for t in (split.rejects, _rejects(root, set_aside)) if t is not None]
    return dataclasses.replace(
        split, paths=[split.paths[i] for i in rows],
        east_north=None if split.east_north is None else split.east_north[rows],
        zone=None if split.zone is None else split.zone[rows], rejects=concat(rejects, REJECTS_SCHEMA))


def _normalise(entry: str) -> tuple[str | None, tuple[str, str] | None]:
    """A listed path -> (POSIX path relative to the root, None), or (None, (reason, detail))."""
    parts = [part for part in entry.split("/") if part not in ("", ".")]
    if entry.startswith("/"):
        return None, ("path_outside_root", "absolute path; list paths relative to the root")
    if ".." in parts:
        return None, ("path_outside_root", "'..' is not allowed in a listed path")
    if "\x00" in entry:
        return None, ("bad_name", "path holds a NUL byte")
    if not parts:
        return None, ("bad_name", "path names no file")
    rel = "/".join(parts)
    if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
        return None, ("not_an_image", f"not an image by its extension ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return rel, None


def _rejects(root: Path, set_aside: list[tuple[str, str, str]]) -> pa.Table:
    return rejects_table({"input": name, "source": "list", "dataset": root.name, "stage": "ingest",
                          "reason": reason, "detail": detail} for name, reason, detail in set_aside)
