"""Place assignment: geo cells across zones, heading sectors, source places, small places."""

import numpy as np
import pyarrow as pa
import pytest

from placeforge.catalog import catalog_table, image_id_for
from placeforge.geo import cell_col_row, latlon_to_utm, utm_to_latlon
from placeforge.places import PlaceConfig, assign_places, geo_place_keys, heading_sector, view_leaders


def test_cell_indices_floor_negative_and_boundaries():
    col, row = cell_col_row(np.array([0.0, 14.99, 15.0, -0.1]), np.array([29.9, 30.0, 0.0, -15.0]), 15.0)
    assert col.tolist() == [0, 0, 1, -1]
    assert row.tolist() == [1, 2, 0, -1]


def test_heading_sector_wraps_and_marks_unknown():
    headings = np.array([0.0, 44.9, 45.0, 90.0, 134.9, 225.0, 314.9, 315.0, 359.9, 360.0, -10.0, np.nan])
    assert heading_sector(headings, 4).tolist() == [0, 0, 1, 1, 1, 3, 3, 0, 0, 0, 0, -1]


def test_a_view_jittered_around_a_cardinal_direction_stays_one_sector():
    for centre, sector in ((0.0, 0), (90.0, 1), (180.0, 2), (270.0, 3)):
        jittered = centre + np.array([-8.0, -1.0, 0.0, 3.0, 8.0])
        assert heading_sector(jittered, 4).tolist() == [sector] * 5
    assert heading_sector(np.array([0.0, 29.9, 30.0, 345.0]), 12).tolist() == [0, 1, 1, 0]


def test_same_metric_cell_in_two_zones_or_hemispheres_is_two_places():
    keys = geo_place_keys(
        np.array([10, 11, 10]), np.array([True, True, False]), np.full(3, 500_000.0), np.full(3, 4_000_000.0), 15.0
    )
    assert len(set(keys)) == 3


def test_heading_split_keeps_unknown_heading_unsplit():
    keys = geo_place_keys(
        np.array([10, 10, 10]), np.ones(3, bool), np.full(3, 7.0), np.full(3, 7.0), 15.0, np.array([10.0, 200.0, np.nan]), 2
    )
    assert keys[0].endswith(":h0") and keys[1].endswith(":h1") and ":h" not in keys[2]


def _catalog(lat, lon, source_place=None, dataset="d", heading=None):
    utm = latlon_to_utm(np.asarray(lat), np.asarray(lon))
    n = len(lat)
    extra = {} if heading is None else {"heading_deg": list(heading)}
    rel = [f"img{i}.jpg" for i in range(n)]
    return catalog_table(
        {
            "image_id": [image_id_for(dataset, r) for r in rel],
            "source": ["atname"] * n,
            "dataset": [dataset] * n,
            "path": [f"/x/{r}" for r in rel],
            "relpath": rel,
            "lat": lat,
            "lon": lon,
            "utm_east": utm.east_m,
            "utm_north": utm.north_m,
            "utm_zone": utm.zone_number,
            "utm_letter": utm.zone_letter.tolist(),
            "source_place_id": source_place if source_place is not None else [None] * n,
            **extra,
        }
    )


def test_assign_places_rejects_small_places_and_accounts_for_every_row():
    # 5 images within 2 m of the centre of one 50 m cell in SF (zone 10N), 2 images 1 km away.
    east = np.array([551_125.0, 551_126.0, 551_124.0, 551_125.0, 551_127.0, 552_125.0, 552_126.0])
    north = np.array([4_180_975.0, 4_180_976.0, 4_180_974.0, 4_180_977.0, 4_180_975.0, 4_180_975.0, 4_180_976.0])
    lat, lon, _ = utm_to_latlon(east, north, np.full(7, 10), np.ones(7, bool))
    catalog = _catalog(lat, lon)
    kept, rejects = assign_places(catalog, PlaceConfig(cell_size_m=50.0, min_images_per_place=4))
    assert kept.num_rows == 5 and rejects.num_rows == 2
    assert set(rejects.column("reason").to_pylist()) == {"place_too_small"}
    assert len(set(kept.column("place_id").to_pylist())) == 1
    assert kept.column("place_key").to_pylist()[0].startswith("utm:10N:")
    assert set(kept.column("image_id").to_pylist()) | set(rejects.column("image_id").to_pylist()) == set(
        catalog.column("image_id").to_pylist()
    )


def test_source_place_ids_are_namespaced_by_dataset():
    a = _catalog([1.0] * 4, [1.0] * 4, source_place=["7"] * 4, dataset="London")
    b = _catalog([1.0] * 4, [1.0] * 4, source_place=["7"] * 4, dataset="Paris")
    kept, rejects = assign_places(pa.concat_tables([a, b]), PlaceConfig())
    assert rejects.num_rows == 0
    assert len(set(kept.column("place_id").to_pylist())) == 2


