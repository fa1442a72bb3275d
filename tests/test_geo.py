"""placeforge.geo against the scalar `utm` package, point by point."""

from __future__ import annotations

import numpy as np
import pytest
import utm

from placeforge.geo import is_northern_letter, latlon_to_utm, utm_to_latlon, zone_numbers


def _random_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = rng.uniform(-80.0, 84.0, n)
    lon = rng.uniform(-180.0, 180.0, n)
    # plus the exception zones and zone edges, where a per-array zone goes wrong
    extra_lat = np.array([60.0, 60.0, 56.0, 63.999, 78.0, 78.0, 78.0, 78.0, 0.0, -0.0001, 36.0, 36.0])
    extra_lon = np.array([4.0, 2.999, 3.0, 11.999, 8.9, 9.0, 32.9, 41.9, 0.0, 0.0, -120.0001, -119.9999])
    return np.concatenate([lat, extra_lat]), np.concatenate([lon, extra_lon])


def test_latlon_to_utm_matches_scalar_utm_on_random_points_worldwide():
    lat, lon = _random_points(500)
    got = latlon_to_utm(lat, lon)
    assert got.valid.all()
    for i in range(lat.size):
        east, north, zone, letter = utm.from_latlon(lat[i], lon[i])
        assert got.zone_number[i] == zone, (lat[i], lon[i])
        assert got.zone_letter[i] == letter, (lat[i], lon[i])
        assert got.east_m[i] == pytest.approx(east, abs=1e-6)
        assert got.north_m[i] == pytest.approx(north, abs=1e-6)


def test_latlon_to_utm_flags_invalid_points():
    got = latlon_to_utm(np.array([np.nan, 85.0, -81.0, 10.0, 10.0]), np.array([0.0, 0.0, 0.0, 181.0, np.inf]))
    assert not got.valid.any()
    assert np.isnan(got.east_m).all() and (got.zone_number == 0).all()


def test_utm_to_latlon_round_trips_across_zones_and_hemispheres():
    lat, lon = _random_points(500, seed=1)
    fwd = latlon_to_utm(lat, lon)
    back_lat, back_lon, valid = utm_to_latlon(
        fwd.east_m, fwd.north_m, fwd.zone_number, is_northern_letter(fwd.zone_letter)
    )
    assert valid.all()
    np.testing.assert_allclose(back_lat, lat, atol=1e-6)
    np.testing.assert_allclose(back_lon, lon, atol=1e-6)


def test_zone_numbers_match_scalar_utm_including_norway_and_svalbard():
    lat, lon = np.meshgrid(np.arange(50.0, 84.0, 0.5), np.arange(-6.0, 45.0, 0.5), indexing="ij")
    lat, lon = lat.ravel(), lon.ravel()
    got = zone_numbers(lat, lon)
    want = np.array([utm.latlon_to_zone_number(a, b) for a, b in zip(lat, lon)])
    np.testing.assert_array_equal(got, want)
    assert zone_numbers(np.array([60.0]), np.array([5.0]))[0] == 32  # Norway: 31 -> 32
    assert zone_numbers(np.array([78.0]), np.array([10.0]))[0] == 33  # Svalbard: 32 -> 33
