"""The GSV-Cities reader on tiny real folders (Dataframes/*.csv + Images/) in tmp_path."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from placeforge.ingest import SourceError, read_source
from tests.ingest_folders import (
    BERGEN,
    MELBOURNE,
    SAN_FRANCISCO,
    WEST_OF_120W,
    assert_position,
    read_checked,
    rejects_of,
    rows_of,
    write_jpeg,
)

GSV_HEADER = "place_id,year,month,northdeg,city_id,lat,lon,panoid\n"


def _gsv_name(city, place_id, year, month, northdeg, lat, lon, panoid) -> str:
    place = f"{place_id:07d}" if isinstance(place_id, int) else place_id
    return f"Images/{city}/{city}_{place}_{year}_{month:02d}_{northdeg:03d}_{lat}_{lon}_{panoid}.jpg"


def _gsv(root: Path, city: str, rows: list[tuple], files: bool | list[bool] = True) -> list[str]:
    (root / "Dataframes").mkdir(parents=True, exist_ok=True)
    lines = [",".join(str(v) for v in (p, y, m, n, city, la, lo, pano)) for p, y, m, n, la, lo, pano in rows]
    (root / "Dataframes" / f"{city}.csv").write_text(GSV_HEADER + "\n".join(lines) + "\n")
    relpaths = [_gsv_name(city, *row) for row in rows]
    for relpath, write in zip(relpaths, files if isinstance(files, list) else [files] * len(rows)):
        if write:
            write_jpeg(root / relpath)
    return relpaths


def test_gsv_cities_round_trip(tmp_path):
    root = tmp_path / "gsv-cities"
    sf = _gsv(root, "SanFrancisco", [
        (0, 2016, 5, 90, "37.7751", "-122.5113", "panoA"),
        (1, 2017, 11, 0, "36.0", "-120.0001", "pB"),
    ])  # fmt: skip
    mel = _gsv(root, "Melbourne", [
        (0, 2018, 1, 359, "-37.8136", "144.9631", "p-C_1"),  # place id 0 again, other city
        (1, 2018, 2, 5, "60.39", "5.32", "pD"),
    ])  # fmt: skip
    first, second = read_checked("gsv_cities", root), read_checked("gsv_cities", root)
    assert first.inputs == 4 and first.rejects.num_rows == 0
    assert first.catalog["image_id"].to_pylist() == second.catalog["image_id"].to_pylist()
    rows = rows_of(first)
    assert_position(rows[sf[0]], *SAN_FRANCISCO)
    assert_position(rows[sf[1]], *WEST_OF_120W)
    assert_position(rows[mel[0]], *MELBOURNE)
    assert_position(rows[mel[1]], *BERGEN)
    assert rows[sf[0]]["source_place_id"] == "SanFrancisco/0" and rows[mel[0]]["source_place_id"] == "Melbourne/0"
    assert rows[mel[0]]["heading_deg"] == 359.0 and rows[mel[0]]["subset"] == "Melbourne"
    assert rows[sf[1]]["captured_at"] == datetime(2017, 11, 1, tzinfo=timezone.utc)


def test_gsv_cities_rejects_each_bad_input_with_its_reason(tmp_path):
    root = tmp_path / "gsv"
    good = (0, 2016, 5, 90, "37.7751", "-122.5113", "panoA")
    relpaths = _gsv(root, "Rome", [
        good,
        (1, 2016, 5, 90, "41.9", "12.5", "missingPano"),  # row 2: no image
        good,  # row 3: the same row again
        ("x1", 2016, 5, 90, "41.9", "12.5", "p"),  # row 4: place_id
        (2, 2016, 5, 90, "abc", "12.5", "p"),  # row 5: lat
        (3, 2016, 5, 90, "95.0", "12.5", "p95"),  # row 6: lat out of range
        (4, 2016, 5, 90, "nan", "12.5", "pnan"),  # row 7: lat NaN
        (5, 2016, 13, 90, "41.9", "12.5", "p"),  # row 8: month
        (6, 2016, 5, 90, "41.9", "12.5", "../../x"),  # row 9: panoid that would escape
    ], files=[True, False, False, False, False, True, True, True, False])  # fmt: skip
    write_jpeg(root / "Images/Rome/Rome_0000099_2016_05_090_41.9_12.5_stray.jpg")
    (root / "Images/Rome/Thumbs.db").write_text("x")
    (root / "Dataframes" / "a b.csv").write_text(GSV_HEADER + "0,2016,5,90,ab,1,1,p\n")
    result = read_checked("gsv_cities", root)
    rejects = rejects_of(result)
    csv = "Dataframes/Rome.csv"
    assert result.catalog["relpath"].to_pylist() == [relpaths[0]]
    assert rejects[f"{csv}:row 2"] == ("missing_file", f"{relpaths[1]} does not exist")
    assert rejects[f"{csv}:row 3"] == ("duplicate", f"same image as {csv}:row 1")
    assert rejects[f"{csv}:row 4"] == ("bad_row", "place_id 'x1' is not a non-negative integer")
    assert rejects[f"{csv}:row 5"] == ("bad_row", "lat 'abc' is not a number")
    assert rejects[f"{csv}:row 6"] == ("bad_coordinates", "lat 95.0 is outside -90..90")
    assert rejects[f"{csv}:row 7"] == ("bad_coordinates", "lat is nan")
    assert rejects[f"{csv}:row 8"] == ("bad_row", "month 13 is not 1..12")  # its file is the row's, not stray
    assert rejects[f"{csv}:row 9"][0] == "bad_row" and "panoid" in rejects[f"{csv}:row 9"][1]
    assert rejects["Images/Rome/Rome_0000099_2016_05_090_41.9_12.5_stray.jpg"][0] == "not_in_metadata"
    assert rejects["Images/Rome/Thumbs.db"][0] == "not_an_image"
    assert rejects["Dataframes/a b.csv:row 1"][0] == "bad_row"
    assert "not alphanumeric" in rejects["Dataframes/a b.csv:row 1"][1]
    assert result.inputs == 9 + 2 + 1


def test_gsv_cities_without_dataframes_is_a_source_error(tmp_path):
    (tmp_path / "gsv" / "Images").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"has no Dataframes/\*\.csv"):
        read_source("gsv_cities", tmp_path / "gsv")
