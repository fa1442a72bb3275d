"""Where the cameras stand and under which conditions: cities, places, headings, splits.

Pure functions of the config; nothing is rendered here.  Every image becomes a
`Shot` holding its pose, its condition and its own render seed, so a render
task needs nothing else and any worker renders the same pixels.

The `@` city has a margin of blocks all round, a training district of block
rows in the south, one buffer row, and a test district in the north: train and
test places are different streets, so evaluation measures generalisation.
Places are points along street centre lines (offset a little into a lane),
taken nearest-first from the district's centre so they form one connected
patch where neighbouring places overlap in view.

The validation split (`val/database`, `val/queries`: tune recipes on it, report
on test) is made like the test split in a third city of its own (city_index 2),
written in the same `@` format 5 km east (synth_config.VAL_OFFSET_EAST_M).  Its
own city, district and split codes leave every seed stream of the train, test
and GSV images, and so their bytes, as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from synthcity.city import City, StreetGrid, make_city
from synthcity.conditions import pick_condition, pick_month
from synthcity.synth_config import SynthConfig

AT, GSV, VAL = "atname", "gsv", "atname_val"  # layouts: one city each
# New splits go at the end: a split's position is its seed code, and the codes of
# the existing splits must not move (their images would change).
SPLITS = ("train", "test/database", "test/queries", "gsv", "val/database", "val/queries")
_SPLIT_CODE = {name: i + 1 for i, name in enumerate(SPLITS)}
_DISTRICT_CODE = {"train": 1, "test": 2, "gsv": 3, "val": 4}
MIN_PITCH_M = 42.0  # smallest block plus narrowest street: sizes districts conservatively


@dataclass(frozen=True)
class CityPlan:
    layout: str  # AT, GSV or VAL
    city_index: int  # seed stream of the city
    blocks_x: int  # including the margin block on each side
    blocks_y: int
    districts: dict[str, tuple[int, int]]  # name -> (first, last) east-west street line with places


@dataclass(frozen=True)
class Places:
    xy_m: np.ndarray  # [P, 2] camera position in local metres
    street_deg: np.ndarray  # [P] compass direction of the street: 0 north-south, 90 east-west


@dataclass(frozen=True)
class Shot:
    """One image to render: pose, condition and seed."""

    layout: str  # AT, GSV or VAL: the city it is rendered in
    split: str  # one of SPLITS
    index: int  # position within the split
    place: int  # place index in its district (queries: the test or val place they were taken at)
    x_m: float
    y_m: float
    heading_deg: float  # compass, 0..360
    pitch_deg: float
    roll_deg: float
    time: str
    weather: str
    year: int
    month: int
    hard: bool  # camera defects and clutter of a query
    seed: int


def rows_for(places: int, spacing_m: float, blocks_x: int) -> int:
    """Block rows a district needs so that its streets hold `places` points (with slack)."""
    per_row = (2 * blocks_x + 1) * MIN_PITCH_M / spacing_m  # one east-west street and the cross streets
    return max(1, math.ceil(places / (0.8 * per_row)))


def city_plans(cfg: SynthConfig) -> dict[str, CityPlan]:
    """The cities: AT with train and test districts, GSV with one district, VAL (if val_places) with one."""
    bx = cfg.blocks_x
    train = rows_for(cfg.train_places, cfg.place_spacing_m, bx)
    test = rows_for(cfg.test_places, cfg.place_spacing_m, bx)
    gsv = rows_for(cfg.gsv_places, 2 * cfg.place_spacing_m, bx)
    plans = {
        AT: CityPlan(AT, 0, bx + 2, train + test + 3, {"train": (1, 1 + train), "test": (2 + train, 2 + train + test)}),
        GSV: CityPlan(GSV, 1, bx + 2, gsv + 2, {"gsv": (1, 1 + gsv)}),
    }
    if cfg.val_places > 0:
        val = rows_for(cfg.val_places, cfg.place_spacing_m, bx)
        plans[VAL] = CityPlan(VAL, 2, bx + 2, val + 2, {"val": (1, 1 + val)})
    return plans


def build_city(cfg: SynthConfig, plan: CityPlan) -> City:
    return make_city(cfg.seed, plan.city_index, plan.blocks_x, plan.blocks_y)


def candidate_places(grid: StreetGrid, first_row: int, last_row: int, spacing_m: float) -> Places:
    """Points every `spacing_m` along the district's streets (margin streets excluded)."""
    xy, street = [], []
    x_lo, x_hi = grid.xs_m[1], grid.xs_m[-2]
    for j in range(first_row, last_row + 1):  # east-west streets, crossings included
        for x in np.arange(x_lo, x_hi + 1e-6, spacing_m):
            xy.append((x, grid.ys_m[j]))
            street.append(90.0)
    rows = np.arange(first_row, last_row + 1)
    for x in grid.xs_m[1:-1]:  # north-south streets, between the crossings
        for y in np.arange(grid.ys_m[first_row], grid.ys_m[last_row] + 1e-6, spacing_m):
            if np.any(np.abs(y - grid.ys_m[rows]) < grid.y_width_m[rows] / 2):
                continue
            xy.append((x, y))
            street.append(0.0)
    return Places(np.array(xy, dtype=np.float64).reshape(-1, 2), np.array(street))


