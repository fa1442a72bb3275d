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
from placeforge.geo import cell_col_row, distinct_rows, is_northern_letter, utm_cell_keys


@dataclass(frozen=True)
class PlaceConfig:
    """How images become places: the shard build's `places` section (`--places.cell-size-m 10`)."""

    cell_size_m: float = field(default=15.0, metadata={"help": "side of a geo place cell in metres"})
    heading_sectors: int = field(
        default=0, metadata={"help": "split geo cells into this many compass sectors (0 = no split)"}
    )
    min_images_per_place: int = field(
        default=4, metadata={"help": "places with fewer images are rejected as place_too_small"}
    )
    view_radius_m: float = field(
        default=0.0, metadata={"help": "> 0: a geo place is a view, the images of one heading sector within this "
                                       "many metres of a leader image, instead of a cell (0 = cells; needs "
                                       "heading_sectors)"}
    )

    def validate(self) -> None:
        if not self.cell_size_m > 0:
            raise ValueError(f"places.cell_size_m must be > 0, got {self.cell_size_m}")
        if self.heading_sectors < 0:
            raise ValueError(f"places.heading_sectors must be >= 0, got {self.heading_sectors}")
        if self.min_images_per_place < 1:
            raise ValueError(f"places.min_images_per_place must be >= 1, got {self.min_images_per_place}")
        if self.view_radius_m < 0:
            raise ValueError(f"places.view_radius_m must be >= 0, got {self.view_radius_m}")
        if self.view_radius_m > 0 and self.heading_sectors < 1:
            raise ValueError("places.view_radius_m needs places.heading_sectors >= 1: a view is one position "
                             "looking one way")


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
    A point whose heading is unknown keeps the unsplit cell key.
    """
    cell, keys = geo_cells(zone_number, northern, east_m, north_m, cell_size_m, heading_deg, heading_sectors)
    return keys.gather(cell).alias("place_key")


def geo_cells(
    zone_number: np.ndarray,
    northern: np.ndarray,
    east_m: np.ndarray,
    north_m: np.ndarray,
    cell_size_m: float,
    heading_deg: np.ndarray | None = None,
    heading_sectors: int = 0,
) -> tuple[np.ndarray, pl.Series]:
    """`geo_place_keys` as integers: (cell [N] int64, the number of each point's place, and keys [C]
    the place key of each number).  Places are told apart by their integers (zone, hemisphere,
    column, row, sector), so a key is formatted once per place, never per point, and is never
    hashed or compared as text."""
    col, row = cell_col_row(east_m, north_m, cell_size_m)
    zone = np.asarray(zone_number, np.int64)
    north = np.asarray(northern, bool)
    split = heading_sectors > 0 and heading_deg is not None
    sector = heading_sector(heading_deg, heading_sectors) if split else np.full(len(col), -1, np.int64)
    first, cell = distinct_rows([zone, north.astype(np.int64), col, row, sector])
    cell_keys = utm_cell_keys(zone[first], north[first], col[first], row[first])
    keys = [k if s < 0 else f"{k}:h{s}" for k, s in zip(cell_keys.tolist(), sector[first].tolist())]
    return cell, pl.Series("place_key", keys, dtype=pl.String)


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
    group, keys = place_groups(catalog, cfg)
    if not len(keys):
        return pl.repeat(None, catalog.num_rows, dtype=pl.String, eager=True).alias("place_key")
    gathered = keys.gather(np.maximum(group, 0))
    return pl.select(pl.when(pl.Series(group >= 0)).then(gathered).alias("place_key")).to_series()


def place_groups(catalog: pa.Table, cfg: PlaceConfig) -> tuple[np.ndarray, pl.Series]:
    """The places of [N] catalog rows as integers: (group [N] int64, the number of each row's place,
    -1 where a row has neither a source place id nor UTM; keys [G] the place key of each number)."""
    group = np.full(catalog.num_rows, -1, dtype=np.int64)
    parts: list[pl.Series] = []
    has_source_place = pc.is_valid(catalog.column("source_place_id")).to_numpy(zero_copy_only=False)
    has_utm = pc.and_(pc.is_valid(catalog.column("utm_zone")), pc.is_valid(catalog.column("utm_east")))
    if has_source_place.any():
        rows = np.flatnonzero(has_source_place)
        sub = pl.from_arrow(catalog.select(["source", "dataset", "source_place_id"]).take(rows))
        group[rows], keys = _distinct_strings(source_place_keys(sub["source"], sub["dataset"], sub["source_place_id"]))
        parts.append(keys)
    geo = ~has_source_place & has_utm.to_numpy(zero_copy_only=False)
    if geo.any():
        rows = np.flatnonzero(geo)
        sub = catalog.select(["utm_zone", "utm_letter", "utm_east", "utm_north", "heading_deg", "image_id"])
        if len(rows) < catalog.num_rows:
            sub = sub.take(rows)
        zone = _numpy(sub.column("utm_zone"), np.int64)
        letters = pc.dictionary_encode(pc.fill_null(sub.column("utm_letter"), "")).combine_chunks()
        northern = is_northern_letter(np.asarray(letters.dictionary.to_pylist(), dtype="<U1"))  # ~20 distinct
        northern = northern[letters.indices.to_numpy(zero_copy_only=False)]
        east, north = _numpy(sub.column("utm_east"), np.float64), _numpy(sub.column("utm_north"), np.float64)
        heading = _numpy(sub.column("heading_deg"), np.float64)
        offset = sum(len(k) for k in parts)
        if cfg.view_radius_m > 0:
            cell_keys = geo_place_keys(zone, northern, east, north, cfg.cell_size_m, heading, cfg.heading_sectors)
            view_keys = view_place_keys(cell_keys, zone, northern, east, north, heading, cfg.heading_sectors,
                                        _numpy(sub.column("image_id"), np.int64), cfg.view_radius_m)
            cell, keys = _distinct_strings(view_keys)
        else:
            cell, keys = geo_cells(zone, northern, east, north, cfg.cell_size_m, heading, cfg.heading_sectors)
        group[rows] = cell + offset
        parts.append(keys)
    keys = pl.concat(parts) if parts else pl.Series("place_key", [], dtype=pl.String)
    return group, keys.alias("place_key")


def _numpy(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A numeric column as numpy `dtype`, nulls as NaN (floats)."""
    if pa.types.is_floating(column.type):
        column = pc.fill_null(column.cast(pa.float64()), np.nan)
    return column.to_numpy().astype(dtype, copy=False)


