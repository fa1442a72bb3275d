"""Things on the street drawn as camera-facing billboards: trees, lamps, cars, buses, people.

Trees and lamps belong to the city (the same in every image of a place; only
the season changes the foliage).  Vehicles and pedestrians are occluders drawn
per image.  Every sprite is a shape in its own metric frame (s metres right of
its centre, h metres above the ground), projected with perspective and
depth-tested against the scene, so a car hides the facade behind it but not
the one in front of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from synthcity.camera import Camera
from synthcity.city import LAMP, TREE, City, StreetGrid
from synthcity.ground import ROAD_EW, ROAD_NS, SIDEWALK, street_zone
from synthcity.noise import bits01, frac, hash01_scalar, mix

CAR, BUS, PERSON = 2, 3, 4
MAX_SPRITE_DEPTH_M = 90.0

VEHICLE_RGB = np.array(
    [[0.85, 0.85, 0.85], [0.10, 0.10, 0.11], [0.55, 0.56, 0.58], [0.60, 0.08, 0.08], [0.10, 0.18, 0.45], [0.85, 0.75, 0.20], [0.25, 0.35, 0.25]],
    dtype=np.float32,
)
FOLIAGE = {
    "spring": (np.float32([0.42, 0.60, 0.26]), 0.15),
    "summer": (np.float32([0.20, 0.38, 0.15]), 0.1),
    "autumn": (np.float32([0.62, 0.40, 0.13]), 0.3),
    "winter": (np.float32([0.36, 0.31, 0.27]), 0.75),
}  # season -> (leaf colour, share of the crown that is holes)


@dataclass(frozen=True)
class Sprite:
    kind: int  # TREE, LAMP, CAR, BUS, PERSON
    x_m: float
    y_m: float
    width_m: float  # billboard width as seen from the camera
    rgb: tuple[float, float, float]  # main colour (body, shirt); unused by trees and lamps
    seed: int
    crown: tuple[float, float, float] = (0.0, 0.0, 0.0)  # trees: half-width, half-height, centre height (m)


HEIGHT_M = {TREE: 8.0, LAMP: 6.3, CAR: 1.5, BUS: 3.2, PERSON: 1.75}


def city_sprites(city: City, cam: Camera) -> list[Sprite]:
    """Trees and lamps inside the view and closer than MAX_SPRITE_DEPTH_M."""
    depth, right = cam.to_camera(city.prop_xy_m[:, 0], city.prop_xy_m[:, 1])
    width = np.where(city.prop_kind == TREE, 2.0 * city.prop_size_m[:, 0] + 0.2, 2.2)
    half_view = depth * np.tan(np.radians(cam.fov_deg) / 2) + width / 2
    keep = np.flatnonzero((depth > 1.0) & (depth < MAX_SPRITE_DEPTH_M) & (np.abs(right) < half_view))
    return [
        Sprite(
            int(city.prop_kind[i]), float(city.prop_xy_m[i, 0]), float(city.prop_xy_m[i, 1]), float(width[i]),
            (0.0, 0.0, 0.0), int(city.prop_seed[i]), tuple(float(v) for v in city.prop_size_m[i]),
        )  # fmt: skip
        for i in keep
    ]


def traffic_sprites(grid: StreetGrid, cam: Camera, vehicles: int, pedestrians: int, rng: np.random.Generator) -> list[Sprite]:
    """Vehicles on the roads and people on the sidewalks, 4-35 m ahead, inside the view."""
    out: list[Sprite] = []
    half_fov = math.radians(cam.fov_deg) / 2
    for want, is_vehicle in ((vehicles, True), (pedestrians, False)):
        if want == 0:
            continue
        # Candidate spots in the view; keep the first `want` on the right kind of ground.
        tries = 40 * want
        dist = rng.uniform(4.0, 35.0, tries)
        ang = math.radians(cam.heading_deg) + rng.uniform(-half_fov, half_fov, tries)
        x, y = cam.x_m + dist * np.sin(ang), cam.y_m + dist * np.cos(ang)
        zone = street_zone(grid, x, y)
        ok = np.isin(zone, (ROAD_NS, ROAD_EW)) if is_vehicle else zone == SIDEWALK
        for i in np.flatnonzero(ok)[:want]:
            seed = int(rng.integers(0, 2**31))
            rgb = tuple(float(c) for c in VEHICLE_RGB[rng.integers(len(VEHICLE_RGB))])
            if not is_vehicle:
                out.append(Sprite(PERSON, float(x[i]), float(y[i]), 0.5, rgb, seed))
                continue
            # A bus closer than 8 m would fill the frame: only cars come that close.
            kind = BUS if rng.random() < 0.15 and dist[i] > 8.0 else CAR
            length, wide = (11.0, 2.5) if kind == BUS else (4.4, 1.8)
            # Billboard width: the vehicle's extent across the line of sight.
            rel = ang[i] - (0.0 if zone[i] == ROAD_NS else math.pi / 2)
            width = abs(length * math.sin(rel)) + abs(wide * math.cos(rel))
            out.append(Sprite(kind, float(x[i]), float(y[i]), width, rgb, seed))
    return out


def _shape(sp: Sprite, s: np.ndarray, h: np.ndarray, season: str, night: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mask [h, w], albedo [h, w, 3], emission [h, w, 3] or None) of one sprite on its metric grid."""
    w = sp.width_m
    body = np.float32(sp.rgb)
    a = np.empty(s.shape + (3,), dtype=np.float32)
    e = np.zeros_like(a) if night and sp.kind in (LAMP, CAR, BUS) else None
    if sp.kind == TREE:
        rx, ry, ch = sp.crown
        leaf_rgb, holes = FOLIAGE[season]
        # Leaf clumps 0.2 m across: a spatial hash of the clump's column and row, one mix.
        col = np.floor(s / 0.2).astype(np.int32) * np.int32(73856093)
        row = np.floor(h / 0.2).astype(np.int32) * np.int32(19349663)
        cell = bits01(mix((col ^ row).astype(np.uint32) ^ np.uint32(sp.seed)), 0)
        crown = ((s / rx) ** 2 + ((h - ch) / ry) ** 2 < 1.0) & (cell > holes)
        trunk = (np.abs(s) < 0.14) & (h < ch)
        # Darker towards the bottom of the crown (self-shadow), clump to clump variation on top.
        shade = 0.8 + 0.25 * cell + 0.12 * np.clip((h - ch) / ry, -1.0, 1.0)
        a[:] = leaf_rgb * shade[..., None]
        a[trunk & ~crown] = (0.28, 0.2, 0.14)
        return crown | trunk, a, e
    if sp.kind == LAMP:
        pole = (np.abs(s) < 0.07) & (h < 6.0)
        arm = (s > -0.07) & (s < 0.9) & (h > 5.85) & (h < 6.0)
        head = (s > 0.55) & (s < 1.0) & (h > 5.7) & (h < 5.9)
        a[:] = (0.22, 0.23, 0.24)
        if night:
            e[head] = (1.0, 0.9, 0.7)
        return pole | arm | head, a, e
    if sp.kind == PERSON:
        legs = (np.abs(s) > 0.03) & (np.abs(s) < 0.17) & (h < 0.85)
        torso = (np.abs(s) < 0.23) & (h >= 0.85) & (h < 1.45)
        head = s**2 + (h - 1.58) ** 2 < 0.115**2
        a[:] = body
        a[legs] = np.float32([0.12, 0.13, 0.18]) * (0.7 + 0.6 * hash01_scalar(sp.seed, 1))
        a[head] = np.float32([0.85, 0.65, 0.5]) * (0.5 + 0.5 * hash01_scalar(sp.seed, 2))
        return legs | torso | head, a, e
    tall = 3.1 if sp.kind == BUS else 1.45
    wheel_at = w / 2 - (1.4 if sp.kind == BUS else 0.2 * w)
    wheels = (np.abs(s) - wheel_at) ** 2 + (h - 0.32) ** 2 < 0.32**2
    a[:] = body
    if sp.kind == BUS:
        shell = (np.abs(s) < w / 2) & (h > 0.3) & (h < tall)
        glass = shell & (h > 1.3) & (h < 2.5) & (frac(s / 1.3) > 0.12)
    else:
        shift = (hash01_scalar(sp.seed, 3) - 0.5) * 0.1 * w
        cab = np.abs(s - shift) < w * 0.3 - (h - 0.95) * 0.6
        shell = ((np.abs(s) < w / 2) & (h > 0.22) & (h < 0.95)) | (cab & (h >= 0.95) & (h < tall))
        glass = shell & (h > 0.97) & (h < tall - 0.07) & (np.abs(s - shift) < w * 0.3 - (h - 0.95) * 0.6 - 0.08)
    a[glass] = (0.12, 0.15, 0.19)
    a[shell & (h < 0.38)] *= 0.5  # bumper / skirt in shadow
    a[wheels] = (0.04, 0.04, 0.04)
    if night:
        lamp_rgb = (1.0, 0.95, 0.85) if hash01_scalar(sp.seed, 4) < 0.5 else (0.9, 0.1, 0.05)
        e[shell & (np.abs(s) > w / 2 - 0.35) & (np.abs(s) < w / 2 - 0.08) & (h > 0.6) & (h < 0.78)] = lamp_rgb
    return shell | wheels, a, e


