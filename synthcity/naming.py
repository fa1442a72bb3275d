"""Real-world coordinates and the file names of the two dataset formats written.

Local metres become UTM by adding the origin's easting and northing (x east, y
north), and lat/lon by inverting UTM in the origin's zone, so the UTM fields of
a name and its lat/lon agree to the centimetre.

`@` names (SF-XL, Pitts, Tokyo 24/7, as written by gmberton/VPR-datasets-downloader):
14 fields plus the extension, each field preceded by `@`:
    @utm_east@utm_north@utm_zone_number@utm_zone_letter@lat@lon@pano_id@tile_num
    @heading@pitch@roll@height@timestamp@note@.jpg
so `name.split("@")` gives 16 items: "", the 14 fields, ".jpg" (heading is item 9,
as CosPlace reads it).
GSV-Cities names:
    <City>_<place_id:07d>_<year>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg
with <lat>/<lon> exactly the strings of the city's CSV row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from placeforge import geo

GSV_CSV_HEADER = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Origin:
    """A city's local (0, 0) on the globe."""

    lat_deg: float
    lon_deg: float
    east_m: float
    north_m: float
    zone: int
    letter: str
    northern: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "lat": self.lat_deg, "lon": self.lon_deg, "utm_east": round(self.east_m, 3),
            "utm_north": round(self.north_m, 3), "utm_zone": self.zone, "utm_letter": self.letter,
            "hemisphere": "north" if self.northern else "south",
        }  # fmt: skip


def make_origin(lat_deg: float, lon_deg: float) -> Origin:
    utm = geo.latlon_to_utm(np.array([lat_deg]), np.array([lon_deg]))
    return Origin(
        lat_deg, lon_deg, float(utm.east_m[0]), float(utm.north_m[0]), int(utm.zone_number[0]), str(utm.zone_letter[0]), lat_deg >= 0
    )


def shifted_origin(origin: Origin, east_m: float) -> Origin:
    """`origin` moved `east_m` metres east in its own UTM zone (lat/lon recomputed, zone kept)."""
    east = origin.east_m + east_m
    lat, lon, valid = geo.utm_to_latlon(np.array([east]), np.array([origin.north_m]), np.array([origin.zone]),
                                        np.array([origin.northern]))  # fmt: skip
    if not valid.all():
        raise ValueError("a city origin moved outside the UTM domain; move the @ origin")
    return Origin(float(lat[0]), float(lon[0]), east, origin.north_m, origin.zone, origin.letter, origin.northern)


def to_global(origin: Origin, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local metres [N] -> (utm_east [N], utm_north [N], lat [N], lon [N]) in the origin's zone."""
    east = origin.east_m + np.asarray(x_m, dtype=np.float64)
    north = origin.north_m + np.asarray(y_m, dtype=np.float64)
    zone = np.full(east.shape, origin.zone)
    lat, lon, valid = geo.utm_to_latlon(east, north, zone, np.full(east.shape, origin.northern))
    if not valid.all():
        raise ValueError("the city reaches outside the UTM domain of its origin; move the origin")
    return east, north, lat, lon


def short_id(length: int, *parts: object) -> str:
    """A stable alphanumeric id of `length` characters from the parts (blake2b, base 62)."""
    number = int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=24).digest(), "little")
    out = []
    for _ in range(length):
        number, digit = divmod(number, len(_ALNUM))
        out.append(_ALNUM[digit])
    return "".join(out)


def heading_text(heading_deg: float) -> str:
    """Heading with 2 decimals in [0, 360): 359.999 rounds to 0.00, never 360.00."""
    text = f"{heading_deg % 360.0:.2f}"
    return "0.00" if text == "360.00" else text


def at_name(
    east_m: float, north_m: float, zone: int, letter: str, lat_deg: float, lon_deg: float, pano_id: str,
    tile_num: int, heading_deg: float, pitch_deg: float, roll_deg: float, timestamp: str, note: str,
) -> str:  # fmt: skip
    """The `@` file name; height is left empty (every camera is at the same height)."""
    fields = [
        f"{east_m:.2f}", f"{north_m:.2f}", f"{zone:02d}", letter.upper(), f"{lat_deg:.7f}", f"{lon_deg:.7f}",
        pano_id, str(tile_num), heading_text(heading_deg), f"{pitch_deg:.2f}", f"{roll_deg:.2f}", "",
        timestamp, note,
    ]  # fmt: skip
    for field in fields:
        if "@" in field or "/" in field:
            raise ValueError(f"field {field!r} would break the @ name")
    return "@" + "@".join(fields) + "@.jpg"


def gsv_name(city: str, place_id: int, year: int, month: int, northdeg: int, lat: str, lon: str, panoid: str) -> str:
    """The GSV-Cities file name; lat and lon are the CSV strings, copied verbatim."""
    return f"{city}_{place_id:07d}_{year}_{month:02d}_{northdeg:03d}_{lat}_{lon}_{panoid}.jpg"


def northdeg(heading_deg: float) -> int:
    """Whole-degree heading in 0..359 as GSV-Cities stores it."""
    return int(round(heading_deg)) % 360
