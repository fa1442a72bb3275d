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
import pyarrow.compute as pc

from placeforge.catalog import CATALOG_SCHEMA, REJECTS_SCHEMA, stable_ids
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
) -> pl.Series:
    """Place keys "utm:<zone><N|S>:<col>:<row>[:h<sector>]" for [N] points, [N] strings.

    The zone and hemisphere are part of the key: cell (col, row) in zone 10N and in
    zone 11N are different places even though their metric coordinates coincide.
    A point whose heading is unknown keeps the unsplit cell key.  Keys are formatted once
    per distinct cell (about one per 10 images) and gathered, not formatted per point.
    """
    col, row = cell_col_row(east_m, north_m, cell_size_m)
    cells = pl.DataFrame({"zone": np.asarray(zone_number, np.int64), "northern": np.asarray(northern, bool),
                          "col": col, "row": row})
    distinct = cells.unique(maintain_order=True).with_row_index("cell")
    cell = cells.join(distinct, on=["zone", "northern", "col", "row"], how="left", maintain_order="left")["cell"]
    cell_keys = utm_cell_keys(*(distinct[c].to_numpy() for c in ("zone", "northern", "col", "row")))
    keys = pl.Series("place_key", cell_keys.tolist(), dtype=pl.String).gather(cell)
    if heading_sectors > 0 and heading_deg is not None:
        sector = pl.Series(heading_sector(heading_deg, heading_sectors))
        keys = pl.select(pl.when(sector >= 0).then(pl.concat_str(keys, pl.lit(":h"), sector.cast(pl.String)))
                         .otherwise(keys).alias("place_key")).to_series()
    return keys


def view_place_keys(cell_keys: pl.Series, zone_number: np.ndarray, northern: np.ndarray, east_m: np.ndarray,
                    north_m: np.ndarray, heading_deg: np.ndarray, heading_sectors: int, image_id: np.ndarray,
                    radius_m: float) -> pl.Series:
    """Place keys "<leader's cell key>:v<leader image id>" of views (`view_leaders`), for [N]
    points whose cell keys (with sector) are `cell_keys`.  A point whose heading is unknown is
    clustered with the others of unknown heading."""
    sector = heading_sector(heading_deg, heading_sectors)  # -1: unknown
    zone = np.asarray(zone_number, dtype=np.int64) * np.where(northern, 1, -1)
    group = zone * (heading_sectors + 1) + (sector + 1)
    leader = view_leaders(group, np.asarray(east_m, np.float64), np.asarray(north_m, np.float64),
                          np.asarray(image_id), radius_m)
    leader_key = pl.Series(cell_keys, dtype=pl.String).gather(leader)
    leader_id = pl.Series(np.asarray(image_id, dtype=np.int64)[leader]).cast(pl.String)
    return (leader_key + ":v" + leader_id).alias("place_key")


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


def source_place_keys(source: pl.Series, dataset: pl.Series, source_place_id: pl.Series) -> pl.Series:
    """Place keys "<source>:<dataset>:<source place id>" (ids are unique only inside a dataset)."""
    return pl.select(pl.concat_str(pl.lit(source), pl.lit(":"), pl.lit(dataset), pl.lit(":"), pl.lit(source_place_id))
                     .alias("place_key")).to_series()


