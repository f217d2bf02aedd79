"""Georef: local <-> CRS <-> lon/lat/h round trips, UTM zone choice, bad CRSs, serialisation."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pyproj
import pytest

from survey_io import Georef, SurveyError, utm_epsg_for

# (name, lon, lat): northern and southern hemisphere, high latitude, and one on a zone edge (lon = 12.0 is the
# 32/33 boundary) where the 50 km disc reaches into the next zone.
ORIGINS = [
    ("zurich", 8.54, 47.37, 408.0),
    ("sydney", 151.21, -33.87, 20.0),
    ("ushuaia", -68.30, -54.80, 0.0),
    ("zone-edge", 12.0, 45.0, 150.0),
    ("tromso", 18.95, 69.65, 10.0),
    ("quito", -78.5, -0.2, 2850.0),
]


def _random_local(rng, n=500, radius=50_000.0) -> np.ndarray:
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(-200, 3000, n)], -1)


@pytest.mark.parametrize("name,lon,lat,h", ORIGINS, ids=[o[0] for o in ORIGINS])
def test_round_trips_below_a_millimetre(name, lon, lat, h):
    g = Georef.from_lonlat(lon, lat, h)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    local = _random_local(rng)
    # local -> lon/lat/h -> local
    llh = g.local_to_lonlat(local)
    np.testing.assert_allclose(g.lonlat_to_local(llh), local, rtol=0, atol=1e-3)
    # local -> CRS -> local is a float64 offset
    np.testing.assert_allclose(g.crs_to_local(g.local_to_crs(local)), local, rtol=0, atol=1e-6)
    # against an independent pyproj pipeline built here
    to_ll = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(g.crs), pyproj.CRS.from_epsg(4979), always_xy=True)
    enh = local + np.array(g.origin)
    lon_ref, lat_ref, h_ref = to_ll.transform(enh[:, 0], enh[:, 1], enh[:, 2])
    np.testing.assert_allclose(llh[:, 0], lon_ref, rtol=0, atol=1e-9)  # ~0.1 mm in degrees
    np.testing.assert_allclose(llh[:, 1], lat_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(llh[:, 2], h_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,lon,lat,h", ORIGINS, ids=[o[0] for o in ORIGINS])
def test_origin_is_where_it_was_asked(name, lon, lat, h):
    g = Georef.from_lonlat(lon, lat, h)
    np.testing.assert_allclose(g.local_to_lonlat(np.zeros(3)), [lon, lat, h], rtol=0, atol=1e-9)
    # one metre east in the local frame is (close to) one metre east on the ground: UTM's scale is 0.9996..1.001
    east = g.local_to_lonlat(np.array([1.0, 0.0, 0.0]))
    geod = pyproj.Geod(ellps="WGS84")
    _, _, dist = geod.inv(lon, lat, east[0], east[1])
    assert 0.998 < dist < 1.002


@pytest.mark.parametrize("lon,lat,epsg", [
    (8.54, 47.37, 32632),     # Zurich
    (-0.13, 51.51, 32630),    # London
    (2.35, 48.86, 32631),     # Paris
    (139.69, 35.69, 32654),   # Tokyo
    (-74.0, 40.71, 32618),    # New York
    (151.21, -33.87, 32756),  # Sydney
    (-46.63, -23.55, 32723),  # Sao Paulo
    (18.42, -33.92, 32734),   # Cape Town
    (5.32, 60.39, 32632),     # Bergen: Norway exception (would be 31 by longitude)
    (3.5, 58.0, 32632),       # the Norway exception's western edge
    (15.63, 78.22, 32633),    # Longyearbyen, Svalbard
    (7.0, 78.5, 32631),       # Svalbard zone 31 (would be 32)
    (25.0, 78.0, 32635),      # Svalbard zone 35
    (-180.0, 0.0, 32601),
    (179.99, 0.0, 32660),
])
def test_utm_zone(lon, lat, epsg):
    assert utm_epsg_for(lon, lat) == epsg
    assert Georef.from_lonlat(lon, lat).epsg == epsg


def test_utm_domain_is_checked():
    with pytest.raises(SurveyError, match="outside the UTM domain"):
        utm_epsg_for(0.0, 85.0)
    with pytest.raises(SurveyError, match="outside the UTM domain"):
        utm_epsg_for(200.0, 0.0)


@pytest.mark.parametrize("crs,message", [
    ("EPSG:999999", "unknown CRS"),
    ("not a crs at all", "unknown CRS"),
    ("EPSG:4326", "not projected"),   # geographic: degrees are not a metric frame
    ("EPSG:4979", "not projected"),
    ("EPSG:4978", "not projected"),   # geocentric
])
def test_bad_crs(crs, message):
    with pytest.raises(SurveyError, match=message):
        Georef(crs, (0.0, 0.0, 0.0))


@pytest.mark.parametrize("origin", [(0.0, np.nan, 0.0), (np.inf, 0.0, 0.0), (1.0, 2.0)])
def test_bad_origin(origin):
    with pytest.raises(SurveyError, match="origin"):
        Georef("EPSG:32633", origin)


def test_dict_round_trip_through_json():
    wkt = pyproj.CRS.from_epsg(2154).to_wkt()
    for g in (Georef.from_lonlat(-122.42, 37.77, 15.0), Georef(wkt, (652000.5, 6863000.25, 35.0))):
        back = Georef.from_dict(json.loads(json.dumps(g.to_dict())))
        assert back == g
        np.testing.assert_array_equal(back.local_to_crs(np.ones(3)), g.local_to_crs(np.ones(3)))


@pytest.mark.parametrize("d", [{}, {"crs": "EPSG:32633"}, {"origin": [0, 0, 0]}, {"crs": "EPSG:32633", "origin": 5}])
def test_from_dict_refuses_incomplete(d):
    with pytest.raises(SurveyError, match="georef needs"):
        Georef.from_dict(d)


def test_explicit_crs_in_from_lonlat():
    g = Georef.from_lonlat(8.54, 47.37, 400.0, crs=2056)  # Swiss LV95, a projected non-UTM CRS
    assert g.crs == "EPSG:2056"
    e, n = pyproj.Transformer.from_crs(4326, 2056, always_xy=True).transform(8.54, 47.37)
    np.testing.assert_allclose(g.origin[:2], [e, n], atol=1e-6)
