"""Tiny dataset folders for the ingest tests (tests/test_ingest_*.py), and the checks every read keeps.

Every read goes through `read_checked`, which also checks the contracts every reader keeps:
inputs == catalog rows + rejects rows, schemas, known reasons, absolute existing paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import utm
from PIL import Image

from placeforge.catalog import CATALOG_SCHEMA, REASONS, REJECTS_SCHEMA
from placeforge.ingest import IngestResult, read_source

# (lat, lon) with the zone and band the point must land in.
SAN_FRANCISCO = (37.7751, -122.5113)  # 10S
MELBOURNE = (-37.8136, 144.9631)  # 55H, southern hemisphere
WEST_OF_120W = (36.0, -120.0001)  # 10S
EAST_OF_120W = (36.0, -119.9999)  # 11S
BERGEN = (60.39, 5.32)  # 32V: Norway exception (31 by longitude)
POINTS = {"sf": SAN_FRANCISCO, "melbourne": MELBOURNE, "west": WEST_OF_120W, "east": EAST_OF_120W, "bergen": BERGEN}


def write_jpeg(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (shade, 80, 160)).save(path, "JPEG")


def read_checked(fmt: str, root: Path) -> IngestResult:
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


def rejects_of(result: IngestResult) -> dict[str, tuple[str, str]]:
    """input -> (reason, detail); inputs are unique in these fixtures."""
    rows = result.rejects.to_pylist()
    return {r["input"]: (r["reason"], r["detail"]) for r in rows}


def rows_of(result: IngestResult) -> dict[str, dict]:
    return {r["relpath"]: r for r in result.catalog.to_pylist()}


def assert_position(row: dict, lat: float, lon: float) -> None:
    east, north, zone, letter = utm.from_latlon(lat, lon)
    assert row["lat"] == pytest.approx(lat, abs=1e-9) and row["lon"] == pytest.approx(lon, abs=1e-9)
    assert (row["utm_zone"], row["utm_letter"]) == (zone, letter)
    assert row["utm_east"] == pytest.approx(east, abs=1e-6)
    assert row["utm_north"] == pytest.approx(north, abs=1e-6)


def at_name(
    lat="", lon="", east="", north="", zone="", letter="", heading="", timestamp="", note="", ext=".jpg"
) -> str:
    fields = [east, north, zone, letter, lat, lon, "pano123", "", heading, "", "", "", timestamp, note]
    return "@" + "@".join(str(f) for f in fields) + "@" + ext


# Non-ASCII look-alikes of numbers: Python's case-insensitive regex matches "ınf" and "İnf"
# as "inf" (and float() then refuses them); full-width digits are digits to Unicode.
LOOKALIKE_NUMBERS = {"ınf": "lat", "İnf": "lon", "１２３": "lat", "-ınfinity": "heading", "İNF": "utm_east"}
FIELD_NUMBER = {"utm_east": 1, "lat": 5, "lon": 6, "heading": 9}


def lookalike_name(text: str, field: str) -> str:
    given = {"lat": 1, "lon": 1, "heading": 10}
    if field == "utm_east":
        given = {"east": text, "north": 4000000, "zone": 10, "letter": "S"}
    else:
        given[field] = text
    return at_name(**given)
