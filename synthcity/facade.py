"""Procedural facade texture: colour and light of a wall point from its building's style.

A facade point is (building, face, u, v): u metres along the face from its left
edge as seen from the street, v metres above the ground.  Everything is a pure
function of those and the style arrays, so a facade reads the same from any
camera; only `lit_fraction` and `salt` (which windows are lit tonight) change
with the image.

For speed each point first gets a one-byte label (wall, band, frame, glass,
sign, door...) from cheap masks painted in order, nearer layers overwriting;
colours are then computed once per label, only for the points that carry it.
"""

from __future__ import annotations

import numpy as np

from synthcity.city import BRICK, DOORS, GARAGES, SHOPS, SIGN_PALETTE, STONE, FacadeStyles
from synthcity.noise import bits01, fade, frac, hash01, hash_u32, mix

WARM_LIGHT = np.array([1.0, 0.82, 0.5], dtype=np.float32)
COOL_LIGHT = np.array([0.75, 0.85, 1.0], dtype=np.float32)
SHOP_GLASS = np.array([0.10, 0.12, 0.13], dtype=np.float32)
CURTAIN = np.array([0.80, 0.76, 0.66], dtype=np.float32)
STEP_RGB = np.array([0.70, 0.68, 0.64], dtype=np.float32)
CANVAS = np.array([0.90, 0.88, 0.80], dtype=np.float32)

# Labels, painted in this order of precedence (later ones overwrite).
WALL, BAND, PILASTER, FRAME, GLASS, CORNICE, SHADOW, QUOIN, PLINTH, DOOR, STEP, GARAGE, RIB, LAMP = range(14)
SIGN, LETTER, AWNING, SHOPFRONT, SHOP_BAR = range(14, 19)


# Wall materials as a pattern of courses (rows) and joints, indexed by material id
# (STUCCO, BRICK, PANELS, SIDING, STONE, GLASS).  Stucco has "courses" only to vary its tint.
COURSE_M = np.float32([0.7, 0.3, 3.0, 0.22, 0.6, 1.0])  # row height
UNIT_M = np.float32([0.7, 0.9, 2.4, 1e3, 1.2, 1e3])  # unit length along the row
STAGGER = np.float32([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])  # odd rows shift by this share of a unit
ROW_JOINT = np.float32([0.0, 0.14, 0.025, 0.18, 0.07, 0.0])  # share of a row that is joint
UNIT_JOINT = np.float32([0.0, 0.07, 0.03, 0.0, 0.04, 0.0])  # share of a unit that is joint
JOINT_SHADE = np.float32([1.0, 1.3, 0.72, 0.78, 0.78, 1.0])  # mortar is lighter than brick
TINT_BASE = np.float32([0.95, 0.9, 0.95, 1.0, 0.92, 1.0])
TINT_SPAN = np.float32([0.1, 0.2, 0.1, 0.0, 0.14, 0.0])  # per-unit brightness variation
FADE_M = np.float32([0.7, 0.3, 1.2, 0.22, 0.6, 1.0])  # pattern scale that fades with distance


class _Material:
    """Per-column part of the wall pattern ([M] arrays); `shade` finishes it per point."""

    def __init__(self, material: np.ndarray, u: np.ndarray, seed: np.ndarray, px: np.ndarray) -> None:
        self.course, self.row_joint = COURSE_M[material], ROW_JOINT[material]
        self.joint_shade, self.base, self.span = JOINT_SHADE[material], TINT_BASE[material], TINT_SPAN[material]
        self.amp = np.clip(2.0 - 2.5 * px / FADE_M[material], 0.0, 1.0)  # as noise.fade, per material
        unit = u / UNIT_M[material]
        self.key, self.unit_joint = [], []
        for parity in (0, 1):  # even and odd courses (bricks are staggered)
            shifted = unit + STAGGER[material] * parity
            self.key.append(hash_u32(seed, np.floor(shifted)))
            self.unit_joint.append(shifted - np.floor(shifted) < UNIT_JOINT[material])

    def shade(self, c: np.ndarray, v: np.ndarray) -> np.ndarray:
        """[N] brightness factor of wall points on columns c at heights v."""
        t = v / self.course[c]
        row = np.floor(t)
        odd = (row.astype(np.int32) & 1).astype(bool)
        key = np.where(odd, self.key[1][c], self.key[0][c])
        joint = (t - row < self.row_joint[c]) | np.where(odd, self.unit_joint[1][c], self.unit_joint[0][c])
        tint = self.base[c] + self.span[c] * bits01(mix(key ^ row.astype(np.int32).astype(np.uint32)), 0)
        f = np.where(joint, self.joint_shade[c], tint)
        return 1.0 + (f - 1.0) * self.amp[c]


