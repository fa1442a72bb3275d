"""WGS84 <-> UTM for whole arrays, correct across zones and hemispheres.

The `utm` package converts arrays only when every point shares one zone and one
hemisphere (it takes the zone from the first element).  Real VPR data spans
several zones (SF-XL is one, GSV-Cities is 23 cities on four continents), so
these functions compute the zone of every point, group by (zone, hemisphere)
and call `utm` once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import utm

# Latitude bands C..X, 8 degrees each from -80; X is 12 degrees (72..84).
_BAND_LETTERS = np.array(list("CDEFGHJKLMNPQRSTUVWXX"))
UTM_MIN_LAT_DEG = -80.0
UTM_MAX_LAT_DEG = 84.0


@dataclass(frozen=True)
class UtmArrays:
    """UTM coordinates of N points; rows with invalid input hold NaN / 0 / ''."""

    east_m: np.ndarray  # [N] float64
    north_m: np.ndarray  # [N] float64, southern hemisphere has the 10,000 km false northing
    zone_number: np.ndarray  # [N] int16, 1..60 (0 where invalid)
    zone_letter: np.ndarray  # [N] '<U1', latitude band C..X ('' where invalid)
    valid: np.ndarray  # [N] bool


def valid_latlon(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """True where (lat, lon) is finite and inside the UTM domain (-80..84, -180..180)."""
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(lat)
            & np.isfinite(lon)
            & (lat >= UTM_MIN_LAT_DEG)
            & (lat <= UTM_MAX_LAT_DEG)
            & (lon >= -180.0)
            & (lon <= 180.0)
        )


def zone_numbers(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """UTM zone number of each point, with the Norway and Svalbard exceptions.

    Args:
        lat_deg: [N] latitudes in degrees, inside the UTM domain.
        lon_deg: [N] longitudes in degrees, -180..180 (180 counts as zone 60).
    Returns:
        [N] int16 zone numbers 1..60.
    """
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    zone = (np.floor((lon + 180.0) / 6.0).astype(np.int64) % 60) + 1
    zone = np.where(lon == 180.0, 60, zone)
    norway = (lat >= 56.0) & (lat < 64.0) & (lon >= 3.0) & (lon < 12.0)
    zone = np.where(norway, 32, zone)
    svalbard = (lat >= 72.0) & (lat <= 84.0) & (lon >= 0.0)
    zone = np.where(svalbard & (lon < 9.0), 31, zone)
    zone = np.where(svalbard & (lon >= 9.0) & (lon < 21.0), 33, zone)
    zone = np.where(svalbard & (lon >= 21.0) & (lon < 33.0), 35, zone)
    zone = np.where(svalbard & (lon >= 33.0) & (lon < 42.0), 37, zone)
    return zone.astype(np.int16)


def zone_letters(lat_deg: np.ndarray) -> np.ndarray:
    """Latitude band letter (C..X) of each latitude in -80..84 degrees."""
    lat = np.asarray(lat_deg, dtype=np.float64)
    band = np.clip(np.floor((lat + 80.0) / 8.0).astype(np.int64), 0, len(_BAND_LETTERS) - 1)
    return _BAND_LETTERS[band]


def latlon_to_utm(lat_deg: np.ndarray, lon_deg: np.ndarray) -> UtmArrays:
    """Convert [N] lat/lon to UTM, each point in its own zone; invalid points are flagged."""
    lat = np.asarray(lat_deg, dtype=np.float64).reshape(-1)
    lon = np.asarray(lon_deg, dtype=np.float64).reshape(-1)
    n = lat.shape[0]
    valid = valid_latlon(lat, lon)
    east = np.full(n, np.nan)
    north = np.full(n, np.nan)
    zone = np.zeros(n, dtype=np.int16)
    letter = np.full(n, "", dtype="<U1")
    if not valid.any():
        return UtmArrays(east, north, zone, letter, valid)
    idx = np.flatnonzero(valid)
    zone[idx] = zone_numbers(lat[idx], lon[idx])
    letter[idx] = zone_letters(lat[idx])
    northern = lat >= 0.0
    for z in np.unique(zone[idx]):
        for is_north in (True, False):
            group = idx[(zone[idx] == z) & (northern[idx] == is_north)]
            if group.size == 0:
                continue
            e, nn, _, _ = utm.from_latlon(
                lat[group], lon[group], force_zone_number=int(z), force_northern=is_north
            )
            east[group] = e
            north[group] = nn
    return UtmArrays(east, north, zone, letter, valid)


def utm_to_latlon(
    east_m: np.ndarray, north_m: np.ndarray, zone_number: np.ndarray, northern: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `latlon_to_utm` for [N] points in any mix of zones.

    Returns:
        (lat_deg [N], lon_deg [N], valid [N]); invalid rows (out-of-range easting or
        northing, zone outside 1..60) hold NaN.
    """
    east = np.asarray(east_m, dtype=np.float64).reshape(-1)
    north = np.asarray(north_m, dtype=np.float64).reshape(-1)
    zone = np.asarray(zone_number).reshape(-1)
    is_north = np.asarray(northern, dtype=bool).reshape(-1)
    n = east.shape[0]
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    with np.errstate(invalid="ignore"):
        valid = (
            np.isfinite(east)
            & np.isfinite(north)
            & (zone >= 1)
            & (zone <= 60)
            & (east >= 100_000)
            & (east < 1_000_000)
            & (north >= 0)
            & (north <= 10_000_000)
        )
    for z in np.unique(zone[valid]):
        for hemi in (True, False):
            group = np.flatnonzero(valid & (zone == z) & (is_north == hemi))
            if group.size == 0:
                continue
            la, lo = utm.to_latlon(east[group], north[group], int(z), northern=hemi, strict=False)
            lat[group] = la
            lon[group] = lo
    valid &= np.isfinite(lat) & np.isfinite(lon)
    return lat, lon, valid


