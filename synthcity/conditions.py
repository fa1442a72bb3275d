"""Appearance conditions: time of day, weather, season, occluders and the camera's defects.

A condition is chosen per image when poses are planned (its name goes into the
file name and its month into the timestamp); its continuous parameters (sun
azimuth, fog distance, blur, noise, how many cars) are drawn inside the render
task from the image's own seed, so any worker renders the same pixels.

Database images are mostly clear daylight; queries come from harder conditions.
No condition changes the scene itself: the same facades stay where they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIMES = ("day", "dusk", "night")
WEATHERS = ("clear", "overcast", "rain", "fog")

# (time, weather) -> probability, per kind of capture.
PROFILES: dict[str, dict[tuple[str, str], float]] = {
    "database": {("day", "clear"): 0.8, ("day", "overcast"): 0.2},
    "query": {(t, w): pt * pw for t, pt in zip(TIMES, (0.35, 0.25, 0.4)) for w, pw in zip(WEATHERS, (0.25, 0.25, 0.25, 0.25))},
    "gsv": {(t, w): pt * pw for t, pt in zip(TIMES, (0.8, 0.12, 0.08)) for w, pw in zip(WEATHERS, (0.45, 0.3, 0.15, 0.1))},
}
# Months (northern hemisphere) each weather is drawn from; the south is shifted by six.
WEATHER_MONTHS = {"clear": (4, 5, 6, 7, 8, 9), "overcast": (10, 11, 12, 1, 2, 3), "rain": (11, 12, 1, 2, 3), "fog": (10, 11, 12, 1, 2)}


@dataclass(frozen=True)
class Appearance:
    """Everything about one image's look that is not the scene geometry (colours are RGB 0..1)."""

    time: str
    weather: str
    season: str  # spring | summer | autumn | winter (tree foliage)
    sun_az_deg: float
    sun_rgb: np.ndarray  # [3] direct light on a face turned to the sun
    ambient_rgb: np.ndarray  # [3] light every surface gets
    sky_horizon_rgb: np.ndarray  # [3]
    sky_zenith_rgb: np.ndarray  # [3]
    cloudiness: float  # 0..1
    fog_rgb: np.ndarray  # [3]
    visibility_m: float  # distance at which 63 % of the colour is fog
    lit_fraction: float  # share of windows lit
    lamps_on: bool
    wet: bool
    rain_density: float  # streaks per pixel
    exposure: float
    white_balance: np.ndarray  # [3] per-channel gain
    blur_px: float
    noise_sigma: float  # in 0..255 units
    vehicles: int
    pedestrians: int


def pick_condition(profile: str, rng: np.random.Generator) -> tuple[str, str]:
    """A (time, weather) pair drawn from the named profile."""
    table = PROFILES[profile]
    keys = list(table)
    p = np.array([table[k] for k in keys])
    return keys[rng.choice(len(keys), p=p / p.sum())]


def pick_month(weather: str, southern: bool, rng: np.random.Generator) -> int:
    month = int(rng.choice(WEATHER_MONTHS[weather]))
    return (month + 5) % 12 + 1 if southern else month