class _Columns:
    """Everything about a facade column that depends on u only, computed once per column ([M] arrays)."""

    def __init__(self, s: FacadeStyles, b: np.ndarray, face: np.ndarray, u: np.ndarray, width: np.ndarray,
                 height: np.ndarray, street: np.ndarray, px: np.ndarray) -> None:  # fmt: skip
        self.b, self.u, self.px = b, u, px
        self.seed = s.texture_seed[b] ^ (face.astype(np.uint32) * np.uint32(0x9E3779B1))
        self.gf, self.fh = s.ground_floor_m[b], s.floor_m[b]
        self.top = height - s.cornice_m[b]
        self.floors = np.floor((self.top - self.gf - 0.2) / self.fh)  # whole floors under the cornice
        self.every, self.band_m = s.band_every[b], s.band_m[b]
        self.ww, self.wh, self.sill = s.window_width_frac[b], s.window_height_frac[b], s.window_sill_frac[b]
        sp = s.window_spacing_m[b]
        n_cols = np.maximum(1.0, np.floor((width - 1.2) / sp))
        uc = u - (width - n_cols * sp) / 2  # window bays centred on the face
        col = np.floor(uc / sp)
        du = np.abs(uc / sp - col - 0.5)  # distance from the bay centre, in bays
        in_cols = (col >= 0) & (col < n_cols)
        self.frame_v = 0.09 / self.fh
        self.window = in_cols & (du < self.ww / 2)
        self.frame = in_cols & (du < self.ww / 2 + 0.09 / sp)
        self.mullion = self.window & s.window_mullion[b] & (du < 0.045 / sp)
        self.bay_key = hash_u32(self.seed, col)
        edge = np.round(uc / sp)
        pil = s.pilaster_every[b]
        self.pilaster = (pil > 0) & (np.abs(uc - edge * sp) < 0.22) & (edge % np.maximum(pil, 1) == 0)
        self.pilaster &= (edge >= 0) & (edge <= n_cols)
        self.quoin = np.isin(s.material[b], (BRICK, STONE)) & ((u < 0.45) | (u > width - 0.45))
        self.kind = np.where(street, s.ground_type[b], -1)
        off = np.abs(u - (np.floor(u / s.door_spacing_m[b]) + 0.5) * s.door_spacing_m[b])
        ok = (self.kind == DOORS) & (u > 0.8) & (u < width - 0.8)
        self.door_frame, self.door, self.step, self.lamp = ok & (off < 0.72), ok & (off < 0.6), ok & (off < 0.9), ok & (off < 0.12)
        g_off = np.abs(u - (np.floor(u / 6.5) + 0.5) * 6.5)
        self.garage = (self.kind == GARAGES) & (g_off < 1.4) & (u > 0.8) & (u < width - 0.8)
        # Shop units: each has its own sign colour, lettering, awning and door.
        unit_w = width / np.maximum(1.0, np.round(width / s.shop_m[b]))
        unit = np.floor(u / unit_w)
        fu = u / unit_w - unit
        self.unit_key = hash_u32(self.seed, unit)
        self.shop = (self.kind == SHOPS) & (fu > 0.04) & (fu < 0.96)
        self.sign_top = self.gf - 0.3
        self.sign_bot = self.sign_top - s.sign_m[b]
        awning = self.shop & (bits01(self.unit_key, 0) < s.awning_prob[b])
        self.glass_top = np.where(awning, self.sign_bot - 0.9, self.sign_bot) - 0.1
        self.letter = (np.abs(fu - 0.5) < 0.3) & (hash01(self.unit_key, np.floor(u / 0.28)) < 0.75) & (frac(u / 0.28) < 0.7)
        self.letter_half = s.sign_m[b] * 0.28
        self.shop_bar = (frac(u / 1.6) < 0.04) | (np.abs(fu - 0.2 - 0.6 * bits01(self.unit_key, 16)) * unit_w < 0.55)
        self.sign_rgb = SIGN_PALETTE[(self.unit_key >> np.uint32(8)) % np.uint32(len(SIGN_PALETTE))]
        letter_rgb = np.where((self.sign_rgb.mean(axis=1) > 0.45)[:, None], 0.08, 0.95).astype(np.float32)
        amp = fade(px, 0.28)[:, None]
        self.letter_rgb = letter_rgb * amp + self.sign_rgb * (1 - amp)
        self.stripe_rgb = np.where((frac(u / 0.5) < 0.5)[:, None], self.sign_rgb, CANVAS)
        self.goods_u = np.floor(u / 0.6)
        self.material = _Material(s.material[b], u, self.seed, px)


