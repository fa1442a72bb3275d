"""A 2.5-D ray caster: one horizontal ray per image column against every building footprint.

Per column the K nearest wall hits are kept (a tall building can show above a
low one in front of it); per pixel the nearest hit whose wall spans that
pixel's height wins.  Pixels no wall covers are ground (below the horizon,
intersected with the ground plane) or sky.  Then facades, ground and sky are
shaded, street props and traffic are drawn with a depth test, and the
appearance (fog, rain, exposure, blur, noise) turns it into a uint8 photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthcity.camera import Camera
from synthcity.city import EAST, LAMP, NORTH, SOUTH, WEST, City
from synthcity.conditions import Appearance, finish
from synthcity.facade import shade_facade
from synthcity.ground import ground_albedo, sky_colour
from synthcity.sprites import city_sprites, draw_sprites, traffic_sprites

MAX_VIEW_M = 400.0
LAYERS = 3  # wall hits kept per column
FACE_NORMAL_AZ_RAD = np.radians([0.0, 90.0, 180.0, 270.0]).astype(np.float32)  # NORTH, EAST, SOUTH, WEST


@dataclass(frozen=True)
class WallHits:
    """The LAYERS nearest wall hits of every column, nearest first ([W, K]; misses have t = inf)."""

    t_m: np.ndarray  # ray length to the hit
    building: np.ndarray  # int64
    face: np.ndarray  # int64, NORTH..WEST
    u_m: np.ndarray  # metres along the face, left to right seen from outside
    face_width_m: np.ndarray


def visible_buildings(city: City, cam: Camera) -> np.ndarray:
    """Indices of buildings within MAX_VIEW_M that may touch the field of view.

    The view is the wedge between two boundary lines; a convex footprint whose four
    corners all lie beyond one of them cannot be seen (a conservative test).
    """
    x0, y0, x1, y1 = city.rect_m.T
    gap_x = np.maximum(np.maximum(x0 - cam.x_m, cam.x_m - x1), 0.0)
    gap_y = np.maximum(np.maximum(y0 - cam.y_m, cam.y_m - y1), 0.0)
    near = np.hypot(gap_x, gap_y) < MAX_VIEW_M
    depth, right = cam.to_camera(np.stack([x0, x0, x1, x1]), np.stack([y0, y1, y0, y1]))  # [4, B]
    half = np.radians(cam.fov_deg / 2 + 2.0)
    beyond_right = (right * np.cos(half) - depth * np.sin(half) > 0).all(axis=0)
    beyond_left = (-right * np.cos(half) - depth * np.sin(half) > 0).all(axis=0)
    return np.flatnonzero(near & (depth.max(axis=0) > 0.0) & ~beyond_right & ~beyond_left)


def cast_walls(city: City, cam: Camera) -> WallHits:
    """Slab-test every column ray against every visible footprint: [W] x [B] at once."""
    dir_x, dir_y, _ = cam.column_rays()
    idx = visible_buildings(city, cam)
    w = cam.width
    if idx.size == 0:
        none = np.zeros((w, LAYERS), dtype=np.int64)
        flat = np.zeros((w, LAYERS), dtype=np.float32)
        return WallHits(np.full((w, LAYERS), np.inf, dtype=np.float32), none, none, flat, flat)
    x0, y0, x1, y1 = (c[None, :] for c in city.rect_m[idx].T)  # [1, B]
    dx = np.where(np.abs(dir_x) < 1e-6, 1e-6, dir_x)[:, None]  # [W, 1]
    dy = np.where(np.abs(dir_y) < 1e-6, 1e-6, dir_y)[:, None]
    tx_a, tx_b = (x0 - cam.x_m) / dx, (x1 - cam.x_m) / dx  # [W, B]
    ty_a, ty_b = (y0 - cam.y_m) / dy, (y1 - cam.y_m) / dy
    tx_near, ty_near = np.minimum(tx_a, tx_b), np.minimum(ty_a, ty_b)
    t_near = np.maximum(tx_near, ty_near)
    t_far = np.minimum(np.maximum(tx_a, tx_b), np.maximum(ty_a, ty_b))
    hit = (t_near <= t_far) & (t_near > 0.0) & (t_near < MAX_VIEW_M)
    t = np.where(hit, t_near, np.inf).astype(np.float32)

    # The K nearest by repeated argmin: cheaper than argpartition + argsort for K = 3.
    rows = np.arange(w)
    pick = np.empty((w, LAYERS), dtype=np.int64)
    t_k = np.empty((w, LAYERS), dtype=np.float32)
    for k in range(LAYERS):
        pick[:, k] = np.argmin(t, axis=1)
        t_k[:, k] = t[rows, pick[:, k]]
        t[rows, pick[:, k]] = np.inf
    x_face = np.take_along_axis(tx_near > ty_near, pick, axis=1)  # the ray entered through an x slab
    rect = city.rect_m[idx[pick]]  # [W, k, 4]
    hx = cam.x_m + np.where(np.isfinite(t_k), t_k, 0.0) * dir_x[:, None]
    hy = cam.y_m + np.where(np.isfinite(t_k), t_k, 0.0) * dir_y[:, None]
    # Entering through x = x0 while moving east means the west face, and so on.
    face = np.where(x_face, np.where(dir_x[:, None] > 0, WEST, EAST), np.where(dir_y[:, None] > 0, SOUTH, NORTH))
    u = np.select(
        [face == NORTH, face == EAST, face == SOUTH],
        [rect[..., 2] - hx, hy - rect[..., 1], hx - rect[..., 0]],
        rect[..., 3] - hy,
    )
    width = np.where(x_face, rect[..., 3] - rect[..., 1], rect[..., 2] - rect[..., 0])
    return WallHits(t_k, idx[pick], face, u.astype(np.float32), width.astype(np.float32))


def light_on_faces(app: Appearance) -> np.ndarray:
    """[4, 3] light reaching walls facing NORTH..WEST (ambient plus direct sun)."""
    cos = np.cos(FACE_NORMAL_AZ_RAD - np.radians(app.sun_az_deg))
    return (app.ambient_rgb + app.sun_rgb * np.maximum(cos, 0.0)[:, None]).astype(np.float32)


def render_view(city: City, cam: Camera, app: Appearance, seed: int) -> np.ndarray:
    """Render one photo.

    Args:
        city: the scene.
        cam: pose and intrinsics; the image is cam.height x cam.width.
        app: time, weather, occluders and camera defects.
        seed: per-image seed (clouds, traffic, lit windows, rain, noise).
    Returns:
        uint8 [H, W, 3].
    """
    rng = np.random.default_rng(seed)
    h, w, f = cam.height, cam.width, cam.focal_px
    dir_x, dir_y, cos_off = cam.column_rays()
    hits = cast_walls(city, cam)
    horizon = cam.horizon_rows()  # [W]
    z_layers = hits.t_m * cos_off[:, None]  # [W, K] depth along the optical axis
    # Rows each wall spans: its top edge at the building height, its foot on the ground.
    with np.errstate(invalid="ignore", divide="ignore"):
        top = horizon[:, None] - f * (city.height_m[hits.building] - cam.height_m) / z_layers  # [W, K]
        foot = horizon[:, None] + f * cam.height_m / z_layers
    top = np.where(np.isfinite(z_layers), top, np.inf)  # a miss covers no row
    row = np.arange(h, dtype=np.float32)[:, None] + 0.5
    layer = np.full((h, w), -1, dtype=np.int8)
    for k in range(LAYERS - 1, -1, -1):  # far to near, so the nearest covering wall wins
        layer[(row >= top[None, :, k]) & (row <= foot[None, :, k])] = k

    rgb = np.empty((h * w, 3), dtype=np.float32)
    depth = np.full(h * w, np.inf, dtype=np.float32)  # along the optical axis
    flat = layer.reshape(-1)

    def dy_of(i: np.ndarray) -> np.ndarray:
        """Pixels below the horizon of flat pixel indices i (negative above it)."""
        return (i // w).astype(np.float32) + 0.5 - horizon[i % w]

    i = np.flatnonzero(flat >= 0)
    if i.size:
        column = (i % w) * LAYERS + flat[i]  # index into the [W * K] column-layers
        z_col = z_layers.reshape(-1)
        b_col, face_col = hits.building.reshape(-1), hits.face.reshape(-1)
        z = z_col[column]
        albedo, emit = shade_facade(
            city.style, b_col, face_col, hits.u_m.reshape(-1), hits.face_width_m.reshape(-1),
            city.height_m[b_col], city.street_face[b_col, face_col], z_col / f,
            column, cam.height_m - dy_of(i) * z / f, app.lit_fraction, seed & 0xFFFF,
        )  # fmt: skip
        rgb[i] = albedo * light_on_faces(app)[face_col[column]] + emit
        depth[i] = z

    open_px = np.flatnonzero(flat < 0)
    dy = dy_of(open_px)
    i, dy_ground = open_px[dy > 0], dy[dy > 0]
    if i.size:
        cc = i % w
        z = f * cam.height_m / dy_ground
        dist = z / cos_off[cc]
        gx, gy = cam.x_m + dist * dir_x[cc], cam.y_m + dist * dir_y[cc]
        albedo = ground_albedo(city.grid, gx, gy, dist / f, dist * dist / (f * cam.height_m))
        if app.wet:  # wet asphalt: darker, with a sheen of sky
            albedo = albedo * 0.6 + app.sky_horizon_rgb * 0.12
        rgb[i] = albedo * (app.ambient_rgb + app.sun_rgb * 0.7) + lamp_pools(city, cam, gx, gy, app)
        depth[i] = z

    i = open_px[dy <= 0]
    rgb[i] = sky_colour(np.arctan(-dy[dy <= 0] / f), i, (h, w), app, rng)

    rgb, depth = rgb.reshape(h, w, 3), depth.reshape(h, w)
    sprites = city_sprites(city, cam)
    sprites += traffic_sprites(city.grid, cam, app.vehicles, app.pedestrians, rng)
    if sprites:
        draw_sprites(rgb, depth, sprites, cam, app.ambient_rgb + app.sun_rgb * 0.5, app.season, app.time == "night")
    distance = depth / cos_off[None, :]
    if app.weather not in ("fog", "rain"):
        distance[np.isinf(distance)] = 0.0  # the sky colour already holds the haze; only fog and rain wash it out
    return finish(rgb, distance, app, rng)


def lamp_pools(city: City, cam: Camera, x_m: np.ndarray, y_m: np.ndarray, app: Appearance) -> np.ndarray:
    """[N, 3] light that street lamps add to the ground points around them when they are on."""
    out = np.zeros((len(x_m), 3), dtype=np.float32)
    if not app.lamps_on or x_m.size == 0:
        return out
    lamps = city.prop_xy_m[city.prop_kind == LAMP]
    depth, right = cam.to_camera(lamps[:, 0], lamps[:, 1])
    lamps = lamps[(depth > -10.0) & (np.hypot(depth, right) < 60.0)]  # pools further away are a few pixels
    glow = np.zeros(len(x_m), dtype=np.float32)
    for lx, ly in lamps:
        glow += np.exp(-((x_m - lx) ** 2 + (y_m - ly) ** 2) / (2 * 5.0**2))
    strength = 0.45 if app.time == "night" else 0.15
    return np.minimum(glow, 1.5)[:, None] * np.float32([1.0, 0.85, 0.6]) * strength
