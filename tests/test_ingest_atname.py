"""The "@"-name reader (`read_source("atname", ...)`) on tiny real folders written into tmp_path."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest
import utm

from placeforge.catalog import image_id_for
from placeforge.ingest import SourceError, read_source
from tests.ingest_folders import (
    FIELD_NUMBER,
    LOOKALIKE_NUMBERS,
    MELBOURNE,
    POINTS,
    SAN_FRANCISCO,
    assert_position,
    at_name,
    lookalike_name,
    read_checked,
    rejects_of,
    rows_of,
    write_jpeg,
)


def test_atname_round_trip_across_zones_and_hemispheres(tmp_path):
    root = tmp_path / "sfxl"
    names = {key: f"images/test/database/{at_name(lat=lat, lon=lon, heading=90)}" for key, (lat, lon) in POINTS.items()}
    for i, relpath in enumerate(names.values()):
        write_jpeg(root / relpath, shade=i)
    first, second = read_checked("atname", root), read_checked("atname", root)
    assert first.inputs == 5 and first.rejects.num_rows == 0
    assert first.catalog["image_id"].to_pylist() == second.catalog["image_id"].to_pylist()
    rows = rows_of(first)
    for key, relpath in names.items():
        row = rows[relpath]
        assert_position(row, *POINTS[key])
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
        write_jpeg(root / name)
    rows = rows_of(read_checked("atname", root))
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
        write_jpeg(root / "train" / name)
    (root / "train" / "notes.txt").write_text("not an image")
    os.symlink(good, root / "train" / at_name(lat=1, lon=1))  # same file under a second name
    os.symlink("gone.jpg", root / "train" / at_name(lat=2, lon=2))  # broken
    os.symlink(root / "train", root / "train_link")  # a folder seen twice
    result = read_checked("atname", root)
    rejects = rejects_of(result)
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
    write_jpeg(root / at_name(lat=1, lon=1))
    with open(os.path.join(os.fsencode(root), b"@\xff@.jpg"), "wb") as f:
        f.write(b"x")
    os.mkfifo(root / at_name(lat=2, lon=2))
    result = read_checked("atname", root)
    assert sorted(r["reason"] for r in result.rejects.to_pylist()) == ["bad_name", "unreadable"]
    assert "not a regular file" in rejects_of(result)[at_name(lat=2, lon=2)][1]
    assert result.catalog.num_rows == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_atname_unreadable_file(tmp_path):
    root = tmp_path / "set"
    name = at_name(lat=1, lon=1)
    write_jpeg(root / name)
    (root / name).chmod(0)
    assert rejects_of(read_checked("atname", root))[name][0] == "unreadable"


def test_atname_folder_with_nothing_usable_gives_an_empty_catalog(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / "readme.md").write_text("x")
    result = read_checked("atname", root)
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


def test_atname_odd_numbers_are_rejected_one_by_one_and_the_ingest_goes_on(tmp_path):
    root = tmp_path / "set"
    good = at_name(lat=SAN_FRANCISCO[0], lon=SAN_FRANCISCO[1])
    cases = {lookalike_name(text, field): ("bad_name", f"field {FIELD_NUMBER[field]} ({field}) = '{text}'")
             for text, field in LOOKALIKE_NUMBERS.items()}
    cases[at_name(lat="NaN", lon="1")] = ("bad_coordinates", "lat is nan")
    cases[at_name(lat="1", lon="-Infinity")] = ("bad_coordinates", "lon is -inf")
    cases[at_name(east="inf", north=4000000, zone=10, letter="S")] = ("bad_coordinates", "NaN or out of range")
    for name in [good, *cases]:
        write_jpeg(root / name)
    result = read_checked("atname", root)
    assert result.catalog["relpath"].to_pylist() == [good]
    rejects = rejects_of(result)
    assert sorted(rejects) == sorted(cases)
    for name, (reason, detail) in cases.items():
        assert rejects[name][0] == reason and detail in rejects[name][1], (name, rejects[name])
    assert result.inputs == 1 + len(cases)
