"""The vectorised "@"-name path (`parse_at_names`, `read_atname`) against the per-name one
(`parse_at_name`, `coordinates_of`) on a mixed fixture: the same rows are catalogued, and every
other name is rejected with the same reason and the same detail text."""

from __future__ import annotations

import math

import polars as pl
import pytest
import utm

from placeforge.ingest import AtNameError, parse_at_name, parse_at_names, read_source
from placeforge.ingest.atname import ATTRIBUTE, CoordinateError, coordinates_of, locate
from placeforge.ingest.common import normalise_heading


def at_name(east="", north="", zone="", letter="", lat="", lon="", pano="p1", tile="", heading="", pitch="",
            roll="", height="", timestamp="", note="", ext=".jpg") -> str:
    fields = [east, north, zone, letter, lat, lon, pano, tile, heading, pitch, roll, height, timestamp, note]
    return "@" + "@".join(str(f) for f in fields) + "@" + ext


def _utm_fields(lat: float, lon: float) -> dict:
    east, north, zone, letter = utm.from_latlon(lat, lon)
    return {"east": f"{east:.2f}", "north": f"{north:.2f}", "zone": zone, "letter": letter}


SF, SYDNEY, LONDON = (37.7751, -122.5113), (-33.87, 151.21), (51.51, -0.13)
MIXED = [
    # usable: lat/lon, UTM only, both hemispheres, lat/lon bad but UTM good, odd but valid numbers
    at_name(**_utm_fields(*SF), lat="037.77510", lon="-122.51130", heading=134, timestamp="201311"),
    at_name(lat=SYDNEY[0], lon=SYDNEY[1], heading=-30, timestamp="20190228_1307", note="a.b", ext=".JPG"),
    at_name(**_utm_fields(*SYDNEY), heading=725, timestamp="2019"),
    at_name(**_utm_fields(*LONDON), lat=95, lon=0, timestamp="20190230"),
    at_name(**{**_utm_fields(*SF), "letter": "s"}, tile="+07", pitch="1e-3", roll="-.5", height="+1.", pano=""),
    at_name(lat="1", lon="2", timestamp="June 2019", heading="inf"),
    "@0584334.39@4476910.88@17@T@040.43857@-080.00562@004561@00@@@@@@pitch1_yaw1@.jpg",
    # bad names: shape, then each number field in turn, then look-alike and padded numbers
    "photo.jpg", ".jpg", "@.jpg", "@" * 14 + ".jpg", "@" * 16 + ".jpg", "@" * 15 + "x.jpg", "x" + "@" * 15 + ".jpg",
    "@" * 15 + ".tar.jpg", "@@.jpg", "@1@2.jpg",
    at_name(east="12x4"), at_name(north="n"), at_name(zone="10.5"), at_name(zone="1" * 19), at_name(lat="abc"),
    at_name(lon="1_0"), at_name(tile="1.0"), at_name(heading="ınf"), at_name(pitch="１２"), at_name(roll="1 "),
    at_name(height="--1"), at_name(lat="1\n", lon="1"), at_name(lat=" 1", lon="1"), at_name(lat="1", lon="5e"),
    at_name(lat="'", lon="1"), at_name(lat='"\\', lon="1"),
    # parsed, but no usable position
    "@" * 15 + ".jpg", at_name(heading=10, timestamp="2019"),
    at_name(lat="nan", lon="10"), at_name(lat="NaN", lon="-Infinity"), at_name(lat=95, lon=10), at_name(lat=85, lon=10),
    at_name(lat=10, lon=200), at_name(lat=10), at_name(lon=10),
    at_name(east=500000, north=4000000, zone=61, letter="S"), at_name(east=500000, north=4000000, zone=0, letter="S"),
    at_name(east=500000, north=4000000, zone=10, letter="I"), at_name(east=500000, north=4000000, zone=10, letter="SS"),
    at_name(east=500000, north=4000000, zone=10), at_name(east=500000, letter="S"),
    at_name(east="nan", north=4000000, zone=10, letter="S"), at_name(east="inf", north=4000000, zone=10, letter="S"),
    at_name(east=50000, north=4000000, zone=10, letter="S"), at_name(east=500000, north=9999999, zone=10, letter="X"),
    at_name(lat="nan", lon="nan", east="nan", north="nan", zone=10, letter="S"),
    at_name(lat=91, lon=1, east=500000, north=4000000, zone=61, letter="S"),
    # mock coordinates (Nordland, AmsterTime): fields evaluation reads, no UTM zone for the ingest
    "@0@1050.00@@@@@000105@@@@@@@@.jpg", "@0@7000@@@@@7@@@@@@@@.png",
]  # fmt: skip


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_parse_at_names_gives_the_fields_of_parse_at_name_on_every_name():
    parsed = parse_at_names(pl.Series(MIXED)).to_dicts()
    outcomes = {"ok": 0, "bad": 0}
    for name, row in zip(MIXED, parsed):
        try:
            at = parse_at_name(name)
        except AtNameError:
            assert not row["ok"] and all(row[a] is None for a in ATTRIBUTE.values()), name
            outcomes["bad"] += 1
            continue
        outcomes["ok"] += 1
        assert row["ok"], name
        for attribute in ATTRIBUTE.values():
            assert _same(row[attribute], getattr(at, attribute)), (name, attribute, row[attribute])
        assert row["captured_at_s"] == (int(at.captured_at.timestamp()) if at.captured_at else None), name
    assert outcomes["bad"] >= 25 and outcomes["ok"] >= 30  # the fixture exercises both sides