def place_keys(catalog: pa.Table, cfg: PlaceConfig) -> pl.Series:
    """[N] place key of every catalog row (null where a row has neither a source place id nor UTM)."""
    has_source_place = pc.is_valid(catalog.column("source_place_id")).to_numpy(zero_copy_only=False)
    has_utm = pc.and_(pc.is_valid(catalog.column("utm_zone")), pc.is_valid(catalog.column("utm_east")))
    keys = pl.repeat(None, catalog.num_rows, dtype=pl.String, eager=True).alias("place_key")
    if has_source_place.any():
        rows = np.flatnonzero(has_source_place)
        sub = pl.from_arrow(catalog.select(["source", "dataset", "source_place_id"]).take(rows))
        keys = keys.scatter(rows, source_place_keys(sub["source"], sub["dataset"], sub["source_place_id"]))
    geo = ~has_source_place & has_utm.to_numpy(zero_copy_only=False)
    if geo.any():
        rows = np.flatnonzero(geo)
        sub = pl.from_arrow(catalog.select(["utm_zone", "utm_letter", "utm_east", "utm_north", "heading_deg",
                                            "image_id"]).take(rows))
        zone = sub["utm_zone"].to_numpy()
        northern = is_northern_letter(sub["utm_letter"].fill_null("").to_numpy().astype("<U1"))
        east, north = sub["utm_east"].to_numpy(), sub["utm_north"].to_numpy()
        heading = sub["heading_deg"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        cell_keys = geo_place_keys(zone, northern, east, north, cfg.cell_size_m, heading, cfg.heading_sectors)
        if cfg.view_radius_m > 0:
            cell_keys = view_place_keys(cell_keys, zone, northern, east, north, heading, cfg.heading_sectors,
                                        sub["image_id"].to_numpy(), cfg.view_radius_m)
        keys = keys.scatter(rows, cell_keys)
    return keys


@dataclass(frozen=True)
class Placement:
    """Where each of N catalog rows goes, as compact columns: the wide rows are not copied."""

    kept: np.ndarray  # [N] bool: the row's place is big enough
    place_key: pl.Series  # [K] of the kept rows, in row order
    place_id: np.ndarray  # [K] int64, stable_id(place_key)
    rejects: pa.Table  # [N - K] REJECTS_SCHEMA rows, stage "place", in row order


def place_rows(catalog: pa.Table, cfg: PlaceConfig) -> Placement:
    """The places of [N] catalog rows (CATALOG_SCHEMA; place columns may be null); see `assign_places`."""
    keys = pl.DataFrame(place_keys(catalog, cfg))
    keys = keys.with_columns(place_size=pl.len().over("place_key"))  # over null keys too: never read
    unplaceable = keys["place_key"].is_null()
    too_small = ~unplaceable & (keys["place_size"] < cfg.min_images_per_place)
    kept_rows = ~(unplaceable | too_small)

    unique_keys = keys.filter(kept_rows)["place_key"].unique()
    ids = pl.DataFrame({"place_key": unique_keys, "place_id": stable_ids(unique_keys)},
                       schema={"place_key": pl.String, "place_id": pl.Int64})
    kept_keys = keys.filter(kept_rows).join(ids, on="place_key", how="left", maintain_order="left")

    rejected_rows = ~kept_rows
    rejected = pl.from_arrow(catalog.select(["relpath", "source", "dataset", "image_id"]).filter(
        pa.array(rejected_rows.to_numpy())))
    gone = keys.filter(rejected_rows)
    is_unplaceable = gone["place_key"].is_null().to_numpy()
    reasons = np.where(is_unplaceable, "no_coordinates", "place_too_small")
    details = [
        "no source place id and no coordinates"
        if unplaced
        else f"place {k} has {n} image(s), minimum is {cfg.min_images_per_place}"
        for unplaced, k, n in zip(is_unplaceable, gone["place_key"].to_list(), gone["place_size"].to_list())
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
    return Placement(kept_rows.to_numpy(), kept_keys["place_key"], kept_keys["place_id"].to_numpy(), rejects)


def assign_places(catalog: pa.Table, cfg: PlaceConfig) -> tuple[pa.Table, pa.Table]:
    """Fill `place_key` / `place_id`; set aside images of places that are too small.

    Args:
        catalog: rows of CATALOG_SCHEMA (place columns may be null).
    Returns:
        (kept catalog rows with place_key/place_id set, rejects rows with stage "place").
    """
    placement = place_rows(catalog, cfg)
    return with_places(catalog.filter(pa.array(placement.kept)), placement), placement.rejects


def with_places(kept: pa.Table, placement: Placement, order: np.ndarray | None = None) -> pa.Table:
    """The kept catalog rows (optionally taken in `order`, [K] positions among them) with their places set."""
    key = placement.place_key.to_arrow().cast(pa.string())
    place_id = pa.array(placement.place_id, pa.int64())
    if order is not None:
        key, place_id = key.take(pa.array(order)), place_id.take(pa.array(order))
    kept = kept.set_column(kept.schema.get_field_index("place_key"), "place_key", key)
    kept = kept.set_column(kept.schema.get_field_index("place_id"), "place_id", place_id)
    return kept.cast(CATALOG_SCHEMA)
