"""The GLDv2 reader on a tiny real folder (train_clean.csv + train/a/b/c/) in tmp_path."""

from __future__ import annotations

import pytest

from placeforge.ingest import SourceError, read_source
from tests.ingest_folders import read_checked, rows_of, write_jpeg


def _gld_path(image_id: str) -> str:
    return f"train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def test_gldv2_round_trip_and_bad_inputs(tmp_path):
    root = tmp_path / "gldv2"
    ids = ["0123456789abcdef", "fedcba9876543210", "abcabcabcabcabc1"]
    for i in ids:
        write_jpeg(root / _gld_path(i))
    write_jpeg(root / _gld_path("1111111111111111"))  # not in train_clean: outside the subset, not an input
    (root / "train_clean.csv").write_text(
        "landmark_id,images\n"
        f"7,{ids[0]} {ids[1]}\n"
        f"8,{ids[2]} 2222222222222222 ../../../etc/passwd ABCDEF0123456789\n"
        f"9,{ids[0]}\n"
        "10,\n"
        f"x,3333333333333333\n"
    )
    first, second = read_checked("gldv2", root), read_checked("gldv2", root)
    assert first.catalog["image_id"].to_pylist() == second.catalog["image_id"].to_pylist()
    rows = rows_of(first)
    assert sorted(rows) == sorted(_gld_path(i) for i in ids)
    assert rows[_gld_path(ids[2])]["source_place_id"] == "8"
    assert all(r["lat"] is None and r["utm_zone"] is None for r in rows.values())
    rejects = first.rejects.to_pylist()
    by_detail = {(r["input"], r["reason"]): r["detail"] for r in rejects}
    assert "2222222222222222" in by_detail[("train_clean.csv:row 2", "missing_file")]
    assert by_detail[("train_clean.csv:row 3", "duplicate")] == "same image as train_clean.csv:row 1"
    assert by_detail[("train_clean.csv:row 4", "bad_row")] == "row lists no images"
    assert "landmark_id 'x'" in by_detail[("train_clean.csv:row 5", "bad_row")]
    row2_bad = [r["detail"] for r in rejects if r["input"] == "train_clean.csv:row 2" and r["reason"] == "bad_row"]
    assert sorted(row2_bad) == [
        "image id '../../../etc/passwd' is not 3+ characters of [0-9a-f]",
        "image id 'ABCDEF0123456789' is not 3+ characters of [0-9a-f]",
    ]
    assert first.inputs == 2 + 4 + 1 + 1 + 1  # ids per row; the empty row counts once


def test_gldv2_without_csv_is_a_source_error(tmp_path):
    (tmp_path / "gld" / "train").mkdir(parents=True)
    with pytest.raises(SourceError, match="has no train_clean.csv"):
        read_source("gldv2", tmp_path / "gld")
