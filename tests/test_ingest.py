"""Dataset readers on tiny real folders written into tmp_path.

Every read goes through `_read`, which also checks the contracts every reader keeps:
inputs == catalog rows + rejects rows, schemas, known reasons, absolute existing paths.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import utm
from PIL import Image

from placeforge.catalog import CATALOG_SCHEMA, REASONS, REJECTS_SCHEMA, image_id_for
from placeforge.ingest import (
    READERS,
    AtNameError,
    IngestResult,
    SourceError,
    parse_at_name,
    parse_at_names,
    parse_source_spec,
    read_source,
)
from placeforge.ingest.atname import coordinates_of

# (lat, lon) with the zone and band the point must land in.
SAN_FRANCISCO = (37.7751, -122.5113)  # 10S
MELBOURNE = (-37.8136, 144.9631)  # 55H, southern hemisphere
WEST_OF_120W = (36.0, -120.0001)  # 10S
EAST_OF_120W = (36.0, -119.9999)  # 11S
BERGEN = (60.39, 5.32)  # 32V: Norway exception (31 by longitude)
POINTS = {"sf": SAN_FRANCISCO, "melbourne": MELBOURNE, "west": WEST_OF_120W, "east": EAST_OF_120W, "bergen": BERGEN}


def _jpeg(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (shade, 80, 160)).save(path, "JPEG")


def _read(fmt: str, root: Path) -> IngestResult:
    result = read_source(fmt, root)
    assert result.inputs == result.catalog.num_rows + result.rejects.num_rows
    assert result.catalog.schema.equals(CATALOG_SCHEMA)
    assert result.rejects.schema.equals(REJECTS_SCHEMA)
    assert set(result.rejects["reason"].to_pylist()) <= set(REASONS)
    assert set(result.rejects["stage"].to_pylist()) <= {"ingest"}
    assert result.catalog["place_key"].null_count == result.catalog.num_rows
    assert set(result.catalog["source"].to_pylist()) <= {fmt}
    for path, relpath in zip(result.catalog["path"].to_pylist(), result.catalog["relpath"].to_pylist()):
        assert os.path.isabs(path) and path.endswith("/" + relpath) and os.path.isfile(path)
    assert len(set(result.catalog["image_id"].to_pylist())) == result.catalog.num_rows
    return result


def _rejects(result: IngestResult) -> dict[str, tuple[str, str]]:
    """input -> (reason, detail); inputs are unique in these fixtures."""
    rows = result.rejects.to_pylist()
    return {r["input"]: (r["reason"], r["detail"]) for r in rows}


def _rows(result: IngestResult) -> dict[str, dict]:
    return {r["relpath"]: r for r in result.catalog.to_pylist()}


def _assert_position(row: dict, lat: float, lon: float) -> None:
    east, north, zone, letter = utm.from_latlon(lat, lon)
    assert row["lat"] == pytest.approx(lat, abs=1e-9) and row["lon"] == pytest.approx(lon, abs=1e-9)
    assert (row["utm_zone"], row["utm_letter"]) == (zone, letter)
    assert row["utm_east"] == pytest.approx(east, abs=1e-6)
    assert row["utm_north"] == pytest.approx(north, abs=1e-6)


# ---------------------------------------------------------------- "@" names


def at_name(
    lat="", lon="", east="", north="", zone="", letter="", heading="", timestamp="", note="", ext=".jpg"
) -> str:
    fields = [east, north, zone, letter, lat, lon, "pano123", "", heading, "", "", "", timestamp, note]
    return "@" + "@".join(str(f) for f in fields) + "@" + ext


SFXL_NAME = "@0543037.38@4180974.80@10@S@037.77510@-122.51130@1ooZhwTQyuNt0xiue5YhLg@@134@@@@201311@@.jpg"
PITTS_NAME = "@0584334.39@4476910.88@17@T@040.43857@-080.00562@004561@00@@@@@@pitch1_yaw1@.jpg"


def test_parse_at_name_reads_real_sfxl_and_pitts_names():
    sf = parse_at_name(SFXL_NAME)
    assert (sf.utm_east, sf.utm_north, sf.utm_zone_number, sf.utm_zone_letter) == (543037.38, 4180974.80, 10, "S")
    assert (sf.lat, sf.lon, sf.pano_id) == (37.7751, -122.5113, "1ooZhwTQyuNt0xiue5YhLg")
    assert (sf.heading_deg, sf.timestamp) == (134.0, "201311")
    assert sf.tile_num is None and sf.pitch_deg is None and sf.note is None and sf.extension == ".jpg"
    assert sf.captured_at == datetime(2013, 11, 1, tzinfo=timezone.utc)
    pitts = parse_at_name("images/test/queries/" + PITTS_NAME)  # a folder prefix is ignored
    assert (pitts.tile_num, pitts.note, pitts.heading_deg, pitts.captured_at) == (0, "pitch1_yaw1", None, None)


def test_parse_at_name_accepts_all_fields_empty():
    at = parse_at_name("@" * 15 + ".jpg")
    assert at.lat is None and at.utm_east is None and at.pano_id is None and at.extension == ".jpg"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("@" * 14 + ".jpg", "has 13 '@' fields, expected 14"),
        ("@" * 16 + ".jpg", "has 15 '@' fields, expected 14"),
        (at_name(lat="abc", lon="1"), "field 5 (lat) = 'abc' is not a number"),
        (at_name(zone="10.5"), "field 3 (utm_zone_number) = '10.5' is not an integer"),
        (at_name(lat="1_0", lon="1"), "field 5 (lat) = '1_0' is not a number"),
        ("photo.jpg", "does not start with '@'"),
        ("@" * 15 + "x.jpg", "does not end with '@'"),
    ],
)
def test_parse_at_name_rejects_malformed_names(name, why):
    with pytest.raises(AtNameError) as err:
        parse_at_name(name)
    assert why in err.value.why


def test_vectorised_parser_agrees_with_scalar_parser():
    names = [
        SFXL_NAME, PITTS_NAME, "@" * 15 + ".jpg", "@" * 14 + ".jpg", "@" * 16 + ".jpg", "x.jpg", ".jpg", "@",
        at_name(lat="nan", lon="inf"), at_name(lat="-1e-3", lon="+.5"), at_name(lat="1.", lon="5e"),
        at_name(lat=" 1", lon="1"), at_name(lat="١", lon="1"), at_name(zone="+07", letter="s"),
        at_name(timestamp="2019"), at_name(timestamp="201902"), at_name(timestamp="20190230"),
        at_name(timestamp="20190228_1307"), at_name(timestamp="20191301"), at_name(timestamp="0000"),
        at_name(timestamp="2019023"), at_name(timestamp="20190228_246000"), at_name(note="a.b", ext=".JPG"),
        at_name(lat="1\n", lon="1"), "@" * 15, "@" * 15 + ".tar.gz",
    ]  # fmt: skip
    vec = parse_at_names(pl.Series(names)).to_dicts()
    for name, row in zip(names, vec):
        try:
            at = parse_at_name(name)
        except AtNameError:
            assert not row["ok"], name
            continue
        assert row["ok"], name
        assert row["lat"] == at.lat or (np.isnan(row["lat"]) and np.isnan(at.lat)), name
        assert row["heading_deg"] == at.heading_deg and row["utm_zone_number"] == at.utm_zone_number, name
        assert row["utm_zone_letter"] == at.utm_zone_letter and row["note"] == at.note, name
        seconds = int(at.captured_at.timestamp()) if at.captured_at else None
        assert row["captured_at_s"] == seconds, name


def test_atname_round_trip_across_zones_and_hemispheres(tmp_path):
    root = tmp_path / "sfxl"
    names = {key: f"images/test/database/{at_name(lat=lat, lon=lon, heading=90)}" for key, (lat, lon) in POINTS.items()}
    for i, relpath in enumerate(names.values()):
        _jpeg(root / relpath, shade=i)
    first, second = _read("atname", root), _read("atname", root)
    assert first.inputs == 5 and first.rejects.num_rows == 0
    assert first.catalog["image_id"].to_pylist() == second.catalog["image_id"].to_pylist()
    rows = _rows(first)
    for key, relpath in names.items():
        row = rows[relpath]
        _assert_position(row, *POINTS[key])
        assert row["image_id"] == image_id_for("sfxl", relpath)
        assert (row["dataset"], row["subset"], row["path"]) == ("sfxl", "images/test/database", str(root / relpath))
        assert row["source_place_id"] is None and row["heading_deg"] == 90.0
    assert {rows[names[k]]["utm_zone"] for k in ("west", "east", "bergen")} == {10, 11, 32}
    assert rows[names["bergen"]]["utm_letter"] == "V"


def test_atname_utm_only_heading_and_timestamps(tmp_path):
    root = tmp_path / "set"
    east, north, zone, letter = utm.from_latlon(*MELBOURNE)
    utm_only = at_name(
        east=f"{east:.2f}", north=f"{north:.2f}", zone=zone, letter=letter, heading=-90, timestamp="20190704"
    )
    names = {
        utm_only: (datetime(2019, 7, 4, tzinfo=timezone.utc), 270.0),
        at_name(lat=1, lon=2, heading=360, timestamp="2019"): (datetime(2019, 1, 1, tzinfo=timezone.utc), 0.0),
        at_name(lat=1, lon=3, heading=725, timestamp="201906"): (datetime(2019, 6, 1, tzinfo=timezone.utc), 5.0),
        at_name(lat=1, lon=4, timestamp="June 2019"): (None, None),
    }
    for name in names:
        _jpeg(root / name)
    rows = _rows(_read("atname", root))
    for name, (captured_at, heading) in names.items():
        assert (rows[name]["captured_at"], rows[name]["heading_deg"]) == (captured_at, heading)
        assert rows[name]["subset"] is None
    assert rows[utm_only]["lat"] == pytest.approx(MELBOURNE[0], abs=1e-6)
    assert rows[utm_only]["lon"] == pytest.approx(MELBOURNE[1], abs=1e-6)


def test_atname_rejects_each_bad_input_with_its_reason(tmp_path):
    root = tmp_path / "set"
    good = at_name(lat=SAN_FRANCISCO[0], lon=SAN_FRANCISCO[1])
    cases = {
        "@" * 14 + ".jpg": ("bad_name", "has 13 '@' fields"),
        at_name(lat="abc", lon="1"): ("bad_name", "field 5 (lat) = 'abc' is not a number"),
        at_name(lat="nan", lon="10"): ("bad_coordinates", "lat is nan"),
        at_name(lat=95, lon=10): ("bad_coordinates", "lat 95.0 is outside -90..90"),
        at_name(lat=85, lon=10): ("bad_coordinates", "outside UTM's -80..84"),
        at_name(lat=10, lon=200): ("bad_coordinates", "lon 200.0 is outside -180..180"),
        at_name(lat=10): ("bad_coordinates", "lon is missing"),
        at_name(east=500000, north=4000000, zone=61, letter="S"): ("bad_coordinates", "zone is not 1..60"),
        at_name(east=500000, north=4000000, zone=10, letter="I"): ("bad_coordinates", "not a band C..X"),
        at_name(east=500000, north=4000000, zone=10): ("bad_coordinates", "UTM is incomplete"),
        at_name(heading=10): ("no_coordinates", "no lat/lon and no UTM"),
    }
    for name in [good, *cases]:
        _jpeg(root / "train" / name)
    (root / "train" / "notes.txt").write_text("not an image")
    os.symlink(good, root / "train" / at_name(lat=1, lon=1))  # same file under a second name
    os.symlink("gone.jpg", root / "train" / at_name(lat=2, lon=2))  # broken
    os.symlink(root / "train", root / "train_link")  # a folder seen twice
    result = _read("atname", root)
    rejects = _rejects(result)
    assert result.catalog["relpath"].to_pylist() == [f"train/{good}"]
    for name, (reason, detail) in cases.items():
        assert rejects[f"train/{name}"][0] == reason, name
        assert detail in rejects[f"train/{name}"][1], name
    assert rejects["train/notes.txt"][0] == "not_an_image"
    assert rejects[f"train/{at_name(lat=1, lon=1)}"] == ("duplicate", f"same file as train/{good}")
    assert rejects[f"train/{at_name(lat=2, lon=2)}"][0] == "unreadable"
    assert rejects["train_link"][0] == "duplicate"
    assert result.inputs == 1 + len(cases) + 4


def test_atname_rejects_names_that_are_not_utf8_and_files_that_are_not_regular(tmp_path):
    root = tmp_path / "set"
    _jpeg(root / at_name(lat=1, lon=1))
    with open(os.path.join(os.fsencode(root), b"@\xff@.jpg"), "wb") as f:
        f.write(b"x")
    os.mkfifo(root / at_name(lat=2, lon=2))
    result = _read("atname", root)
    assert sorted(r["reason"] for r in result.rejects.to_pylist()) == ["bad_name", "unreadable"]
    assert "not a regular file" in _rejects(result)[at_name(lat=2, lon=2)][1]
    assert result.catalog.num_rows == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_atname_unreadable_file(tmp_path):
    root = tmp_path / "set"
    name = at_name(lat=1, lon=1)
    _jpeg(root / name)
    (root / name).chmod(0)
    assert _rejects(_read("atname", root))[name][0] == "unreadable"


def test_atname_folder_with_nothing_usable_gives_an_empty_catalog(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / "readme.md").write_text("x")
    result = _read("atname", root)
    assert (result.inputs, result.catalog.num_rows) == (1, 0)


def test_atname_empty_or_missing_folder_is_a_source_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SourceError, match="has no files"):
        read_source("atname", tmp_path / "empty")
    with pytest.raises(SourceError, match="does not exist"):
        read_source("atname", tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match="is not a folder"):
        read_source("atname", tmp_path / "file")


# ---------------------------------------------------------------- GSV-Cities

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
            _jpeg(root / relpath)
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
    first, second = _read("gsv_cities", root), _read("gsv_cities", root)
    assert first.inputs == 4 and first.rejects.num_rows == 0
    assert first.catalog["image_id"].to_pylist() == second.catalog["image_id"].to_pylist()
    rows = _rows(first)
    _assert_position(rows[sf[0]], *SAN_FRANCISCO)
    _assert_position(rows[sf[1]], *WEST_OF_120W)
    _assert_position(rows[mel[0]], *MELBOURNE)
    _assert_position(rows[mel[1]], *BERGEN)
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
    _jpeg(root / "Images/Rome/Rome_0000099_2016_05_090_41.9_12.5_stray.jpg")
    (root / "Images/Rome/Thumbs.db").write_text("x")
    (root / "Dataframes" / "a b.csv").write_text(GSV_HEADER + "0,2016,5,90,ab,1,1,p\n")
    result = _read("gsv_cities", root)
    rejects = _rejects(result)
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


# ---------------------------------------------------------------- MSLS


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
            _jpeg(root / relpath)
    return relpaths


def test_msls_round_trip_and_train_val_as_root(tmp_path):
    root = tmp_path / "msls"
    query = _msls_side(
        root, "train_val/melbourne/query", [("qKey_1", *MELBOURNE, 370.0, 1438256016123)], post_keys=["qKey_1"]
    )
    db = _msls_side(
        root, "train_val/sf/database", [("dKey-2", *SAN_FRANCISCO, 45.5, 1262304000000), ("dKey3", *BERGEN, 0, 0)]
    )
    result = _read("msls", root)
    assert result.inputs == 3 and result.rejects.num_rows == 0 and result.warnings == ()
    rows = _rows(result)
    _assert_position(rows[query[0]], *MELBOURNE)
    _assert_position(rows[db[0]], *SAN_FRANCISCO)
    _assert_position(rows[db[1]], *BERGEN)
    assert rows[query[0]]["subset"] == "melbourne/query" and rows[db[0]]["subset"] == "sf/database"
    assert rows[query[0]]["heading_deg"] == 10.0 and rows[db[0]]["heading_deg"] == 45.5
    assert rows[query[0]]["captured_at"] == datetime(2015, 7, 30, 11, 33, 36, tzinfo=timezone.utc)
    via_train_val = _read("msls", root / "train_val")
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
    _jpeg(root / folder / "images" / "stray.jpg")
    result = _read("msls", root)
    rejects = _rejects(result)
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
    _jpeg(side / "images" / "t1.jpg")
    result = _read("msls", root)
    assert result.catalog.to_pylist()[0]["captured_at"] is None  # 1e30 ms is no date
    assert result.catalog.to_pylist()[0]["heading_deg"] is None
    assert _rejects(result)["test/kampala/query/raw.csv:row 1"] == ("no_coordinates", "lat and lon are empty")
    assert result.rejects.to_pylist()[0]["image_id"] == image_id_for("msls", "test/kampala/query/images/t1.jpg")


def test_msls_without_train_val_is_a_source_error(tmp_path):
    (tmp_path / "msls" / "test").mkdir(parents=True)
    with pytest.raises(SourceError, match="has no train_val/ folder"):
        read_source("msls", tmp_path / "msls")


# ---------------------------------------------------------------- GLDv2


def _gld_path(image_id: str) -> str:
    return f"train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def test_gldv2_round_trip_and_bad_inputs(tmp_path):
    root = tmp_path / "gldv2"
    ids = ["0123456789abcdef", "fedcba9876543210", "abcabcabcabcabc1"]
    for i in ids:
        _jpeg(root / _gld_path(i))
    _jpeg(root / _gld_path("1111111111111111"))  # not in train_clean: outside the subset, not an input
    (root / "train_clean.csv").write_text(
        "landmark_id,images\n"
        f"7,{ids[0]} {ids[1]}\n"
        f"8,{ids[2]} 2222222222222222 ../../../etc/passwd ABCDEF0123456789\n"
        f"9,{ids[0]}\n"
        "10,\n"
        f"x,3333333333333333\n"
    )
    first, second = _read("gldv2", root), _read("gldv2", root)
    assert first.catalog["image_id"].to_pylist() == second.catalog["image_id"].to_pylist()
    rows = _rows(first)
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


# ---------------------------------------------------------------- dispatch


def test_unknown_format_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid formats: atname, gldv2, gsv_cities, msls"):
        read_source("sfxl", tmp_path)
    assert sorted(READERS) == ["atname", "gldv2", "gsv_cities", "msls"]


def test_parse_source_spec():
    assert parse_source_spec("gsv_cities:/data/gsv:v2") == ("gsv_cities", Path("/data/gsv:v2"))
    with pytest.raises(ValueError, match="has no ':'"):
        parse_source_spec("/data/gsv")
    with pytest.raises(ValueError, match="unknown source format 'gsv'"):
        parse_source_spec("gsv:/data/gsv")
    with pytest.raises(ValueError, match="no path"):
        parse_source_spec("atname:")


def test_coordinates_of_prefers_valid_latlon_and_falls_back_to_utm():
    east, north, zone, letter = utm.from_latlon(*SAN_FRANCISCO)
    both = parse_at_name(at_name(lat=1, lon=2, east=east, north=north, zone=zone, letter=letter))
    assert coordinates_of(both) == (1.0, 2.0)
    bad_latlon = parse_at_name(at_name(lat=95, lon=2, east=east, north=north, zone=zone, letter=letter))
    assert coordinates_of(bad_latlon) == pytest.approx(SAN_FRANCISCO, abs=1e-6)


@pytest.mark.slow
def test_parse_at_names_is_vectorised():
    """200 k names in seconds: a per-name Python path would take far longer on 1 M."""
    template = "@0543037.38@4180974.80@10@S@37.{i:05d}@-122.{i:05d}@p{i}@@{h}@@@@201311@@.jpg"
    names = pl.Series([template.format(i=i, h=i % 360) for i in range(200_000)])
    start = time.perf_counter()
    parsed = parse_at_names(names)
    assert parsed["ok"].all() and parsed["lat"][123] == pytest.approx(37.00123)
    assert time.perf_counter() - start < 20.0


# ---------------------------------------------------------------- untrusted names


# Non-ASCII look-alikes of numbers: Python's case-insensitive regex matches "ınf" and "İnf"
# as "inf" (and float() then refuses them); full-width digits are digits to Unicode.
LOOKALIKE_NUMBERS = {"ınf": "lat", "İnf": "lon", "１２３": "lat", "-ınfinity": "heading", "İNF": "utm_east"}
FIELD_NUMBER = {"utm_east": 1, "lat": 5, "lon": 6, "heading": 9}


def _lookalike_name(text: str, field: str) -> str:
    given = {"lat": 1, "lon": 1, "heading": 10}
    if field == "utm_east":
        given = {"east": text, "north": 4000000, "zone": 10, "letter": "S"}
    else:
        given[field] = text
    return at_name(**given)


@pytest.mark.parametrize("text, field", LOOKALIKE_NUMBERS.items())
def test_parse_at_name_number_fields_are_ascii_only(text, field):
    name = _lookalike_name(text, field)
    with pytest.raises(AtNameError, match=rf"field {FIELD_NUMBER[field]} \({field}\) = '{text}' is not a number"):
        parse_at_name(name)
    assert not parse_at_names(pl.Series([name]))["ok"][0]  # the vectorised parser agrees


def test_atname_odd_numbers_are_rejected_one_by_one_and_the_ingest_goes_on(tmp_path):
    root = tmp_path / "set"
    good = at_name(lat=SAN_FRANCISCO[0], lon=SAN_FRANCISCO[1])
    cases = {_lookalike_name(text, field): ("bad_name", f"field {FIELD_NUMBER[field]} ({field}) = '{text}'")
             for text, field in LOOKALIKE_NUMBERS.items()}
    cases[at_name(lat="NaN", lon="1")] = ("bad_coordinates", "lat is nan")
    cases[at_name(lat="1", lon="-Infinity")] = ("bad_coordinates", "lon is -inf")
    cases[at_name(east="inf", north=4000000, zone=10, letter="S")] = ("bad_coordinates", "NaN or out of range")
    for name in [good, *cases]:
        _jpeg(root / name)
    result = _read("atname", root)
    assert result.catalog["relpath"].to_pylist() == [good]
    rejects = _rejects(result)
    assert sorted(rejects) == sorted(cases)
    for name, (reason, detail) in cases.items():
        assert rejects[name][0] == reason and detail in rejects[name][1], (name, rejects[name])
    assert result.inputs == 1 + len(cases)