def choose_places(candidates: Places, n: int, rng: np.random.Generator) -> Places:
    """The n candidates nearest the district centre, each moved up to 1 m across its street."""
    if len(candidates.xy_m) < n:
        raise ValueError(f"district has room for {len(candidates.xy_m)} places, {n} asked (raise blocks_x)")
    centre = (candidates.xy_m.min(axis=0) + candidates.xy_m.max(axis=0)) / 2
    dist = np.round(np.hypot(*(candidates.xy_m - centre).T), 6)
    pick = np.lexsort((np.arange(len(dist)), dist))[:n]  # ties broken by candidate order
    xy = candidates.xy_m[pick].copy()
    street = candidates.street_deg[pick]
    lateral = rng.uniform(-1.0, 1.0, n)
    xy[:, 0] += np.where(street == 0.0, lateral, 0.0)  # across a north-south street is along x
    xy[:, 1] += np.where(street == 0.0, 0.0, lateral)
    return Places(xy, street)


def district_places(cfg: SynthConfig, city: City, plan: CityPlan, district: str, n: int, spacing_m: float) -> Places:
    rng = np.random.default_rng([cfg.seed, plan.city_index, _DISTRICT_CODE[district], 0x91A])
    first, last = plan.districts[district]
    return choose_places(candidate_places(city.grid, first, last, spacing_m), n, rng)


def render_seed(seed: int, split: str, index: int) -> int:
    """Per-image seed from (master seed, split, index): independent of worker and order."""
    return int(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]).generate_state(1)[0])


def _headings(street_deg: float, n: int) -> list[float]:
    """n headings evenly spaced from along the street (n = 4: both ways and both facades)."""
    return [(street_deg + k * 360.0 / n) % 360.0 for k in range(n)]


def _shot(cfg, layout, split, index, place, x, y, heading, profile, year, southern, hard, rng) -> Shot:
    time, weather = pick_condition(profile, rng)
    tilt = 3.0 if hard else 1.0
    return Shot(
        layout=layout, split=split, index=index, place=place, x_m=float(x), y_m=float(y),
        heading_deg=float(heading % 360.0), pitch_deg=float(rng.uniform(-tilt, tilt)),
        roll_deg=float(rng.uniform(-tilt, tilt) * 0.6), time=time, weather=weather, year=year,
        month=pick_month(weather, southern, rng), hard=hard, seed=render_seed(cfg.seed, split, index),
    )  # fmt: skip