def _distinct_strings(values: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """([N] int64 number of each value, [D] the distinct values in order of first appearance)."""
    frame = pl.DataFrame({"value": values})
    distinct = frame.unique(maintain_order=True).with_row_index("number")
    number = frame.join(distinct, on="value", how="left", maintain_order="left")["number"]
    return number.to_numpy().astype(np.int64), distinct["value"]


@dataclass(frozen=True)
class Placement:
    """Where each of N catalog rows goes, as compact columns: the wide rows are not copied."""

    kept: np.ndarray  # [N] bool: the row's place is big enough
    place_key: pl.Series  # [K] of the kept rows, in row order
    place_id: np.ndarray  # [K] int64, stable_id(place_key)
    rejects: pa.Table  # [N - K] REJECTS_SCHEMA rows, stage "place", in row order


def place_rows(catalog: pa.Table, cfg: PlaceConfig) -> Placement:
    """The places of [N] catalog rows (CATALOG_SCHEMA; place columns may be null); see `assign_places`.

    Rows are counted and grouped by integer place numbers; keys are hashed once per kept place.
    """
    group, keys = place_groups(catalog, cfg)
    size = np.bincount(group[group >= 0], minlength=len(keys))  # [G] images per place
    row_size = np.where(group >= 0, size[np.maximum(group, 0)] if len(size) else 0, 0)
    kept_rows = (group >= 0) & (row_size >= cfg.min_images_per_place)
    kept_places = np.flatnonzero(size >= cfg.min_images_per_place)
    place_id = np.zeros(len(keys), dtype=np.int64)
    place_id[kept_places] = stable_ids(keys.gather(kept_places))
    kept_group = group[kept_rows]

    rejected_rows = ~kept_rows
    rejected = catalog.select(["relpath", "source", "dataset", "image_id"]).filter(pa.array(rejected_rows))
    gone = group[rejected_rows]
    gone_keys = keys.gather(np.maximum(gone, 0)).to_list() if len(keys) else [None] * len(gone)
    details = [
        "no source place id and no coordinates"
        if g < 0
        else f"place {k} has {n} image(s), minimum is {cfg.min_images_per_place}"
        for g, k, n in zip(gone.tolist(), gone_keys, row_size[rejected_rows].tolist())
    ]
    rejects = pa.table(
        {
            "input": rejected.column("relpath"),
            "source": rejected.column("source"),
            "dataset": rejected.column("dataset"),
            "stage": pa.array(["place"] * rejected.num_rows, pa.string()),
            "reason": pa.array(np.where(gone < 0, "no_coordinates", "place_too_small").tolist(), pa.string()),
            "detail": pa.array(details, pa.string()),
            "image_id": rejected.column("image_id"),
        }
    ).cast(REJECTS_SCHEMA)
    return Placement(kept_rows, keys.gather(kept_group).alias("place_key"), place_id[kept_group], rejects)


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