def draw_sprites(
    rgb: np.ndarray, depth: np.ndarray, sprites: list[Sprite], cam: Camera, light_rgb: np.ndarray, season: str, night: bool
) -> None:
    """Draw sprites far to near into rgb [H, W, 3] where they are nearer than depth [H, W] (both updated in place)."""
    f, cy = cam.focal_px, cam.horizon_rows()
    zs, lats = cam.to_camera(np.array([sp.x_m for sp in sprites]), np.array([sp.y_m for sp in sprites]))
    for i in np.argsort(-zs, kind="stable"):
        sp, z, lat = sprites[i], float(zs[i]), float(lats[i])
        if not 1.0 < z < MAX_SPRITE_DEPTH_M:
            continue
        centre = cam.width / 2 + f * lat / z
        half = f * sp.width_m / 2 / z
        c0, c1 = max(0, int(centre - half)), min(cam.width, int(math.ceil(centre + half)))
        if c1 - c0 < 1:
            continue
        top = float(cy[c0:c1].min()) - f * (HEIGHT_M[sp.kind] - cam.height_m) / z
        bottom = float(cy[c0:c1].max()) + f * cam.height_m / z
        r0, r1 = max(0, int(top)), min(cam.height, int(math.ceil(bottom)) + 1)
        if r1 - r0 < 1:
            continue
        cols = np.arange(c0, c1, dtype=np.float32)
        s = np.broadcast_to((cols + 0.5 - centre) * z / f, (r1 - r0, c1 - c0))
        h = cam.height_m - (np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - cy[None, c0:c1]) * z / f
        mask, albedo, emit = _shape(sp, s, h, season, night)
        mask &= z < depth[r0:r1, c0:c1]
        patch = albedo * light_rgb if emit is None else albedo * light_rgb + emit
        rgb[r0:r1, c0:c1][mask] = patch[mask]
        depth[r0:r1, c0:c1][mask] = z
