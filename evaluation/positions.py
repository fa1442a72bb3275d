"""Where a test image is, read from its "@" name as the reference evaluator reads it.

    fields = parse_at_names(pl.Series(names)).filter(pl.col("ok"))
    found = positions_from_fields(fields)     # [N, 2] metres, [N] zone keys, usable or why not
    frame = coordinate_frame(found.zone[found.usable])   # "utm" or "planar"

gmberton/VPR-methods-evaluation (test_dataset.py) takes a test image's position from fields
1 and 2 of its name, UTM east and north, and finds positives with a radius search on them.
The downloader writes those fields from full-precision lat/lon, and lat/lon themselves with
5 decimals (about 1 m), so they are what a published number was computed from.  Per name:

  1. east and north (fields 1, 2) both finite: they are the position, and the zone key is
     - fields 3, 4 (zone number 1..60, band letter C..X): the zone, negative for bands C..M
       (southern hemisphere: its northings carry a 10,000 km false northing);
     - fields 3, 4 and lat/lon (5, 6) all empty: PLANAR_ZONE.  These are mock coordinates,
       metres in a plane of their own, as the downloader writes for sets without GPS:
       Nordland `@0@<north>@@@@@<frame>@@@@@@@@.jpg` (frames 25 / 10.5 m apart, so 10
       frames fall within 25 m), AmsterTime and SPED `@0@<1000 * pair>@@@@@<pair>@@@@@@@@.jpg`
       (a query and its database twin share a position; pairs are 1 km apart);
     - fields 3, 4 empty, lat/lon valid: the zone of lat/lon;
  2. otherwise, lat/lon valid: UTM computed from them, each point in its own zone;
  3. otherwise the image has no usable position (`no_coordinates` when all six fields are
     empty, else `bad_coordinates`, with the reason).

The reference evaluator ignores zones; placeforge compares images only within one zone key,
which gives the same positives for every single-zone set and keeps coordinates of different
zones (MSLS-val: Copenhagen and San Francisco) from being compared.  Mock coordinates have no
relation to any real place, so a set (database and queries together) must be all planar or
all UTM: `coordinate_frame` refuses a mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from placeforge.geo import latlon_to_utm, valid_latlon, zone_numbers
from placeforge.ingest.common import latlon_problem

PLANAR_ZONE = 0  # zone key of mock coordinates; real zone keys are 1..60 and -1..-60
_BANDS = np.array(list("CDEFGHJKLMNPQRSTUVWX"))  # latitude bands, without I and O
POSITION_FIELDS = ("utm_east", "utm_north", "utm_zone_number", "utm_zone_letter", "lat", "lon")


@dataclass(frozen=True)
class NamePositions:
    """Positions of [N] parsed names; rows that are not `usable` hold NaN and say why in `reason`."""

    east_north: np.ndarray  # [N, 2] float64 metres (UTM, or planar where zone == PLANAR_ZONE)
    zone: np.ndarray  # [N] int64 zone key: UTM zone number, negative south; PLANAR_ZONE: mock coordinates
    from_latlon: np.ndarray  # [N] bool: computed from lat/lon (the name has no usable east/north)
    usable: np.ndarray  # [N] bool
    reason: list[str | None]  # [N] catalog.REASONS code where not usable
    detail: list[str | None]  # [N]


def positions_from_fields(fields: pl.DataFrame) -> NamePositions:
    """Apply the rules of the module docstring to [N] rows of `parse_at_names` (ok rows only).

    Args:
        fields: columns POSITION_FIELDS (f64 / i64 / str, null where the field is empty).
    """
    n = fields.height
    east, north = _floats(fields, "utm_east"), _floats(fields, "utm_north")
    lat, lon = _floats(fields, "lat"), _floats(fields, "lon")
    zone_given = fields["utm_zone_number"].is_not_null().to_numpy()
    zone_number = fields["utm_zone_number"].fill_null(0).to_numpy().astype(np.int64)
    letter = np.char.upper(fields["utm_zone_letter"].fill_null("").to_numpy().astype(str))
    letter_given = letter != ""
    latlon_given = fields["lat"].is_not_null().to_numpy() | fields["lon"].is_not_null().to_numpy()
    latlon_ok = valid_latlon(lat, lon)

    named = np.isfinite(east) & np.isfinite(north)
    real_zone = named & zone_given & (zone_number >= 1) & (zone_number <= 60) & np.isin(letter, _BANDS)
    no_zone = named & ~zone_given & ~letter_given
    planar = no_zone & ~latlon_given
    zone_of_latlon = no_zone & latlon_ok
    from_latlon = ~named & latlon_ok
    usable = real_zone | planar | zone_of_latlon | from_latlon

    east_north = np.full((n, 2), np.nan)
    zone = np.full(n, PLANAR_ZONE, dtype=np.int64)
    take = real_zone | planar | zone_of_latlon
    east_north[take] = np.stack([east[take], north[take]], axis=1)
    zone[real_zone] = np.where(letter[real_zone] >= "N", 1, -1) * zone_number[real_zone]
    if zone_of_latlon.any():
        rows = np.flatnonzero(zone_of_latlon)
        zone[rows] = np.where(lat[rows] >= 0, 1, -1) * zone_numbers(lat[rows], lon[rows]).astype(np.int64)
    if from_latlon.any():
        rows = np.flatnonzero(from_latlon)
        utm = latlon_to_utm(lat[rows], lon[rows])
        east_north[rows] = np.stack([utm.east_m, utm.north_m], axis=1)
        zone[rows] = np.where(lat[rows] >= 0, 1, -1) * utm.zone_number.astype(np.int64)

    reason: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    for row in np.flatnonzero(~usable):  # few, so explained one by one
        values = {f: fields[f][int(row)] for f in POSITION_FIELDS}
        reason[row], detail[row] = position_problem(values)
    return NamePositions(east_north, zone, from_latlon, usable, reason, detail)


def position_problem(values: dict[str, object]) -> tuple[str, str]:
    """(reason, detail) for one name's position fields (POSITION_FIELDS, None where empty) that
    `positions_from_fields` cannot use."""
    east, north, zone, letter, lat, lon = (values[f] for f in POSITION_FIELDS)
    if all(v is None for v in (east, north, zone, letter, lat, lon)):
        return "no_coordinates", "no UTM east/north (fields 1, 2) and no lat/lon (fields 5, 6)"
    latlon = "lat/lon are empty" if lat is None and lon is None else latlon_problem(lat, lon)  # type: ignore[arg-type]
    if east is None or north is None or not (np.isfinite(east) and np.isfinite(north)):  # type: ignore[arg-type]
        given = "are empty" if east is None and north is None else f"are {east}, {north}"
        return "bad_coordinates", f"UTM east/north {given} and {latlon}"
    if (zone is None) != (letter is None):
        shown = ["empty" if v is None else repr(v) for v in (zone, letter)]
        return "bad_coordinates", (f"UTM zone number {shown[0]} and letter {shown[1]}: give both, or neither "
                                   "(mock coordinates)")
    if zone is None:
        return "bad_coordinates", f"no UTM zone, and lat/lon cannot give one: {latlon}"
    if not 1 <= zone <= 60:  # type: ignore[operator]
        return "bad_coordinates", f"UTM zone {zone} is not 1..60"
    return "bad_coordinates", f"UTM zone letter {letter!r} is not a latitude band C..X (without I, O)"


def coordinate_frame(zone: np.ndarray) -> str | None:
    """"planar" when every zone key is PLANAR_ZONE, "utm" when none is, None for no rows.

    Raises:
        ValueError: a mix; the caller names example images.
    """
    zone = np.asarray(zone)
    planar = zone == PLANAR_ZONE
    if len(zone) == 0:
        return None
    if planar.all():
        return "planar"
    if not planar.any():
        return "utm"
    raise ValueError(f"{int(planar.sum())} image(s) with mock coordinates and {int((~planar).sum())} in UTM zones")


def _floats(fields: pl.DataFrame, name: str) -> np.ndarray:
    """[N] float64, NaN where the field is empty (polars hands out read-only views: copy)."""
    return fields[name].cast(pl.Float64).fill_null(np.nan).to_numpy().copy()
