"""The MSLS reader on tiny real folders (raw.csv, postprocessed.csv, images/) in tmp_path."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from placeforge.catalog import image_id_for
from placeforge.ingest import SourceError, read_source
from tests.ingest_folders import (
    BERGEN,
    MELBOURNE,
    SAN_FRANCISCO,
    assert_position,
    read_checked,
    rejects_of,
    rows_of,
    write_jpeg,
)


def _msls_side(
    root: Path, folder: str, rows: list[tuple], files: list[bool] | None = None, post_keys=None
) -> list[str]:
    """Write raw.csv (rows of key, lat, lon, ca, captured_at ms), images, optional postprocessed.csv."""
    side = root / folder
    side.mkdir(parents=True, exist_ok=True)
    lines = [f"{i},{key},{lon},{lat},{ca},{ms},False" for i, (key, lat, lon, ca, ms) in enumerate(rows)]
    (side / "raw.csv").write_text(",key,lon,lat,ca,captured_at,pano\n" + "\n".join(lines) + "\n")
    if post_keys is not None:
        post = [f"{i},{k},500000,4000000,False,0" for i, k in enumerate(post_keys)]
        (side / "postprocessed.csv").write_text(",key,easting,northing,night,view_direction\n" + "\n".join(post) + "\n")
    relpaths = [f"{folder}/images/{row[0]}.jpg" for row in rows]
    for relpath, write in zip(relpaths, files or [True] * len(rows)):
        if write:
            write_jpeg(root / relpath)
    return relpaths


def test_msls_round_trip_and_train_val_as_root(tmp_path):
    root = tmp_path / "msls"
    query = _msls_side(
        root, "train_val/melbourne/query", [("qKey_1", *MELBOURNE, 370.0, 1438256016123)], post_keys=["qKey_1"]
    )
    db = _msls_side(
        root, "train_val/sf/database", [("dKey-2", *SAN_FRANCISCO, 45.5, 1262304000000), ("dKey3", *BERGEN, 0, 0)]
    )
    result = read_checked("msls", root)
    assert result.inputs == 3 and result.rejects.num_rows == 0 and result.warnings == ()
    rows = rows_of(result)
    assert_position(rows[query[0]], *MELBOURNE)
    assert_position(rows[db[0]], *SAN_FRANCISCO)
    assert_position(rows[db[1]], *BERGEN)
    assert rows[query[0]]["subset"] == "melbourne/query" and rows[db[0]]["subset"] == "sf/database"
    assert rows[query[0]]["heading_deg"] == 10.0 and rows[db[0]]["heading_deg"] == 45.5
    assert rows[query[0]]["captured_at"] == datetime(2015, 7, 30, 11, 33, 36, tzinfo=timezone.utc)
    via_train_val = read_checked("msls", root / "train_val")
    assert via_train_val.catalog["image_id"].to_pylist() == result.catalog["image_id"].to_pylist()
    assert set(via_train_val.catalog["dataset"].to_pylist()) == {"msls"}


def test_msls_rejects_each_bad_input_and_warns_on_postprocessed_mismatch(tmp_path):
    root = tmp_path / "msls"
    folder = "train_val/rome/query"
    relpaths = _msls_side(root, folder, [
        ("good", 41.9, 12.5, 0, 0),
        ("nofile", 41.9, 12.5, 0, 0),
        ("good", 41.9, 12.5, 0, 0),
        ("../../etc/passwd", 41.9, 12.5, 0, 0),
        ("badlat", "x", 12.5, 0, 0),
        ("farlat", 91, 12.5, 0, 0),
        ("nolat", "", "", 0, 0),
    ], files=[True, False, False, False, False, True, True], post_keys=["good", "other"])  # fmt: skip
    write_jpeg(root / folder / "images" / "stray.jpg")
    result = read_checked("msls", root)
    rejects = rejects_of(result)
    csv = f"{folder}/raw.csv"
    assert result.catalog["relpath"].to_pylist() == [relpaths[0]]
    assert rejects[f"{csv}:row 2"][0] == "missing_file"
    assert rejects[f"{csv}:row 3"] == ("duplicate", f"same image as {csv}:row 1")
    assert rejects[f"{csv}:row 4"] == ("bad_row", "key '../../etc/passwd' is not [A-Za-z0-9_-]+")
    assert rejects[f"{csv}:row 5"] == ("bad_row", "lat 'x' is not a number")
    assert rejects[f"{csv}:row 6"][0] == "bad_coordinates"
    assert rejects[f"{csv}:row 7"][0] == "no_coordinates"
    assert rejects[f"{folder}/images/stray.jpg"][0] == "not_in_metadata"
    assert len(result.warnings) == 1 and "only in postprocessed.csv" in result.warnings[0]
    assert result.inputs == 7 + 1


def test_msls_test_split_without_positions_is_no_coordinates(tmp_path):
    root = tmp_path / "msls"
    _msls_side(root, "train_val/sf/query", [("a1", *SAN_FRANCISCO, "", 1e30)])
    side = root / "test" / "kampala" / "query"
    side.mkdir(parents=True)
    (side / "raw.csv").write_text(",key,captured_at\n0,t1,0\n")
    write_jpeg(side / "images" / "t1.jpg")
    result = read_checked("msls", root)
    assert result.catalog.to_pylist()[0]["captured_at"] is None  # 1e30 ms is no date
    assert result.catalog.to_pylist()[0]["heading_deg"] is None
    assert rejects_of(result)["test/kampala/query/raw.csv:row 1"] == ("no_coordinates", "lat and lon are empty")
    assert result.rejects.to_pylist()[0]["image_id"] == image_id_for("msls", "test/kampala/query/images/t1.jpg")


def test_msls_without_train_val_is_a_source_error(tmp_path):
    (tmp_path / "msls" / "test").mkdir(parents=True)
    with pytest.raises(SourceError, match="has no train_val/ folder"):
        read_source("msls", tmp_path / "msls")
