"""The Mapillary SLS challenge's prediction file, from an evaluation's ranking.

    write_msls_submission(out / "msls_submission.txt", query_paths, database_paths, ranked)

The format of mapillary/mapillary_sls (evaluate.py and its example prediction files): lines
starting with "#" are comments; every other line is one query's key followed by its
predicted database keys, best first, separated by spaces.  A key is the image's file name
without its extension (MSLS stores images as `images/<key>.jpg`).  The challenge scores
Recall@1/5/10/20 and mAP@1/5/10/20, so at least 20 predictions per query are expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from placeforge.fileio import write_text_atomic

MIN_PREDICTIONS = 20  # the largest N the challenge scores


def msls_key(path: str) -> str:
    """`.../images/<key>.jpg` -> `<key>`; a key holds no spaces (a space would split the line)."""
    key = Path(path).stem
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"{path}: an MSLS key is the file name without extension and has no spaces")
    return key


def submission_text(query_paths: Sequence[str], database_paths: Sequence[str], ranked: np.ndarray) -> str:
    """The file's text.  ranked: [Q, K] indices into database_paths, best first; -1 (no
    candidate, e.g. an unreadable query) is left out of its line."""
    if len(query_paths) != len(ranked):
        raise ValueError(f"{len(query_paths)} queries but {len(ranked)} rows of predictions")
    lines = ["# placeforge predictions in the Mapillary SLS challenge format: each row is a query key",
             "# followed by its predicted database keys, best first (file names without extension)"]
    db_keys = [msls_key(p) for p in database_paths]
    for path, row in zip(query_paths, np.asarray(ranked)):
        lines.append(" ".join([msls_key(path), *(db_keys[i] for i in row if i >= 0)]))
    return "\n".join(lines) + "\n"


def write_msls_submission(path: Path, query_paths: Sequence[str], database_paths: Sequence[str],
                          ranked: np.ndarray) -> Path:
    """Write `submission_text` to `path` atomically; returns `path`."""
    write_text_atomic(path, submission_text(query_paths, database_paths, ranked))
    return path
