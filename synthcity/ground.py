"""What the camera sees below and above the buildings: roads, sidewalks, markings, sky.

The ground is a pure function of world position (so markings and paving stay
put between images and recede in perspective by themselves); the sky depends
only on the viewing elevation and the image's appearance.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from synthcity.city import SIDEWALK_M, StreetGrid
from synthcity.conditions import Appearance
from synthcity.noise import bits01, fade, frac, mix

ASPHALT = np.array([0.30, 0.30, 0.32], dtype=np.float32)
PAVING = np.array([0.62, 0.60, 0.56], dtype=np.float32)
CURB = np.array([0.74, 0.73, 0.70], dtype=np.float32)
COURTYARD = np.array([0.33, 0.36, 0.29], dtype=np.float32)
PAINT_WHITE = np.array([0.88, 0.88, 0.84], dtype=np.float32)
PAINT_YELLOW = np.array([0.86, 0.70, 0.20], dtype=np.float32)

# Street zones returned by `street_zone`.
OFF_STREET, SIDEWALK, ROAD_NS, ROAD_EW = 0, 1, 2, 3


def _nearest_line(lines: np.ndarray, widths: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed offset from the nearest street centre line and that street's width, per point."""
    lines = lines.astype(p.dtype)
    k = np.clip(np.searchsorted(lines, p), 1, len(lines) - 1)
    k = np.where(np.abs(p - lines[k - 1]) < np.abs(p - lines[k]), k - 1, k)
    return (p - lines[k]).astype(np.float32), widths[k].astype(np.float32)


def street_zone(grid: StreetGrid, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
    """[N] OFF_STREET / SIDEWALK / ROAD_NS / ROAD_EW of world points (crossings count as ROAD_NS)."""
    dx, wx = _nearest_line(grid.xs_m, grid.x_width_m, np.asarray(x_m, dtype=np.float64))
    dy, wy = _nearest_line(grid.ys_m, grid.y_width_m, np.asarray(y_m, dtype=np.float64))
    zone = np.where((np.abs(dx) < wx / 2) | (np.abs(dy) < wy / 2), SIDEWALK, OFF_STREET)
    zone = np.where(np.abs(dy) < wy / 2 - SIDEWALK_M, ROAD_EW, zone)
    return np.where(np.abs(dx) < wx / 2 - SIDEWALK_M, ROAD_NS, zone)


SURFACES = np.stack([COURTYARD, PAVING, CURB, ASPHALT])  # indexed by the labels below
_COURTYARD, _PAVING, _CURB, _ASPHALT = range(4)


def ground_albedo(grid: StreetGrid, x_m: np.ndarray, y_m: np.ndarray, px_lat_m: np.ndarray, px_depth_m: np.ndarray) -> np.ndarray:
    """Colour [N, 3] of the ground at N world points.

    Args:
        x_m, y_m: [N] world position of each ground pixel.
        px_lat_m: [N] metres one pixel spans across the view (thin lines fade below it).
        px_depth_m: [N] metres one pixel spans along the view (dashes and stripes fade).
    """
    x, y = np.asarray(x_m, dtype=np.float32), np.asarray(y_m, dtype=np.float32)
    dx, wx = _nearest_line(grid.xs_m, grid.x_width_m, x)
    dy, wy = _nearest_line(grid.ys_m, grid.y_width_m, y)
    adx, ady = np.abs(dx), np.abs(dy)
    in_ns, in_ew = adx < wx / 2, ady < wy / 2
    road_ns, road_ew = adx < wx / 2 - SIDEWALK_M, ady < wy / 2 - SIDEWALK_M
    road = road_ns | road_ew
    px = np.minimum(px_lat_m, px_depth_m)

    # One surface label and one brightness factor per point; colours are looked up once.
    surface = (in_ns | in_ew).astype(np.int8)  # _COURTYARD or _PAVING
    surface[~road & ((in_ns & (adx < wx / 2 - SIDEWALK_M + 0.2)) | (in_ew & (ady < wy / 2 - SIDEWALK_M + 0.2)))] = _CURB
    surface[road] = _ASPHALT
    factor = np.ones(len(x), dtype=np.float32)
    i = np.flatnonzero(road)
    # Asphalt grain in 25 cm cells: a spatial hash (two primes) and one mix.
    cell = (np.floor(x[i] * 4).astype(np.int32) * np.int32(73856093)) ^ (np.floor(y[i] * 4).astype(np.int32) * np.int32(19349663))
    factor[i] = 1.0 + (0.16 * bits01(mix(cell.astype(np.uint32)), 0) - 0.08) * fade(px[i], 0.25)
    i = np.flatnonzero(surface == _PAVING)
    tiles = (frac(x[i] / 1.2) < 0.05) | (frac(y[i] / 1.2) < 0.05)
    factor[i] = 1.0 - 0.15 * tiles * fade(px[i], 1.2)
    rgb = SURFACES[surface] * factor[:, None]

    # Paint: dashed centre lines (3 m on, 3 m off) away from crossings, and zebra crossings
    # just before each junction.  A line thinner than a pixel is blended by its coverage
    # instead of flickering in and out.  Patterns are evaluated only where paint can be.
    paint = np.zeros(len(x), dtype=np.float32)
    yellow = np.zeros(len(x), dtype=bool)
    for off, along, road_here, crossing, is_yellow in ((adx, y, road_ns, in_ew, True), (ady, x, road_ew, in_ns, False)):
        i = np.flatnonzero(road_here & ~crossing & (off < np.maximum(0.08, px_lat_m / 2)))
        dash = np.where(px_depth_m[i] > 2.0, 0.5, (frac(along[i] / 6.0) < 0.5).astype(np.float32))
        paint[i] = np.minimum(1.0, 0.16 / np.maximum(px_lat_m[i], 1e-3)) * dash
        yellow[i] = is_yellow
    for off, cross_off, cross_w, road_here in ((dx, ady, wy, road_ns), (dy, adx, wx, road_ew)):
        before = cross_off - cross_w / 2
        i = np.flatnonzero(road_here & (before > 0.6) & (before < 3.6))
        i = i[frac(off[i] / 0.9) < 0.5]
        paint[i] = 0.8 * fade(px[i], 0.9)
        yellow[i] = False
    i = np.flatnonzero(paint > 0)
    colour = np.where(yellow[i, None], PAINT_YELLOW, PAINT_WHITE)
    rgb[i] = rgb[i] * (1 - paint[i, None]) + colour * paint[i, None]
    return rgb


def sky_colour(elevation_rad: np.ndarray, flat_index: np.ndarray, shape: tuple[int, int], app: Appearance, rng: np.random.Generator) -> np.ndarray:
    """[N, 3] sky colour of N pixels from their viewing elevation, with a low-frequency cloud layer.

    Args:
        elevation_rad: [N] angle above the horizon.
        flat_index: [N] row * W + column of each pixel (where it samples the cloud field).
        shape: (H, W) of the image.
    """
    t = np.clip(elevation_rad / np.radians(35.0), 0.0, 1.0)[:, None]
    sky = app.sky_horizon_rgb * (1 - t) + app.sky_zenith_rgb * t
    if app.cloudiness > 0 and flat_index.size:
        h, w = shape
        coarse = rng.random((4, 6)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).reshape(-1)[flat_index]
        cover = np.clip((field - (1.0 - app.cloudiness)) * 2.5, 0.0, 1.0)[:, None]
        cloud = app.sky_horizon_rgb * 0.6 + np.float32(0.35) * (app.time != "night")
        sky = sky * (1 - cover) + cloud * cover
    return sky.astype(np.float32)