def shade_facade(
    style: FacadeStyles,
    building: np.ndarray,
    face: np.ndarray,
    u_m: np.ndarray,
    face_width_m: np.ndarray,
    height_m: np.ndarray,
    street_face: np.ndarray,
    px_m: np.ndarray,
    column: np.ndarray,
    v_m: np.ndarray,
    lit_fraction: float,
    salt: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Albedo and emitted light of N facade points lying on M facade columns.

    Args:
        building, face: [M] building index and face (NORTH..WEST) of each column.
        u_m: [M] metres along the face (left to right seen from outside).
        face_width_m, height_m: [M] size of that face.
        street_face: [M] bool, the face looks onto a street (gets the shop / door ground floor).
        px_m: [M] metres covered by one pixel there (fine patterns fade with it).
        column: [N] which of the M columns each point lies on.
        v_m: [N] metres above the ground.
        lit_fraction: share of windows lit (0 by day).
        salt: varies which windows are lit from image to image.
    Returns:
        (albedo [N, 3], emission [N, 3]) float32 in 0..1 (emission is added after lighting).
    """
    s, c = style, column
    k = _Columns(s, building, face, u_m.astype(np.float32), face_width_m, height_m, street_face, px_m.astype(np.float32))
    v = v_m.astype(np.float32)
    gf, fh, top = k.gf[c], k.fh[c], k.top[c]
    ground = v < gf
    fl = np.floor((v - gf) / fh)
    fv = (v - gf) / fh - fl
    upper = ~ground & (fl < k.floors[c])
    sill, wh, frame_v = k.sill[c], k.wh[c], k.frame_v[c]
    in_window = upper & (fv > sill) & (fv < sill + wh)
    in_frame = upper & (fv > sill - 1.6 * frame_v) & (fv < sill + wh + frame_v)

    label = np.zeros(len(v), dtype=np.int8)
    every, band_m = k.every[c], k.band_m[c]
    # every is 0, 1 or 2: with 2 only even floors get a band (integer parity, no float modulo).
    band = (every > 0) & (v < top) & (v >= gf - band_m)
    band &= ground | ((fv * fh < band_m) & ((every == 1) | ((fl.astype(np.int32) & 1) == 0)))
    label[band] = BAND
    label[k.pilaster[c] & ~ground & (v < top)] = PILASTER
    label[k.frame[c] & in_frame] = FRAME
    label[k.window[c] & in_window] = GLASS
    label[k.mullion[c] & in_window] = FRAME
    label[~ground & (v >= top - 0.15)] = SHADOW  # under the cornice
    label[v >= top] = CORNICE
    i = np.flatnonzero(k.quoin[c])  # corner stones: few columns, so work on those points only
    label[i[~ground[i] & (v[i] < top[i] - 0.15) & (((v[i] * 2.0).astype(np.int32) & 1) == 0)]] = QUOIN

    kind = k.kind[c]
    label[ground & (v < 0.45)] = PLINTH
    label[ground & k.window[c] & (v > 1.0) & (v < 1.0 + wh * fh) & (kind != SHOPS)] = GLASS
    label[ground & k.door_frame[c] & (v < 2.52)] = FRAME
    label[ground & k.door[c] & (v > 0.15) & (v < 2.4)] = DOOR
    label[ground & k.step[c] & (v <= 0.15)] = STEP
    label[ground & k.lamp[c] & (v > 2.6) & (v < 2.8)] = LAMP
    garage = ground & k.garage[c] & (v < 2.6)
    label[garage] = np.where(frac(v[garage] / 0.3) < 0.15, RIB, GARAGE)
    shop = ground & k.shop[c]
    sign = shop & (v >= k.sign_bot[c]) & (v < k.sign_top[c])
    label[sign] = SIGN
    label[sign & k.letter[c] & (np.abs(v - (k.sign_bot[c] + k.sign_top[c]) / 2) < k.letter_half[c])] = LETTER
    label[shop & (v >= k.glass_top[c] + 0.1) & (v < k.sign_bot[c])] = AWNING
    front = shop & (v >= 0.45) & (v < k.glass_top[c])
    label[front] = SHOPFRONT
    label[front & k.shop_bar[c]] = SHOP_BAR

    return _colour(label, s, k, c, v, fv, fl, ground, lit_fraction, salt)


def _colour(label, s, k, c, v, fv, fl, ground, lit_fraction, salt) -> tuple[np.ndarray, np.ndarray]:
    """Albedo and emission per label, each computed only for the points carrying it."""
    rgb = np.empty((len(v), 3), dtype=np.float32)
    emit = np.zeros_like(rgb)
    order = np.argsort(label, kind="stable")  # points grouped by label (a radix sort on int8)
    at = dict(enumerate(np.split(order, np.cumsum(np.bincount(label, minlength=SHOP_BAR + 1))[:-1])))
    b = k.b
    i = at[WALL]
    ci = c[i]
    rgb[i] = s.wall_rgb[b[ci]] * k.material.shade(ci, v[i])[:, None]
    for lab, palette, gain in ((BAND, s.band_rgb, 1.0), (CORNICE, s.band_rgb, 0.9), (PILASTER, s.trim_rgb, 0.92),
                               (FRAME, s.trim_rgb, 1.0), (QUOIN, s.trim_rgb, 1.0), (LAMP, s.trim_rgb, 1.0),
                               (SHADOW, s.wall_rgb, 0.55), (PLINTH, s.wall_rgb, 0.68), (DOOR, s.door_rgb, 1.0)):  # fmt: skip
        rgb[at[lab]] = palette[b[c[at[lab]]]] * gain
    rgb[at[STEP]] = STEP_RGB
    rgb[at[GARAGE]] = 0.74
    rgb[at[RIB]] = 0.62
    rgb[at[SHOP_BAR]] = 0.15
    if lit_fraction > 0:
        emit[at[LAMP]] = WARM_LIGHT

    # Window glass: per-window tint, curtains, and at night a light that depends on the salt.
    i = at[GLASS]
    ci = c[i]
    key = mix(k.bay_key[ci] ^ np.where(ground[i], 0, fl[i] + 1).astype(np.uint32))
    r1, r2 = bits01(key, 0), bits01(key, 16)
    rise = np.clip((fv[i] - k.sill[ci]) / k.wh[ci], 0.0, 1.0)  # 0 at the sill, 1 at the lintel
    glass = s.glass_rgb[b[ci]] * (0.75 + 0.5 * r1)[:, None] + (0.12 * rise)[:, None]
    curtain = ((r2 < 0.3) & (rise > 0.45 + r2))[:, None]
    rgb[i] = np.where(curtain, CURTAIN * (0.7 + 0.3 * r1)[:, None], glass)
    if lit_fraction > 0:
        night = mix(key ^ np.uint32(salt & 0xFFFFFFFF))
        tone = np.where((bits01(night, 16) < 0.8)[:, None], WARM_LIGHT, COOL_LIGHT) * (0.45 + 0.45 * r2)[:, None]
        emit[i] = tone * (bits01(night, 0) < lit_fraction)[:, None]

    for lab, source in ((SIGN, k.sign_rgb), (LETTER, k.letter_rgb)):
        rgb[at[lab]] = source[c[at[lab]]]
    i = at[AWNING]
    ci = c[i]
    rgb[i] = k.stripe_rgb[ci] * (0.75 + 0.25 * (v[i] - k.glass_top[ci]))[:, None]
    i = at[SHOPFRONT]
    ci = c[i]
    goods = 0.8 + 0.4 * hash01(k.unit_key[ci], k.goods_u[ci], np.floor(v[i] / 0.6))
    rgb[i] = SHOP_GLASS * goods[:, None]
    if lit_fraction > 0:
        unit_lit = bits01(mix(k.unit_key ^ np.uint32(salt & 0xFFFFFFFF)), 0) < min(1.0, 1.6 * lit_fraction)  # [M]
        emit[i] = WARM_LIGHT * 0.75 * (goods * unit_lit[ci])[:, None]
        for lab in (SIGN, LETTER):
            j = at[lab]
            emit[j] = (k.sign_rgb[c[j]] * 0.7 + 0.1) * unit_lit[c[j]][:, None]
    return np.clip(rgb, 0.0, 1.0), emit