def is_northern_letter(zone_letter: np.ndarray) -> np.ndarray:
    """True for latitude bands N..X (northern hemisphere)."""
    letters = np.char.upper(np.asarray(zone_letter, dtype="<U1"))
    return letters >= "N"


def cell_col_row(east_m: np.ndarray, north_m: np.ndarray, cell_size_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell column and row of [N] UTM points: floor(coordinate / cell_size_m), int64.

    floor (not truncation) keeps cells square across 0, so -0.5 m is in column -1.
    """
    if not cell_size_m > 0:
        raise ValueError(f"cell_size_m must be > 0, got {cell_size_m}")
    east = np.asarray(east_m, dtype=np.float64)
    north = np.asarray(north_m, dtype=np.float64)
    return np.floor(east / cell_size_m).astype(np.int64), np.floor(north / cell_size_m).astype(np.int64)


def distinct_rows(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Number the distinct rows of [N] integer columns: (first [D] index of each distinct row's first
    occurrence, inverse [N] int64 its number), numbered in ascending order of the rows' values.

    Where the columns' value ranges fit 62 bits together (cells, zones, sectors always do but for
    sub-millimetre cells) each row is packed into one int64 and one 1-D unique does the work,
    several times faster than a unique over [N, k] rows, which remains the fallback.
    """
    columns = [np.asarray(c, dtype=np.int64) for c in columns]
    n = len(columns[0]) if columns else 0
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    lows = [int(c.min()) for c in columns]
    bits = [(int(c.max()) - low).bit_length() for c, low in zip(columns, lows)]
    if sum(bits) <= 62:
        packed = np.zeros(n, dtype=np.int64)
        for column, low, width in zip(columns, lows, bits):
            packed = (packed << width) | (column - low)
        _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
    else:
        _, first, inverse = np.unique(np.stack(columns, axis=1), axis=0, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def utm_cell_keys(zone: np.ndarray, northern: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Cell keys "utm:<zone><N|S>:<col>:<row>" of [N] points, [N] object array.

    The zone and hemisphere are part of the key: cell (col, row) in zone 10N and in zone
    11N are places hundreds of km apart although their metric coordinates coincide.
    Strings are made once per distinct cell (about 1 per 10-20 images), then broadcast,
    since formatting millions of strings in Python is the slow part.
    """
    zone, col, row = (np.asarray(a, np.int64) for a in (zone, col, row))
    northern = np.asarray(northern, bool)
    if len(zone) == 0:
        return np.empty(0, dtype=object)
    first, inverse = distinct_rows([zone, northern.astype(np.int64), col, row])
    keys = np.array([f"utm:{z}{'N' if n else 'S'}:{c}:{r}" for z, n, c, r in
                     zip(zone[first].tolist(), northern[first].tolist(), col[first].tolist(), row[first].tolist())],
                    dtype=object)
    return keys[inverse]
