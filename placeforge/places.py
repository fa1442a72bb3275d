"""Place assignment: which images are "the same place", as pure functions.

A place is, in order of preference:
  * the dataset's own place id (GSV-Cities place, Google Landmarks landmark), namespaced
    by source and dataset so ids never collide across cities or datasets;
  * otherwise a square UTM cell of `cell_size_m` (15 m by default, Pair-VPR's choice),
    optionally split into `heading_sectors` equal compass sectors centred on north (with 4:
    north, east, south and west, each +-45 degrees);
  * or, with `view_radius_m` > 0, a view: images of one heading sector within that radius
    of a leader image (leader clustering, below), so a place holds what one camera position
    looking one way sees, wherever the cell edges fall.

Places with fewer than `min_images_per_place` images are set aside with the reason
`place_too_small`, since a place must yield pairs (stage 1) and K-image groups (stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from placeforge.catalog import CATALOG_SCHEMA, REJECTS_SCHEMA, stable_id
from placeforge.geo import cell_col_row, is_northern_letter, utm_cell_keys


@dataclass(frozen=True)
class PlaceConfig:
    cell_size_m: float = field(default=15.0, metadata={"help": "side of a geo place cell in metres"})
    heading_sectors: int = field(
        default=0, metadata={"help": "split geo cells into this many compass sectors (0 = no split)"}
    )
    min_images_per_place: int = field(
        default=4, metadata={"help": "places with fewer images are rejected as place_too_small"}
    )
    view_radius_m: float = field(
        default=0.0, metadata={"help": "> 0: a geo place is a view, the images of one heading sector within this "
                                       "many metres of a leader image, instead of a cell (0 = cells)"}
    )

    def validate(self) -> None:
        if not self.cell_size_m > 0:
            raise ValueError(f"cell_size_m must be > 0, got {self.cell_size_m}")
        if self.heading_sectors < 0:
            raise ValueError(f"heading_sectors must be >= 0, got {self.heading_sectors}")
        if self.min_images_per_place < 1:
            raise ValueError(f"min_images_per_place must be >= 1, got {self.min_images_per_place}")
        if self.view_radius_m < 0:
            raise ValueError(f"view_radius_m must be >= 0, got {self.view_radius_m}")
        if self.view_radius_m > 0 and self.heading_sectors < 1:
            raise ValueError("view_radius_m needs heading_sectors >= 1: a view is one position looking one way")


def heading_sector(heading_deg: np.ndarray, sectors: int) -> np.ndarray:
    """Sector 0..sectors-1 of each compass heading, sector 0 centred on north; -1 if unknown.

    Centred, not starting at north: street-level images mostly look along or across the
    street, and in a street grid those are near the cardinal directions.  Sectors starting
    at north put their edges there, so one view (headings 358 and 2) fell into two places
    and one place held two views (north and east: in the demo city 465 of 489 places).
    """
    heading = np.asarray(heading_deg, dtype=np.float64)
    out = np.full(heading.shape, -1, dtype=np.int64)
    known = np.isfinite(heading)
    width = 360.0 / sectors
    out[known] = (np.floor(np.mod(heading[known] + width / 2, 360.0) / width).astype(np.int64)) % sectors
    return out


def geo_place_keys(
    zone_number: np.ndarray,
    northern: np.ndarray,
    east_m: np.ndarray,
    north_m: np.ndarray,
    cell_size_m: float,
    heading_deg: np.ndarray | None = None,
    heading_sectors: int = 0,
) -> list[str]:
    """Place keys "utm:<zone><N|S>:<col>:<row>[:h<sector>]" for [N] points.

    The zone and hemisphere are part of the key: cell (col, row) in zone 10N and in
    zone 11N are different places even though their metric coordinates coincide.
    A point whose heading is unknown keeps the unsplit cell key.
    """
    col, row = cell_col_row(east_m, north_m, cell_size_m)
    keys = utm_cell_keys(zone_number, northern, col, row).tolist()
    if heading_sectors > 0 and heading_deg is not None:
        sector = heading_sector(heading_deg, heading_sectors)
        keys = [k if s < 0 else f"{k}:h{s}" for k, s in zip(keys, sector)]
    return keys


def view_place_keys(cell_keys: list[str], zone_number: np.ndarray, northern: np.ndarray, east_m: np.ndarray,
                    north_m: np.ndarray, heading_deg: np.ndarray, heading_sectors: int, image_id: np.ndarray,
                    radius_m: float) -> list[str]:
    """Place keys "<leader's cell key>:v<leader image id>" of views (`view_leaders`), for [N]
    points whose cell keys (with sector) are `cell_keys`.  A point whose heading is unknown is
    clustered with the others of unknown heading."""
    sector = heading_sector(heading_deg, heading_sectors)  # -1: unknown
    zone = np.asarray(zone_number, dtype=np.int64) * np.where(northern, 1, -1)
    group = zone * (heading_sectors + 1) + (sector + 1)
    leader = view_leaders(group, np.asarray(east_m, np.float64), np.asarray(north_m, np.float64),
                          np.asarray(image_id), radius_m)
    ids = np.asarray(image_id)
    return [f"{cell_keys[j]}:v{ids[j]}" for j in leader]


def view_leaders(group: np.ndarray, east_m: np.ndarray, north_m: np.ndarray, order: np.ndarray,
                 radius_m: float) -> np.ndarray:
    """Leader clustering: for [N] points, the index of each one's leader.

    Within each `group` (zone, hemisphere and heading sector in one integer), points are
    visited by ascending `order` (a stable image id, so the result does not depend on listing
    order); an unassigned point becomes a leader and takes every unassigned point of its group
    within `radius_m` of it.  A cluster is thus at most 2 x radius across and never cut by a
    grid line; with views captured a few metres apart, one view is one cluster.  Cost: one
    KD-tree query per leader.
    """
    from scipy.spatial import KDTree

    leader = np.full(len(group), -1, dtype=np.int64)
    by_group = np.lexsort((order, group))  # group, then order within it
    starts = np.flatnonzero(np.r_[True, group[by_group][1:] != group[by_group][:-1], True])
    for lo, hi in zip(starts[:-1], starts[1:]):
        members = by_group[lo:hi]  # ascending order
        points = np.column_stack([east_m[members], north_m[members]])
        tree = KDTree(points)
        taken = np.zeros(len(members), dtype=bool)
        for i in range(len(members)):
            if taken[i]:
                continue
            near = np.asarray(tree.query_ball_point(points[i], radius_m), dtype=np.int64)
            near = near[~taken[near]]
            taken[near] = True
            leader[members[near]] = members[i]
    return leader


def source_place_keys(source: list[str], dataset: list[str], source_place_id: list[str]) -> list[str]:
    """Place keys "<source>:<dataset>:<source place id>" (ids are unique only inside a dataset)."""
    return [f"{s}:{d}:{p}" for s, d, p in zip(source, dataset, source_place_id)]


def assign_places(catalog: pa.Table, cfg: PlaceConfig) -> tuple[pa.Table, pa.Table]:
    """Fill `place_key` / `place_id`; set aside images of places that are too small.

    Args:
        catalog: rows of CATALOG_SCHEMA (place columns may be null).
    Returns:
        (kept catalog rows with place_key/place_id set, rejects rows with stage "place").
    """
    df = pl.from_arrow(catalog)
    assert isinstance(df, pl.DataFrame)
    has_source_place = df["source_place_id"].is_not_null().to_numpy()
    has_utm = (df["utm_zone"].is_not_null() & df["utm_east"].is_not_null()).to_numpy()
    keys = np.empty(df.height, dtype=object)
    if has_source_place.any():
        sub = df.filter(pl.Series(has_source_place))
        keys[has_source_place] = source_place_keys(
            sub["source"].to_list(), sub["dataset"].to_list(), sub["source_place_id"].to_list()
        )
    geo = ~has_source_place & has_utm
    if geo.any():
        sub = df.filter(pl.Series(geo))
        zone = sub["utm_zone"].to_numpy()
        northern = is_northern_letter(sub["utm_letter"].fill_null("").to_numpy().astype("<U1"))
        east, north = sub["utm_east"].to_numpy(), sub["utm_north"].to_numpy()
        heading = sub["heading_deg"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        cell_keys = geo_place_keys(zone, northern, east, north, cfg.cell_size_m, heading, cfg.heading_sectors)
        if cfg.view_radius_m > 0:
            cell_keys = view_place_keys(cell_keys, zone, northern, east, north, heading, cfg.heading_sectors,
                                        sub["image_id"].to_numpy(), cfg.view_radius_m)
        keys[geo] = cell_keys
    unplaceable = ~has_source_place & ~has_utm
    df = df.with_columns(pl.Series("place_key", keys.tolist(), dtype=pl.String))
    counts = df.group_by("place_key").len("place_size")
    df = df.join(counts, on="place_key", how="left", nulls_equal=True)
    too_small = (df["place_size"] < cfg.min_images_per_place).to_numpy() & ~unplaceable

    unique_keys = df.filter(~pl.Series(too_small | unplaceable))["place_key"].unique().to_list()
    ids = pl.DataFrame(
        {"place_key": unique_keys, "place_id": [stable_id(k) for k in unique_keys]},
        schema={"place_key": pl.String, "place_id": pl.Int64},
    )
    kept = df.filter(~pl.Series(too_small | unplaceable)).drop("place_id", "place_size")
    kept = kept.join(ids, on="place_key", how="left").select(CATALOG_SCHEMA.names)

    rejected = df.filter(pl.Series(too_small | unplaceable))
    reasons = np.where(unplaceable, "no_coordinates", "place_too_small")[too_small | unplaceable]
    details = [
        "no source place id and no coordinates"
        if r == "no_coordinates"
        else f"place {k} has {n} image(s), minimum is {cfg.min_images_per_place}"
        for r, k, n in zip(reasons, rejected["place_key"].to_list(), rejected["place_size"].to_list())
    ]
    rejects = pa.table(
        {
            "input": rejected["relpath"].to_arrow(),
            "source": rejected["source"].to_arrow(),
            "dataset": rejected["dataset"].to_arrow(),
            "stage": pa.array(["place"] * rejected.height, pa.string()),
            "reason": pa.array(reasons.tolist(), pa.string()),
            "detail": pa.array(details, pa.string()),
            "image_id": rejected["image_id"].to_arrow(),
        }
    ).cast(REJECTS_SCHEMA)
    return kept.to_arrow().cast(CATALOG_SCHEMA), rejects
