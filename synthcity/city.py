"""The city model: a street grid, building footprints with facade styles, street props.

Pure and deterministic: `make_city(seed, city_index, blocks_x, blocks_y)` always returns the
same arrays.  Local coordinates are metres, x east and y north; street centre
lines sit at `grid.xs_m` (running north-south) and `grid.ys_m` (east-west), and
block (i, j) lies between street lines i, i+1 in x and j, j+1 in y.

Facades are deliberately not unique by colour: wall, window, sign and door
colours come from small shared palettes, so many buildings share a palette and a
place is identified by the combination of structure (window grid, floor
heights, ground-floor type, bands, pilasters, building heights and widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDEWALK_M = 2.5  # every street: road in the middle, a sidewalk of this width on each side

# Faces of an axis-aligned footprint, by outward normal; the compass azimuth of
# face k's normal is 90 * k degrees.
NORTH, EAST, SOUTH, WEST = 0, 1, 2, 3

# Materials of the wall between the windows.
STUCCO, BRICK, PANELS, SIDING, STONE, GLASS = range(6)
# Ground-floor types on street-facing faces.
SHOPS, DOORS, GARAGES = range(3)
# Street props.
TREE, LAMP = 0, 1

WALL_PALETTE = np.array(
    [
        [0.86, 0.82, 0.72],  # cream
        [0.78, 0.70, 0.58],  # beige
        [0.70, 0.70, 0.69],  # light grey
        [0.62, 0.33, 0.25],  # brick red
        [0.48, 0.34, 0.26],  # brown
        [0.42, 0.42, 0.44],  # dark grey
        [0.90, 0.90, 0.88],  # white
        [0.88, 0.80, 0.52],  # pale yellow
        [0.62, 0.68, 0.58],  # sage
        [0.62, 0.68, 0.74],  # blue-grey
        [0.74, 0.46, 0.34],  # terracotta
        [0.78, 0.62, 0.36],  # ochre
        [0.50, 0.26, 0.22],  # dark brick
        [0.80, 0.72, 0.60],  # sandstone
    ],
    dtype=np.float32,
)
GLASS_PALETTE = np.array(
    [[0.16, 0.20, 0.26], [0.22, 0.26, 0.30], [0.12, 0.14, 0.16], [0.20, 0.28, 0.32], [0.28, 0.30, 0.30]],
    dtype=np.float32,
)
TRIM_PALETTE = np.array(
    [[0.92, 0.92, 0.90], [0.30, 0.30, 0.32], [0.55, 0.50, 0.42], [0.20, 0.28, 0.22], [0.70, 0.68, 0.62], [0.45, 0.22, 0.18]],
    dtype=np.float32,
)
SIGN_PALETTE = np.array(
    [[0.75, 0.12, 0.12], [0.10, 0.30, 0.60], [0.12, 0.45, 0.22], [0.90, 0.72, 0.10], [0.15, 0.15, 0.15], [0.85, 0.85, 0.82], [0.55, 0.20, 0.55]],
    dtype=np.float32,
)
DOOR_PALETTE = np.array(
    [[0.12, 0.25, 0.15], [0.50, 0.10, 0.10], [0.08, 0.08, 0.09], [0.35, 0.22, 0.12], [0.12, 0.20, 0.40]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class StreetGrid:
    """Street centre lines and widths (road plus both sidewalks), metres."""

    xs_m: np.ndarray  # [NX+1] x of the north-south streets, increasing
    ys_m: np.ndarray  # [NY+1] y of the east-west streets, increasing
    x_width_m: np.ndarray  # [NX+1] full width of each north-south street
    y_width_m: np.ndarray  # [NY+1] full width of each east-west street

    @property
    def blocks_x(self) -> int:
        return len(self.xs_m) - 1

    @property
    def blocks_y(self) -> int:
        return len(self.ys_m) - 1


@dataclass(frozen=True)
class FacadeStyles:
    """Per-building facade parameters, all [B] (colours [B, 3], floats in metres)."""

    wall_rgb: np.ndarray
    material: np.ndarray  # int8, STUCCO..GLASS
    ground_type: np.ndarray  # int8, SHOPS / DOORS / GARAGES
    ground_floor_m: np.ndarray
    floor_m: np.ndarray
    window_spacing_m: np.ndarray  # bay width
    window_width_frac: np.ndarray  # of the bay
    window_height_frac: np.ndarray  # of the floor
    window_sill_frac: np.ndarray  # of the floor, below the window
    window_mullion: np.ndarray  # bool, a vertical bar splits each window
    glass_rgb: np.ndarray
    trim_rgb: np.ndarray  # window frames, pilasters, corner quoins
    band_rgb: np.ndarray  # floor bands and cornice
    band_every: np.ndarray  # int8, a band every n floors (0 = none)
    band_m: np.ndarray
    pilaster_every: np.ndarray  # int8, a pilaster every n bays (0 = none)
    cornice_m: np.ndarray
    sign_m: np.ndarray  # shop sign height
    shop_m: np.ndarray  # shop unit width
    awning_prob: np.ndarray  # chance that a shop unit has an awning
    door_rgb: np.ndarray
    door_spacing_m: np.ndarray
    texture_seed: np.ndarray  # uint32, per-building texture variation (bricks, lit windows, signs)


@dataclass(frozen=True)
class City:
    grid: StreetGrid
    rect_m: np.ndarray  # [B, 4] float32 footprints (x0, y0, x1, y1)
    height_m: np.ndarray  # [B] float32
    street_face: np.ndarray  # [B, 4] bool, face (NORTH..WEST) looks onto a street
    style: FacadeStyles
    prop_xy_m: np.ndarray  # [P, 2] float32 positions of trees and lamps on the sidewalks
    prop_kind: np.ndarray  # [P] int8, TREE / LAMP
    prop_seed: np.ndarray  # [P] uint32, leaf pattern
    prop_size_m: np.ndarray  # [P, 3] float32: crown half-width, crown half-height, crown centre height


def make_grid(rng: np.random.Generator, blocks_x: int, blocks_y: int) -> StreetGrid:
    """Street lines around blocks of 32-60 m, streets 10-15 m wide."""

    def lines(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        widths = rng.choice(np.arange(10.0, 15.5, 0.5), size=n_blocks + 1)
        blocks = rng.uniform(32.0, 60.0, size=n_blocks).round(1)
        centres = np.zeros(n_blocks + 1)
        centres[1:] = np.cumsum(widths[:-1] / 2 + blocks + widths[1:] / 2)
        return centres, widths

    xs, xw = lines(blocks_x)
    ys, yw = lines(blocks_y)
    return StreetGrid(xs.astype(np.float64), ys.astype(np.float64), xw, yw)


def block_rect(grid: StreetGrid, i: int, j: int) -> tuple[float, float, float, float]:
    """Block (i, j) between street lines, as (x0, y0, x1, y1) property lines in metres."""
    return (
        grid.xs_m[i] + grid.x_width_m[i] / 2,
        grid.ys_m[j] + grid.y_width_m[j] / 2,
        grid.xs_m[i + 1] - grid.x_width_m[i + 1] / 2,
        grid.ys_m[j + 1] - grid.y_width_m[j + 1] / 2,
    )


def _split(rng: np.random.Generator, length_m: float, lo_m: float, hi_m: float) -> np.ndarray:
    """Cut [0, length] into lots of lo..hi metres; returns the [n+1] cut positions."""
    cuts = [0.0]
    while length_m - cuts[-1] > hi_m:
        cuts.append(cuts[-1] + rng.uniform(lo_m, hi_m))
    if length_m - cuts[-1] < lo_m / 2 and len(cuts) > 1:
        cuts.pop()  # a sliver at the end joins the last lot
    cuts.append(length_m)
    return np.array(cuts)


def block_lots(rng: np.random.Generator, rect: tuple[float, float, float, float]) -> tuple[list, list]:
    """Footprints along the four edges of one block, with the faces that look onto streets.

    North and south rows span the whole block width; west and east columns fill
    the remaining height, so footprints never overlap.  A lot is sometimes left
    empty (a gap shows the buildings behind) or set back from the property line.
    """
    x0, y0, x1, y1 = rect
    width, depth_total = x1 - x0, y1 - y0
    rows_deep = min(rng.uniform(9.0, 16.0), depth_total / 2)
    rects, faces = [], []

    def add(r: tuple[float, float, float, float], street: list[int]) -> None:
        if rng.random() < 0.07:
            return
        rects.append(r)
        f = np.zeros(4, dtype=bool)
        f[street] = True
        faces.append(f)

    for side in (NORTH, SOUTH):
        cuts = _split(rng, width, 7.0, 18.0)
        for k in range(len(cuts) - 1):
            setback = 0.0 if rng.random() < 0.7 else rng.uniform(0.3, 1.5)
            deep = rows_deep * rng.uniform(0.8, 1.0)
            a, b = x0 + cuts[k], x0 + cuts[k + 1]
            street = [side] + ([WEST] if k == 0 else []) + ([EAST] if k == len(cuts) - 2 else [])
            if side == NORTH:
                add((a, y1 - deep, b, y1 - setback), street)
            else:
                add((a, y0 + setback, b, y0 + deep), street)
    inner = depth_total - 2 * rows_deep
    if inner > 7.0:
        cols_deep = min(rng.uniform(9.0, 16.0), width / 2)
        for side in (WEST, EAST):
            cuts = _split(rng, inner, 7.0, 16.0)
            for k in range(len(cuts) - 1):
                setback = 0.0 if rng.random() < 0.7 else rng.uniform(0.3, 1.5)
                a, b = y0 + rows_deep + cuts[k], y0 + rows_deep + cuts[k + 1]
                if side == WEST:
                    add((x0 + setback, a, x0 + cols_deep, b), [WEST])
                else:
                    add((x1 - cols_deep, a, x1 - setback, b), [EAST])
    return rects, faces


def make_styles(rng: np.random.Generator, height_m: np.ndarray) -> FacadeStyles:
    """Sample facade parameters for B buildings of the given heights."""
    n = len(height_m)

    def pick(palette: np.ndarray, jitter: float) -> np.ndarray:
        rgb = palette[rng.integers(0, len(palette), n)]
        return np.clip(rgb * rng.uniform(1 - jitter, 1 + jitter, (n, 3)), 0, 1).astype(np.float32)

    tall = height_m > 24.0
    material = rng.choice([STUCCO, BRICK, PANELS, SIDING, STONE], size=n, p=[0.35, 0.27, 0.14, 0.1, 0.14])
    material = np.where(tall & (rng.random(n) < 0.5), GLASS, material)
    glass = material == GLASS
    floor_m = rng.uniform(2.9, 3.9, n)
    spacing = rng.uniform(1.8, 4.2, n)
    return FacadeStyles(
        wall_rgb=pick(WALL_PALETTE, 0.04),
        material=material.astype(np.int8),
        ground_type=rng.choice([SHOPS, DOORS, GARAGES], size=n, p=[0.5, 0.35, 0.15]).astype(np.int8),
        ground_floor_m=rng.uniform(3.6, 5.2, n).astype(np.float32),
        floor_m=floor_m.astype(np.float32),
        window_spacing_m=np.where(glass, rng.uniform(1.3, 1.8, n), spacing).astype(np.float32),
        window_width_frac=np.where(glass, 0.92, rng.uniform(0.3, 0.72, n)).astype(np.float32),
        window_height_frac=np.where(glass, 0.9, rng.uniform(0.35, 0.62, n)).astype(np.float32),
        window_sill_frac=np.where(glass, 0.05, rng.uniform(0.18, 0.32, n)).astype(np.float32),
        window_mullion=(rng.random(n) < 0.35),
        glass_rgb=pick(GLASS_PALETTE, 0.05),
        trim_rgb=pick(TRIM_PALETTE, 0.04),
        band_rgb=pick(TRIM_PALETTE, 0.04),
        band_every=rng.choice([0, 1, 2], size=n, p=[0.45, 0.35, 0.2]).astype(np.int8),
        band_m=rng.uniform(0.2, 0.5, n).astype(np.float32),
        pilaster_every=rng.choice([0, 1, 2, 3], size=n, p=[0.55, 0.15, 0.2, 0.1]).astype(np.int8),
        cornice_m=rng.uniform(0.3, 1.2, n).astype(np.float32),
        sign_m=rng.uniform(0.6, 1.1, n).astype(np.float32),
        shop_m=rng.uniform(4.0, 8.0, n).astype(np.float32),
        awning_prob=rng.choice([0.0, 0.5, 1.0], size=n, p=[0.4, 0.3, 0.3]).astype(np.float32),
        door_rgb=pick(DOOR_PALETTE, 0.05),
        door_spacing_m=rng.uniform(4.0, 10.0, n).astype(np.float32),
        texture_seed=rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
    )


def make_props(rng: np.random.Generator, grid: StreetGrid) -> tuple[np.ndarray, np.ndarray]:
    """Trees (on about half the streets) and lamps along the sidewalks, clear of crossings.

    Returns:
        ([P, 2] positions in metres, [P] kinds).
    """
    xy, kind = [], []

    def along(lines: np.ndarray, widths: np.ndarray, cross: np.ndarray, cross_w: np.ndarray, ns: bool) -> None:
        lo, hi = cross[0] - cross_w[0] / 2, cross[-1] + cross_w[-1] / 2
        for c, w in zip(lines, widths):
            trees = rng.random() < 0.5
            for side in (-1.0, 1.0):
                offset = c + side * (w / 2 - SIDEWALK_M + 0.6)  # 0.6 m in from the curb
                pos = lo + rng.uniform(2.0, 10.0)
                while pos < hi:
                    near_crossing = np.min(np.abs(cross - pos) - cross_w / 2) < 2.0
                    if not near_crossing:
                        is_tree = trees and rng.random() < 0.85
                        if is_tree or rng.random() < 0.35:
                            xy.append((offset, pos) if ns else (pos, offset))
                            kind.append(TREE if is_tree else LAMP)
                    pos += rng.uniform(7.0, 14.0) if trees else rng.uniform(12.0, 25.0)

    along(grid.xs_m, grid.x_width_m, grid.ys_m, grid.y_width_m, ns=True)
    along(grid.ys_m, grid.y_width_m, grid.xs_m, grid.x_width_m, ns=False)
    return np.array(xy, dtype=np.float32).reshape(-1, 2), np.array(kind, dtype=np.int8)


def make_city(seed: int, city_index: int, blocks_x: int, blocks_y: int) -> City:
    """The whole city for one (seed, city_index): grid, buildings on every block, styles and props."""
    rng = np.random.default_rng([seed, city_index, 0xC17])
    grid = make_grid(rng, blocks_x, blocks_y)
    rects, faces = [], []
    for j in range(blocks_y):
        for i in range(blocks_x):
            r, f = block_lots(rng, block_rect(grid, i, j))
            rects += r
            faces += f
    n = len(rects)
    # Mostly low and mid rise, a few towers: the skyline above the near facades is a cue too.
    kind = rng.choice(3, size=n, p=[0.5, 0.4, 0.1])
    height = np.choose(kind, [rng.uniform(7, 13, n), rng.uniform(13, 24, n), rng.uniform(24, 45, n)])
    prop_xy, prop_kind = make_props(rng, grid)
    return City(
        grid=grid,
        rect_m=np.array(rects, dtype=np.float32).reshape(-1, 4),
        height_m=height.astype(np.float32),
        street_face=np.array(faces, dtype=bool).reshape(-1, 4),
        style=make_styles(rng, height),
        prop_xy_m=prop_xy,
        prop_kind=prop_kind,
        prop_seed=rng.integers(0, 2**32, len(prop_kind), dtype=np.uint64).astype(np.uint32),
        prop_size_m=np.stack(
            [rng.uniform(1.4, 2.6, len(prop_kind)), rng.uniform(1.5, 2.3, len(prop_kind)), rng.uniform(4.0, 5.4, len(prop_kind))], axis=1
        ).astype(np.float32),
    )