def plan_atname(cfg: SynthConfig, city: City, plan: CityPlan) -> tuple[list[Shot], Places, Places]:
    """Train, database and query shots of the `@` city, and the train and test places."""
    southern = cfg.at_origin_lat < 0
    train = district_places(cfg, city, plan, "train", cfg.train_places, cfg.place_spacing_m)
    test = district_places(cfg, city, plan, "test", cfg.test_places, cfg.place_spacing_m)
    jm, jd = cfg.query_jitter_m, cfg.query_jitter_deg
    shots: list[Shot] = []

    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE["train"]])
    for p, ((x, y), street) in enumerate(zip(train.xy_m, train.street_deg)):
        for heading in _headings(street, cfg.headings_per_place):
            for capture in range(cfg.train_captures):
                # The first capture looks like the database, the others like queries:
                # training sees the same facades under both.
                hard = capture > 0
                dx, dy, dh = rng.uniform(-jm, jm), rng.uniform(-jm, jm), rng.uniform(-jd, jd)
                if not hard:
                    dx = dy = dh = 0.0
                year = int(rng.integers(2015, 2023))
                profile = "query" if hard else "database"
                shots.append(_shot(cfg, AT, "train", len(shots), p, x + dx, y + dy, heading + dh, profile, year, southern, hard, rng))

    return shots + evaluation_shots(cfg, AT, "test", test, cfg.queries, southern), train, test


def evaluation_shots(
    cfg: SynthConfig, layout: str, split: str, places: Places, n_queries: int, southern: bool
) -> list[Shot]:
    """The `{split}/database` then `{split}/queries` shots of an evaluation split ("test" or "val").

    Database: every place at every heading, daylight, exact pose.  Queries: each at a
    random place and one of its headings, pose jittered by up to query_jitter_m per axis
    and query_jitter_deg, under query conditions.  Each part draws from its own stream.
    """
    jm, jd = cfg.query_jitter_m, cfg.query_jitter_deg
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[f"{split}/database"]])
    database: list[Shot] = []
    for p, ((x, y), street) in enumerate(zip(places.xy_m, places.street_deg)):
        for heading in _headings(street, cfg.headings_per_place):
            database.append(_shot(cfg, layout, f"{split}/database", len(database), p, x, y, heading, "database", 2019,
                                  southern, False, rng))

    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[f"{split}/queries"]])
    queries: list[Shot] = []
    for q in range(n_queries):
        p = int(rng.integers(len(places.xy_m)))
        heading = _headings(places.street_deg[p], cfg.headings_per_place)[int(rng.integers(cfg.headings_per_place))]
        x, y = places.xy_m[p] + rng.uniform(-jm, jm, 2)
        heading += rng.uniform(-jd, jd)
        queries.append(_shot(cfg, layout, f"{split}/queries", q, p, x, y, heading, "query", 2022, southern, True, rng))
    return database + queries


def plan_gsv(cfg: SynthConfig, city: City, plan: CityPlan) -> tuple[list[Shot], Places]:
    """GSV-Cities style shots: each place seen by several images years apart, roughly the same way."""
    southern = cfg.gsv_origin_lat < 0
    places = district_places(cfg, city, plan, "gsv", cfg.gsv_places, 2 * cfg.place_spacing_m)
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE["gsv"]])
    jm = cfg.query_jitter_m
    shots: list[Shot] = []
    for p, ((x, y), street) in enumerate(zip(places.xy_m, places.street_deg)):
        facing = street + 90.0 * int(rng.integers(4)) + rng.uniform(-10.0, 10.0)
        years = np.sort(rng.choice(np.arange(2007, 2023), cfg.gsv_images_per_place, replace=False))
        for year in years:
            hard = len(shots) % cfg.gsv_images_per_place > 0 and rng.random() < 0.5
            dx, dy = rng.uniform(-jm, jm, 2)
            heading = facing + rng.uniform(-15.0, 15.0)
            shots.append(_shot(cfg, GSV, "gsv", len(shots), p, x + dx, y + dy, heading, "gsv", int(year), southern, hard, rng))
    return shots, places


def plan_val(cfg: SynthConfig, city: City, plan: CityPlan) -> tuple[list[Shot], Places]:
    """Database and query shots of the val city, made exactly like the test split's, and its places."""
    places = district_places(cfg, city, plan, "val", cfg.val_places, cfg.place_spacing_m)
    return evaluation_shots(cfg, VAL, "val", places, cfg.val_queries, cfg.at_origin_lat < 0), places