def test_read_atname_catalogues_and_rejects_exactly_as_the_per_name_path(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    listed = [f"train/{name}" for name in MIXED] + ["train/notes.txt"]
    pl.DataFrame({"path": listed}).write_parquet(tmp_path / "files.parquet")
    result = read_source("atname", root, tmp_path / "files.parquet")

    expected_rows, expected_rejects = {}, {"train/notes.txt": "not_an_image"}
    for name in dict.fromkeys(MIXED):  # a name listed twice is a duplicate: checked below
        try:
            at = parse_at_name(name)
            expected_rows[f"train/{name}"] = (at, coordinates_of(at))
        except AtNameError as err:
            expected_rejects[f"train/{name}"] = ("bad_name", err.why)
        except CoordinateError as err:
            expected_rejects[f"train/{name}"] = (err.reason, err.detail)
    rows = {r["relpath"]: r for r in result.catalog.to_pylist()}
    assert list(rows) == sorted(expected_rows)  # a file list is read in sorted order
    for relpath, (at, (lat, lon)) in expected_rows.items():
        row = rows[relpath]
        assert (row["lat"], row["lon"], row["subset"]) == (lat, lon, "train"), relpath
        heading = normalise_heading([at.heading_deg if at.heading_deg is not None else math.nan])[0]
        assert _same(row["heading_deg"], float(heading)) or (row["heading_deg"] is None and math.isnan(heading))
        assert row["captured_at"] == at.captured_at, relpath

    rejects = {r["input"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    duplicates = {k: v for k, v in rejects.items() if v[0] == "duplicate"}
    assert len(duplicates) == len(MIXED) - len(set(MIXED))  # "@@@...@.jpg" is listed twice
    assert rejects["train/notes.txt"][0] == "not_an_image"
    for relpath, want in expected_rejects.items():
        if relpath != "train/notes.txt":
            assert rejects[relpath] == want, relpath
    assert result.inputs == len(listed) == result.catalog.num_rows + result.rejects.num_rows


def test_locate_explains_every_name_at_once_as_coordinates_of_does_one_by_one():
    ats = []
    for name in MIXED:
        try:
            ats.append(parse_at_name(name))
        except AtNameError:
            pass
    together = locate(ats)
    for at, found in zip(ats, together):
        try:
            assert found == coordinates_of(at)
        except CoordinateError as err:
            assert isinstance(found, CoordinateError) and (found.reason, found.detail) == (err.reason, err.detail)
    assert {type(f) for f in together} == {tuple, CoordinateError}
    assert locate([]) == []


@pytest.mark.parametrize("rows", [1, 7])
def test_a_name_rejected_for_its_coordinates_says_the_same_in_any_company(rows, tmp_path):
    """The batched UTM conversion must not mix rows up: one bad name among good ones keeps its detail."""
    root = tmp_path / "set"
    root.mkdir()
    good = [at_name(**_utm_fields(*SF), heading=i) for i in range(rows)]
    bad = at_name(east=500000, north=9999999, zone=10, letter="X")
    pl.DataFrame({"path": [*good, bad]}).write_parquet(tmp_path / "files.parquet")
    result = read_source("atname", root, tmp_path / "files.parquet")
    with pytest.raises(CoordinateError) as err:
        coordinates_of(parse_at_name(bad))
    assert result.rejects.to_pylist()[0]["detail"] == err.value.detail and "gives" in err.value.detail
    assert result.catalog.num_rows == rows
