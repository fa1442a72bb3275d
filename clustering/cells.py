"""Geo cells and CosPlace groups: which coarse place an image belongs to, as pure functions.

A cell is a square of `cell_size_m` (10 m, MutualVPR's M) in one UTM zone and
hemisphere: col = floor(east / cell_size_m), row = floor(north / cell_size_m).  The
zone and hemisphere are part of the key, "utm:<zone><N|S>:<col>:<row>", because the
same metric (col, row) in zone 10N and zone 11N are places hundreds of km apart.
`cell_id` is `stable_id(cell_key)`, so it is the same in every process and every run.

Rows without UTM (Google Landmarks v2: a landmark, no coordinates) use the catalog's
own place as their cell: `cell_id = place_id`, `cell_key = place_key`.  A landmark is
one "place" whose images are then split into view classes exactly like a geo cell.

Groups follow CosPlace: cells `cells_apart` apart in both directions share a group,
group = (col mod N, row mod N), so two cells of one group are at least N cells apart and
their images never show the same spot; each group gets its own classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from placeforge.catalog import stable_id
from placeforge.geo import cell_col_row, is_northern_letter, utm_cell_keys

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_CELL_SIZE_M = 10.0
DEFAULT_CELLS_APART = 5

_GOLDEN_U64 = np.uint64(0x9E3779B97F4A7C15)
_MIX1_U64 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2_U64 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Cells:
    """The cell and group of N images."""

    cell_id: np.ndarray  # [N] int64, stable_id(cell_key)
    cell_key: np.ndarray  # [N] object (str), "utm:10N:5510:418000" or the catalog place_key
    group_id: np.ndarray  # [N] int32, 0 .. cells_apart**2 - 1
    is_geo: np.ndarray  # [N] bool, False where the cell is a catalog place (no UTM)


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed uint64 per value (splitmix64 of value ^ mix(salt)); pure integer maths.

    Used for per-cell seeds and per-image random keys, so "random" choices depend only on
    (salt, value) and never on row order or on how rows are split across processes.

    Args:
        values: [N] integers (int64 ids are reinterpreted as uint64).
    Returns:
        [N] uint64.
    """
    salt_mixed = _splitmix64(np.array([salt & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))
    return _splitmix64(np.asarray(values).astype(np.int64).view(np.uint64) ^ salt_mixed)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN_U64  # uint64 arrays wrap on overflow, which is what the hash wants
    z = (z ^ (z >> np.uint64(30))) * _MIX1_U64
    z = (z ^ (z >> np.uint64(27))) * _MIX2_U64
    return z ^ (z >> np.uint64(31))


def _stable_ids(keys: np.ndarray) -> np.ndarray:
    """[N] int64 `stable_id` of [N] keys, hashed once per distinct key."""
    if len(keys) == 0:
        return np.empty(0, dtype=np.int64)
    unique, inverse = np.unique(keys.astype(str), return_inverse=True)
    return np.array([stable_id(k) for k in unique], dtype=np.int64)[inverse.reshape(-1)]


def group_of_cell(col: np.ndarray, row: np.ndarray, heading_class: np.ndarray | None = None,
                  cells_apart: int = DEFAULT_CELLS_APART, heading_groups: int = 1) -> np.ndarray:
    """Dense CosPlace group id of [N] cells: (col mod N) * N + (row mod N).

    Cells exactly `cells_apart` apart (in col or row) share a group; neighbours never do.
    numpy's mod is non-negative for a positive divisor, so negative columns work.
    With `heading_class` (CosPlace's heading split) the group also includes
    heading_class mod `heading_groups`, giving ids 0 .. N*N*heading_groups - 1.

    Returns:
        [N] int32 in 0 .. cells_apart**2 * heading_groups - 1.
    """
    if cells_apart < 1 or heading_groups < 1:
        raise ValueError(f"cells_apart and heading_groups must be >= 1, got {cells_apart}, {heading_groups}")
    col_mod = np.mod(np.asarray(col, np.int64), cells_apart)
    group = col_mod * cells_apart + np.mod(np.asarray(row, np.int64), cells_apart)
    if heading_class is not None:
        group = group * heading_groups + np.mod(np.asarray(heading_class, np.int64), heading_groups)
    return group.astype(np.int32)


def group_of_place(place_id: np.ndarray, cells_apart: int = DEFAULT_CELLS_APART) -> np.ndarray:
    """Group of a non-geo place (landmark): place_id mod N*N, spreading landmarks evenly.

    Landmarks have no neighbours to keep apart; any fixed, even spread over the
    same N*N groups as geo cells keeps one classifier per group.
    Returns [N] int32.
    """
    return np.mod(np.asarray(place_id, np.int64), cells_apart * cells_apart).astype(np.int32)


def assign_cells(
    utm_zone: np.ndarray,
    northern: np.ndarray,
    east_m: np.ndarray,
    north_m: np.ndarray,
    place_id: np.ndarray,
    place_key: np.ndarray,
    cell_size_m: float = DEFAULT_CELL_SIZE_M,
    cells_apart: int = DEFAULT_CELLS_APART,
) -> Cells:
    """Cell and group of [N] catalog rows: UTM cell where UTM is known, else the catalog place.

    Args:
        utm_zone: [N] zone 1..60; 0, negative or NaN where unknown.
        northern: [N] bool, hemisphere (catalog: utm_letter >= "N").
        east_m, north_m: [N] UTM metres; NaN where unknown.
        place_id, place_key: [N] the catalog's place (used only where UTM is unknown).
    Raises:
        ValueError: rows with neither UTM nor a place (ingest should have rejected them).
    """
    east = np.asarray(east_m, dtype=np.float64)
    north = np.asarray(north_m, dtype=np.float64)
    zone_f = np.asarray(utm_zone, dtype=np.float64)
    is_geo = np.isfinite(east) & np.isfinite(north) & np.isfinite(zone_f) & (zone_f >= 1)
    n = len(east)
    cell_id = np.zeros(n, dtype=np.int64)
    cell_key = np.empty(n, dtype=object)
    group_id = np.zeros(n, dtype=np.int32)
    if is_geo.any():
        col, row = cell_col_row(east[is_geo], north[is_geo], cell_size_m)
        keys = utm_cell_keys(zone_f[is_geo].astype(np.int64), np.asarray(northern, bool)[is_geo], col, row)
        ids = _stable_ids(keys)
        cell_key[is_geo], cell_id[is_geo] = keys, ids
        group_id[is_geo] = group_of_cell(col, row, cells_apart=cells_apart)
    other = ~is_geo
    if other.any():
        pid = np.asarray(place_id, dtype=object)[other]
        pkey = np.asarray(place_key, dtype=object)[other]
        missing = np.array([p is None or k is None for p, k in zip(pid, pkey)], dtype=bool)
        if missing.any():
            raise ValueError(
                f"{int(missing.sum())} row(s) have neither UTM coordinates nor a place_id/place_key; "
                "assign places (placeforge.places) before clustering"
            )
        cell_id[other] = pid.astype(np.int64)
        cell_key[other] = pkey
        group_id[other] = group_of_place(cell_id[other], cells_apart)
    return Cells(cell_id=cell_id, cell_key=cell_key, group_id=group_id, is_geo=is_geo)


def cells_from_catalog(catalog: pa.Table, cell_size_m: float = DEFAULT_CELL_SIZE_M,
                       cells_apart: int = DEFAULT_CELLS_APART) -> Cells:
    """`assign_cells` on a catalog table (CATALOG_SCHEMA); nulls read as unknown."""
    def floats(name: str) -> np.ndarray:
        return catalog.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    letters = np.asarray(catalog.column("utm_letter").fill_null("").to_pylist(), dtype=object)  # null: unknown
    return assign_cells(
        utm_zone=floats("utm_zone"),
        northern=is_northern_letter(letters.astype("<U1")),
        east_m=floats("utm_east"),
        north_m=floats("utm_north"),
        place_id=np.asarray(catalog.column("place_id").to_pylist(), dtype=object),
        place_key=np.asarray(catalog.column("place_key").to_pylist(), dtype=object),
        cell_size_m=cell_size_m,
        cells_apart=cells_apart,
    )