def test_place_ids_are_stable_across_calls_and_row_order():
    catalog = _catalog([37.7749] * 4 + [37.78] * 4, [-122.4194] * 4 + [-122.41] * 4)
    kept1, _ = assign_places(catalog, PlaceConfig())
    kept2, _ = assign_places(catalog.take(pa.array(np.arange(8)[::-1])), PlaceConfig())
    m1 = dict(zip(kept1.column("image_id").to_pylist(), kept1.column("place_id").to_pylist()))
    m2 = dict(zip(kept2.column("image_id").to_pylist(), kept2.column("place_id").to_pylist()))
    assert m1 == m2 and len(set(m1.values())) == 2


def test_rows_without_place_or_coordinates_are_rejected():
    catalog = _catalog([np.nan] * 4, [np.nan] * 4)
    kept, rejects = assign_places(catalog, PlaceConfig(min_images_per_place=1))
    assert kept.num_rows == 0 and rejects.column("reason").to_pylist() == ["no_coordinates"] * 4


def test_config_validation():
    with pytest.raises(ValueError):
        PlaceConfig(cell_size_m=0).validate()


def _two_views_across_a_cell_edge(seed: int = 0):
    """Two camera positions 7.5 m apart looking north, 5 captures each jittered by up to 1.4 m,
    the first right on a 15 m cell edge; plus one capture of the first position looking east."""
    rng = np.random.default_rng(seed)
    centres = np.array([[551_130.0, 4_180_987.5], [551_137.5, 4_180_987.5]])  # x = 551130: a 15 m cell edge
    points = np.concatenate([c + rng.uniform(-1.0, 1.0, (5, 2)) for c in centres])
    east = np.r_[points[:, 0], centres[0, 0]]
    north = np.r_[points[:, 1], centres[0, 1]]
    heading = np.r_[rng.uniform(-8, 8, 10) % 360, 90.0]
    lat, lon, _ = utm_to_latlon(east, north, np.full(11, 10), np.ones(11, bool))
    return _catalog(lat, lon, heading=heading), np.r_[[0] * 5, [1] * 5, 2]


def test_view_places_hold_one_view_each_where_cells_cut_and_mix_them():
    catalog, view = _two_views_across_a_cell_edge()
    kept, rejects = assign_places(catalog, PlaceConfig(heading_sectors=4, min_images_per_place=1, view_radius_m=4.0))
    assert rejects.num_rows == 0
    place_of = dict(zip(kept.column("image_id").to_pylist(), kept.column("place_key").to_pylist()))
    places = [place_of[i] for i in catalog.column("image_id").to_pylist()]
    assert len(set(places)) == 3  # one per view: north at two positions, east at the first
    assert all((places[i] == places[j]) == (view[i] == view[j]) for i in range(11) for j in range(11))
    assert all(":h0:v" in p for p in places[:10]) and ":h1:v" in places[10]

    cells, _ = assign_places(catalog, PlaceConfig(heading_sectors=4, min_images_per_place=1))
    cell_of = dict(zip(cells.column("image_id").to_pylist(), cells.column("place_key").to_pylist()))
    first_view = {cell_of[i] for i in catalog.column("image_id").to_pylist()[:5]}
    assert len(first_view) == 2  # the 15 m cell edge cuts the first view in two: what views fix


def test_view_places_do_not_depend_on_row_order():
    catalog, _ = _two_views_across_a_cell_edge(seed=3)
    cfg = PlaceConfig(heading_sectors=4, min_images_per_place=1, view_radius_m=4.0)
    kept1, _ = assign_places(catalog, cfg)
    kept2, _ = assign_places(catalog.take(pa.array(np.random.default_rng(1).permutation(11))), cfg)
    m1 = dict(zip(kept1.column("image_id").to_pylist(), kept1.column("place_id").to_pylist()))
    m2 = dict(zip(kept2.column("image_id").to_pylist(), kept2.column("place_id").to_pylist()))
    assert m1 == m2


def test_view_leaders_bound_every_cluster_by_the_radius_within_its_group():
    rng = np.random.default_rng(0)
    east, north = rng.uniform(0, 60, 400), rng.uniform(0, 60, 400)
    group = rng.integers(0, 3, 400)
    leader = view_leaders(group, east, north, rng.permutation(400), 5.0)
    assert (group[leader] == group).all()
    assert (np.hypot(east - east[leader], north - north[leader]) <= 5.0).all()
    assert (leader[leader] == leader).all()  # a leader leads itself
    # Greedy cover: no two leaders of one group lie within the radius of each other.
    leaders = np.unique(leader)
    d = np.hypot(east[leaders, None] - east[leaders], north[leaders, None] - north[leaders])
    same = group[leaders, None] == group[leaders]
    assert not ((d <= 5.0) & same & ~np.eye(len(leaders), dtype=bool)).any()


def test_view_radius_needs_heading_sectors():
    with pytest.raises(ValueError, match="needs places.heading_sectors"):
        PlaceConfig(view_radius_m=4.0).validate()
    with pytest.raises(ValueError, match="view_radius_m must be >= 0"):
        PlaceConfig(heading_sectors=4, view_radius_m=-1.0).validate()
