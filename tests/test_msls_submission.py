"""The Mapillary SLS challenge's prediction file (evaluation.msls_submission)."""

from __future__ import annotations

import numpy as np
import pytest

from placeforge.evaluation.msls_submission import msls_key, submission_text, write_msls_submission


def parse(text: str) -> dict[str, list[str]]:
    """Read it back the way the challenge's evaluator does: '#' lines are comments, then key and predictions."""
    rows = [line.split(" ") for line in text.splitlines() if line and not line.startswith("#")]
    return {row[0]: row[1:] for row in rows}


def test_rows_are_query_keys_then_database_keys_best_first(tmp_path):
    queries = ["/msls/val/cph/query/images/Qa.jpg", "/msls/val/cph/query/images/Qb-_x.jpg", "/q/Qc.jpg"]
    database = [f"/msls/val/cph/database/images/D{i}.jpg" for i in range(4)]
    ranked = np.array([[2, 0, 3], [1, -1, -1], [-1, -1, -1]])  # -1: no candidate
    path = write_msls_submission(tmp_path / "msls_submission.txt", queries, database, ranked)
    text = path.read_text()
    assert text.startswith("# ") and text.endswith("\n")
    assert parse(text) == {"Qa": ["D2", "D0", "D3"], "Qb-_x": ["D1"], "Qc": []}
    assert list(parse(text)) == ["Qa", "Qb-_x", "Qc"]  # one line per query, in the given order


def test_keys_that_would_break_the_format_are_refused():
    assert msls_key("a/b/images/xY_9-z.jpg") == "xY_9-z"
    with pytest.raises(ValueError, match="no spaces"):
        msls_key("images/two words.jpg")
    with pytest.raises(ValueError, match="2 queries but 1 rows"):
        submission_text(["a.jpg", "b.jpg"], ["d.jpg"], np.zeros((1, 1), dtype=int))