def season_of(month: int, southern: bool) -> str:
    northern_month = (month + 5) % 12 + 1 if southern else month
    return ("winter", "spring", "summer", "autumn")[(northern_month % 12) // 3]


def rgb(*channels: float) -> np.ndarray:
    return np.array(channels, dtype=np.float32)


def sample_appearance(time: str, weather: str, month: int, southern: bool, hard: bool, rng: np.random.Generator) -> Appearance:
    """Continuous parameters of a (time, weather) condition; `hard` adds camera defects and clutter."""
    sun_az = float(rng.uniform(0, 360))
    if time == "day":
        sun, ambient = rgb(0.55, 0.52, 0.46), rgb(0.62, 0.64, 0.68)
        horizon, zenith, fog = rgb(0.78, 0.85, 0.92), rgb(0.32, 0.52, 0.82), rgb(0.78, 0.80, 0.83)
        lit = 0.0
    elif time == "dusk":
        sun, ambient = rgb(0.55, 0.32, 0.16), rgb(0.36, 0.32, 0.38)
        horizon, zenith, fog = rgb(0.95, 0.58, 0.32), rgb(0.22, 0.22, 0.45), rgb(0.55, 0.45, 0.45)
        lit = float(rng.uniform(0.15, 0.35))
    else:
        sun, ambient = rgb(0, 0, 0), rgb(0.13, 0.13, 0.17)
        horizon, zenith, fog = rgb(0.10, 0.09, 0.12), rgb(0.01, 0.015, 0.05), rgb(0.08, 0.08, 0.09)
        lit = float(rng.uniform(0.3, 0.6))
    visibility = float(rng.uniform(350, 800))  # ordinary haze
    cloudiness = float(rng.uniform(0.0, 0.5))
    if weather in ("overcast", "rain", "fog"):
        # Clouds take the direct sun and most of the colour.
        ambient = ambient + sun * 0.45
        sun = sun * 0.0
        grey = float(horizon.mean())
        horizon = horizon * 0.3 + grey * 0.7
        zenith = zenith * 0.3 + grey * 0.6
        fog = fog * 0.5 + grey * 0.5
        cloudiness = float(rng.uniform(0.6, 1.0))
    if weather == "rain":
        ambient = ambient * 0.8
        visibility = float(rng.uniform(120, 250))
    if weather == "fog":
        visibility = float(rng.uniform(25, 70))
    jitter = 0.12 if hard else 0.04
    return Appearance(
        time=time,
        weather=weather,
        season=season_of(month, southern),
        sun_az_deg=sun_az,
        sun_rgb=sun,
        ambient_rgb=ambient,
        sky_horizon_rgb=horizon,
        sky_zenith_rgb=zenith,
        cloudiness=cloudiness,
        fog_rgb=fog,
        visibility_m=visibility,
        lit_fraction=lit,
        lamps_on=time != "day",
        wet=weather == "rain",
        rain_density=float(rng.uniform(0.004, 0.012)) if weather == "rain" else 0.0,
        exposure=float(rng.uniform(1 - 2 * jitter, 1 + 2 * jitter)),
        white_balance=rng.uniform(1 - jitter / 2, 1 + jitter / 2, 3).astype(np.float32),
        blur_px=float(rng.uniform(0.4, 1.2) if hard else 0.0),  # database cameras are sharp
        noise_sigma=float(rng.uniform(2.0, 7.0) if hard else rng.uniform(0.0, 2.0)),
        vehicles=int(rng.integers(1, 5) if hard else rng.integers(0, 3)),
        pedestrians=int(rng.integers(1, 5) if hard else rng.integers(0, 2)),
    )


def apply_fog(rgb: np.ndarray, distance_m: np.ndarray, app: Appearance) -> np.ndarray:
    """Blend [H, W, 3] toward the fog colour with distance [H, W] (inf = all fog)."""
    with np.errstate(invalid="ignore", over="ignore"):
        fogged = -np.expm1(distance_m * np.float32(-1.0 / app.visibility_m))  # share of fog, 0..1
    out = app.fog_rgb - rgb
    out *= fogged[..., None]
    out += rgb
    return out


def rain_streaks(shape: tuple[int, int], density: float, rng: np.random.Generator) -> np.ndarray:
    """[H, W] float32 brightness of slanted rain streaks, 0 where none."""
    h, w = shape
    drops = int(density * h * w)
    length = max(3, h // 16)
    slant = rng.uniform(-0.35, 0.35)
    r0, c0 = rng.integers(-length, h, drops), rng.integers(0, w, drops)
    step = np.arange(length)
    rows = (r0[:, None] + step[None, :]).reshape(-1)
    cols = (c0[:, None] + np.round(step * slant).astype(np.int64)[None, :]).reshape(-1) % w
    level = np.repeat(rng.uniform(0.1, 0.35, drops).astype(np.float32), length)
    ok = (rows >= 0) & (rows < h)
    streaks = np.zeros(h * w, dtype=np.float32)
    np.maximum.at(streaks, rows[ok] * w + cols[ok], level[ok])
    return streaks.reshape(h, w)


def blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian-like blur of [H, W, C] by separable 3-tap passes [a, 1 - 2a, a].

    One pass has variance 2a, so sigma^2 is split over one or two passes per axis
    (a <= 1/3 keeps the kernel positive); far cheaper than a general Gaussian.
    """
    var = sigma_px * sigma_px
    passes = 1 if var <= 0.6 else 2
    a = np.float32(var / (2 * passes))
    out = img
    for _ in range(passes):
        # Rows, then columns; edge pixels repeat themselves.
        pad = np.concatenate([out[:1], out, out[-1:]], axis=0)
        out = out * (1 - 2 * a) + (pad[:-2] + pad[2:]) * a
        pad = np.concatenate([out[:, :1], out, out[:, -1:]], axis=1)
        out = out * (1 - 2 * a) + (pad[:, :-2] + pad[:, 2:]) * a
    return out


def finish(rgb: np.ndarray, distance_m: np.ndarray, app: Appearance, rng: np.random.Generator) -> np.ndarray:
    """Linear scene [H, W, 3] -> uint8 photo: fog, rain, exposure, white balance, blur, noise."""
    out = apply_fog(rgb, distance_m, app)
    if app.rain_density > 0:
        streak = rain_streaks(out.shape[:2], app.rain_density, rng)[..., None]
        out = out * (1 - streak) + np.float32(0.75) * streak
    out *= (app.exposure * app.white_balance * 255.0).astype(np.float32)  # to grey levels
    if app.blur_px > 0.0:
        out = blur(out, app.blur_px)
    if app.noise_sigma > 0:
        out += sensor_noise(out.shape, app.noise_sigma, rng)
    out += 0.5  # round to nearest on the cast below
    return np.clip(out, 0.0, 255.0, out=out).astype(np.uint8)


_NOISE_BANKS: dict[int, np.ndarray] = {}  # image size -> bank, filled on first use in each process


def sensor_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of standard deviation `sigma`, float32 of `shape`.

    The noise is a window of a fixed, seeded bank of normals at an offset drawn
    from `rng`: the same values for the same seed in any process, for the cost
    of a slice instead of a fresh Gaussian draw per pixel.  The bank depends only
    on the size, so what a process rendered before cannot change it.
    """
    n = int(np.prod(shape))
    if n not in _NOISE_BANKS:
        _NOISE_BANKS[n] = np.random.default_rng([0x5EED, n]).standard_normal(4 * n, dtype=np.float32)
    bank = _NOISE_BANKS[n]
    start = int(rng.integers(0, bank.size - n))
    return np.float32(sigma) * bank[start : start + n].reshape(shape)
