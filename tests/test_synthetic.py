"""The synthetic city survey, checked against the scene it was generated from.

One small survey is generated per module (a few seconds); the checks compare the written
files (depth, semantics, DSM, EXIF) with the scene description and closed-form geometry,
never with the renderer's own intermediate results.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import numpy as np
import pyproj
import pytest
from PIL import Image

from survey_io import read_transforms
from survey_io.geotiff import read_geotiff
from survey_io.synthetic import (
    PRESETS,
    build_city,
    make_survey,
    plan_flight,
    synthetic_flight,
)

CFG = replace(PRESETS["tiny"], area_m=140.0, altitude_m=85.0, width=160, height=120, front_overlap=0.45,
              side_overlap=0.35, oblique_spacing_factor=5.0, ortho_gsd_m=0.5, test_every=4)
SEED = 3


@pytest.fixture(scope="module")
def survey_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_survey(out, CFG, seed=SEED, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def city():
    return build_city(CFG, seed=SEED)


def _plan(city, p_local):
    """Local ENU -> the city's plan frame (rotation about +Z by plan_angle), independent of the code."""
    a = city.plan_angle
    x, y = p_local[..., 0], p_local[..., 1]
    return np.stack([math.cos(a) * x + math.sin(a) * y, -math.sin(a) * x + math.cos(a) * y, p_local[..., 2]], -1)


def _backproject(survey, im, depth, ij):
    cam = survey.cameras[im.camera]
    j, i = ij[:, 0], ij[:, 1]
    z = depth[j, i].astype(np.float64)
    d_cam = np.stack([(i + 0.5 - cam.cx) / cam.fl_x * z, (j + 0.5 - cam.cy) / cam.fl_y * z, z], 1)
    return d_cam @ im.c2w[:3, :3].T + im.c2w[:3, 3]


def test_layout_and_transforms_round_trip(survey_dir):
    s = read_transforms(survey_dir / "transforms.json")
    planned = plan_flight(CFG, SEED)
    assert len(s.images) == len(planned.images) >= 8
    assert [im.name for im in s.images] == [im.name for im in planned.images]
    for a, b in zip(s.images, planned.images):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)
        assert a.depth.is_file() and a.semantics.is_file() and (survey_dir / a.name).is_file()
    assert s.georef == planned.georef and s.georef.crs == "EPSG:32651"
    assert s.test_names == [im.name for k, im in enumerate(s.images) if k % 4 == 2]
    kinds = {("nadir" if im.c2w[2, 2] < -0.999 else "oblique") for im in s.images}
    assert kinds == {"nadir", "oblique"}
    cam = s.cameras[0]
    assert (cam.width, cam.height, cam.camera_model) == (160, 120, "PINHOLE") and not cam.has_distortion
    for f in ("dsm.tif", "dtm.tif", "ortho.tif", "ortho_semantics.tif", "scene.json", "preview.png"):
        assert (survey_dir / f).is_file(), f


def test_depth_back_projects_onto_the_scene(survey_dir, city):
    """Ground/road pixels land on the terrain, water on the water plane, buildings on a box."""
    s = read_transforms(survey_dir / "transforms.json")
    b = city.boxes
    bld = np.nonzero(b.cls == 2)[0]
    rng = np.random.default_rng(0)
    counts = {0: 0, 1: 0, 2: 0, 4: 0}
    for im in s.images[::2]:
        depth = np.load(im.depth)
        sem = np.asarray(Image.open(im.semantics))
        assert depth.dtype == np.float32 and sem.dtype == np.uint8 and depth.shape == sem.shape == (120, 160)
        assert set(np.unique(sem)) <= set(range(7))
        ij = np.stack([rng.integers(1, 119, 300), rng.integers(1, 159, 300)], 1)
        p = _plan(city, _backproject(s, im, depth, ij))
        cls = sem[ij[:, 0], ij[:, 1]]
        tol = 0.02 + 2e-5 * depth[ij[:, 0], ij[:, 1]]  # float32 depth
        ground = (cls == 0) | (cls == 1)
        on_ground = np.abs(p[:, 2] - city.terrain(p[:, 0], p[:, 1])) < tol
        on_bridge = np.zeros(len(p), bool)
        for k in np.nonzero(b.material == 4)[0]:  # bridge decks are road too
            on_bridge |= np.all((p >= b.lo[k] - tol[:, None]) & (p <= b.hi[k] + tol[:, None]), axis=1)
        assert np.all(on_ground[ground] | on_bridge[ground])
        water = cls == 4
        assert np.all(np.abs(p[water, 2] - city.water_level) < tol[water])
        for q, t in zip(p[cls == 2], tol[cls == 2]):
            inside = np.all((q >= b.lo[bld] - t) & (q <= b.hi[bld] + t), axis=1)
            assert inside.any(), f"building pixel at {q} is on no building box"
        for c in counts:
            counts[c] += int((cls == c).sum())
    assert all(v > 10 for v in counts.values()), counts


def test_roof_corner_projects_to_building_label(survey_dir):
    """Project a roof corner taken from scene.json into the nadir images that see it."""
    s = read_transforms(survey_dir / "transforms.json")
    scene = json.loads((survey_dir / "scene.json").read_text())
    tallest = max((bld for bld in scene["buildings"] if bld["in_area"]), key=lambda bld: bld["height"])
    part = max(tallest["parts"], key=lambda p: p["top_z"])
    fp = np.array(part["footprint_local"])
    centre = fp.mean(0)
    checked = 0
    for corner in fp:
        q = corner + 0.8 * (centre - corner) / np.linalg.norm(centre - corner)  # 0.8 m inside the corner
        X = np.array([q[0], q[1], part["top_z"]])
        for im in s.images:
            if im.c2w[2, 2] > -0.999:
                continue  # nadir views: nothing stands above the tallest roof
            cam = s.cameras[0]
            pc = im.c2w[:3, :3].T @ (X - im.c2w[:3, 3])
            u, v = cam.fl_x * pc[0] / pc[2] + cam.cx, cam.fl_y * pc[1] / pc[2] + cam.cy
            if not (1 <= u < cam.width - 1 and 1 <= v < cam.height - 1):
                continue
            sem = np.asarray(Image.open(im.semantics))
            depth = np.load(im.depth)
            i, j = int(u), int(v)
            assert sem[j, i] == 2
            assert abs(depth[j, i] - pc[2]) < 0.05  # a flat roof seen from straight above
            checked += 1
    assert checked >= 2


def test_dsm_dtm_ortho_geotiffs(survey_dir, city):
    scene = json.loads((survey_dir / "scene.json").read_text())
    s = read_transforms(survey_dir / "transforms.json")
    ox, oy, oz = s.georef.origin
    h = CFG.area_m / 2
    dsm, dtm = read_geotiff(survey_dir / "dsm.tif"), read_geotiff(survey_dir / "dtm.tif")
    ortho, sem = read_geotiff(survey_dir / "ortho.tif"), read_geotiff(survey_dir / "ortho_semantics.tif")
    n = round(CFG.area_m / CFG.ortho_gsd_m)
    for r in (dsm, dtm, ortho, sem):
        assert r.crs == "EPSG:32651"
        assert tuple(r.transform)[:6] == (0.5, 0.0, ox - h, 0.0, -0.5, oy + h)
        assert r.array.shape[:2] == (n, n)
    assert ortho.array.shape == (n, n, 3) and ortho.array.dtype == np.uint8
    assert np.all(dsm.array >= dtm.array - 1e-3)
    # DTM: the bare surface (terrain or water) at the cell centres, independently evaluated
    cx, cy = dtm.cell_centers()
    local = np.stack([cx - ox, cy - oy, np.zeros_like(cx)], -1)
    pl = _plan(city, local)
    expect = np.maximum(city.terrain(pl[..., 0], pl[..., 1]), city.water_level) + oz
    np.testing.assert_allclose(dtm.array, expect, atol=2e-3)
    # DSM: roof height inside the footprints of single-part flat-roofed buildings
    checked = 0
    for bld in scene["buildings"]:
        if bld["kind"] != "flat" or len(bld["parts"]) != 1:
            continue
        part = bld["parts"][0]
        x0, y0, x1, y1 = part["footprint_plan"]
        inner = (pl[..., 0] > x0 + 1.0) & (pl[..., 0] < x1 - 1.0) & (pl[..., 1] > y0 + 1.0) & (pl[..., 1] < y1 - 1.0)
        if inner.sum() < 20:
            continue
        z = dsm.array[inner].astype(np.float64) - oz
        assert np.all(z >= part["top_z"] - 0.01)  # rooftop units only add height
        assert abs(np.median(z) - part["top_z"]) < 0.01
        assert np.all(sem.array[inner] == 2)
        checked += 1
    assert checked >= 2
    assert set(np.unique(sem.array)) >= {0, 1, 2, 3}


def test_exif_gps_and_dji_xmp_encode_the_pose(survey_dir):
    s = read_transforms(survey_dir / "transforms.json")
    to_lonlat = pyproj.Transformer.from_crs(s.georef.crs, "EPSG:4979", always_xy=True)
    for im in (s.images[0], s.images[-1]):  # a nadir and an oblique view
        img = Image.open(survey_dir / im.name)
        exif = img.getexif()
        gps = exif.get_ifd(0x8825)
        dms = lambda v: float(v[0]) + float(v[1]) / 60 + float(v[2]) / 3600
        lat = dms(gps[2]) * (1 if gps[1] == "N" else -1)
        lon = dms(gps[4]) * (1 if gps[3] == "E" else -1)
        expect = s.georef.local_to_lonlat(im.c2w[:3, 3])
        assert abs(lon - expect[0]) < 1e-6 and abs(lat - expect[1]) < 1e-6
        assert abs(float(gps[6]) - expect[2]) < 1e-3
        # focal length in pixels from FocalLength (mm) and FocalPlaneXResolution (px/cm)
        sub = exif.get_ifd(0x8769)
        assert abs(float(sub[0x920A]) * float(sub[0xA20E]) / 10 - s.cameras[0].fl_x) < 1e-3
        assert sub[0xA405] == round(s.cameras[0].fl_x / s.cameras[0].width * 36)
        assert exif[0x010F] == "citygen" and re.match(r"\d{4}:\d\d:\d\d \d\d:\d\d:\d\d", sub[0x9003])
        xmp = img.info["xmp"].decode()
        val = lambda k, xmp=xmp: float(re.search(rf'drone-dji:{k}="([^"]+)"', xmp).group(1))
        assert abs(val("RelativeAltitude") - im.c2w[2, 3]) < 1e-3
        assert abs(val("AbsoluteAltitude") - expect[2]) < 1e-3
        # rebuild the optical axis from the gimbal angles (true north -> grid north by pyproj)
        e0, n0, _ = s.georef.origin
        x, y = im.c2w[0, 3] + e0, im.c2w[1, 3] + n0
        lo, la, _ = to_lonlat.transform(x, y, 0.0)
        to_grid = pyproj.Transformer.from_crs("EPSG:4979", s.georef.crs, always_xy=True)
        xn, yn, _ = to_grid.transform(lo, la + 1e-4, 0.0)
        conv = math.atan2(xn - x, yn - y)  # grid azimuth of true north
        yaw = math.radians(val("GimbalYawDegree")) + conv
        pitch = math.radians(val("GimbalPitchDegree"))
        axis = np.array([math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), math.sin(pitch)])
        right = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
        np.testing.assert_allclose(axis, im.c2w[:3, 2], atol=1e-6)
        np.testing.assert_allclose(right, im.c2w[:3, 0], atol=1e-6)
        assert val("GimbalRollDegree") == 0.0


def test_same_seed_same_bytes_other_seed_other_city(tmp_path):
    cfg = replace(CFG, max_images=8, width=96, height=72, area_m=60.0, ortho_gsd_m=1.0)
    paths = []
    # run "b" renders in two processes: the bytes must not depend on that either
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)):
        make_survey(tmp_path / name, cfg, seed=seed, progress=False, workers=workers)
        paths.append(tmp_path / name)
    files = sorted(p.relative_to(paths[0]) for p in paths[0].rglob("*") if p.is_file())
    assert len(files) == 3 * 8 + 7
    for rel in files:
        assert (paths[0] / rel).read_bytes() == (paths[1] / rel).read_bytes(), rel
    assert (paths[0] / "images/00000.jpg").read_bytes() != (paths[2] / "images/00000.jpg").read_bytes()


def test_synthetic_flight_plans_large_areas_without_rendering():
    s = synthetic_flight(4.0, altitude_m=120.0, width=4000, height=3000, front_overlap=0.8, side_overlap=0.7)
    s.validate()
    cam = s.cameras[0]
    pos = np.array([im.c2w[:3, 3] for im in s.images])
    nadir = np.array([im.c2w[2, 2] < -0.999 for im in s.images])
    assert np.allclose(pos[:, 2], 120.0)
    assert np.isclose(pos[nadir, 0].min(), -1000) and np.isclose(pos[nadir, 1].max(), 1000)
    # spacing follows the overlaps: along-track footprint * (1 - front) on flat ground
    along = 120.0 * cam.height / cam.fl_y * 0.2
    n_along = math.ceil(2000 / along) + 1
    across = 120.0 * cam.width / cam.fl_x * 0.3
    n_lines = math.ceil(2000 / across) + 1
    assert nadir.sum() == n_along * n_lines
    assert (~nadir).sum() > 0 and len(s.test_names) == len(s.images) // 8 + (len(s.images) % 8 > 4)
    assert not s.root.exists()


def test_presets_plan_the_advertised_surveys():
    tiny, small, city = (plan_flight(PRESETS[k]) for k in ("tiny", "small", "city"))
    assert 50 <= len(tiny.images) <= 80 and (tiny.cameras[0].width, tiny.cameras[0].height) == (320, 240)
    assert 150 <= len(small.images) <= 250 and small.cameras[0].width == 640
    assert not PRESETS["city"].render_images and len(city.images) > 1000
    assert len(tiny.test_names) == len(tiny.images) // 8


def test_failure_preset_is_a_built_patch_in_a_larger_oblique_flight():
    """The outside tester's survey: ~100 images at 400x300, about half nadir and half 45 deg
    oblique, no depth maps; the city is built only inside the patch (the same objects there as
    without the knob), fields crossed by roads elsewhere."""
    cfg = PRESETS["failure"]
    survey = plan_flight(cfg, root="x")
    pitch = np.degrees(np.arcsin(np.array([im.c2w[2, 2] for im in survey.images])))  # optical axis z
    assert 90 <= len(survey.images) <= 110 and (survey.cameras[0].width, survey.cameras[0].height) == (400, 300)
    assert np.sum(np.isclose(pitch, -90.0)) == 54 and np.sum(np.isclose(pitch, -45.0)) == 48
    assert all(im.depth is None for im in survey.images) and cfg.area_m >= 2 * cfg.built_area_m
    patch = build_city(cfg, seed=0)
    full = build_city(replace(cfg, built_area_m=None), seed=0)
    half = cfg.built_area_m / 2
    rot = patch.plan_rotation

    def centres_enu(boxes):
        return ((boxes.lo + boxes.hi) / 2) @ rot.T

    c = centres_enu(patch.boxes)
    in_patch = (np.abs(c[:, 0]) <= half) & (np.abs(c[:, 1]) <= half)
    assert np.all(in_patch | (patch.boxes.material == 4))  # outside: bridges only (MAT_BRIDGE)
    cf = centres_enu(full.boxes)
    full_in = (np.abs(cf[:, 0]) <= half) & (np.abs(cf[:, 1]) <= half)
    assert int(in_patch.sum()) == int(full_in.sum()) > 100 and len(full.boxes) > len(patch.boxes) + 100
    np.testing.assert_array_equal(patch.boxes.lo[in_patch], full.boxes.lo[full_in])
    # the ground outside the patch: fields, and roads (zone ids 0 and 1); a yard/lawn/parking inside
    rng = np.random.default_rng(0)
    enu = np.column_stack([rng.uniform(-300, 300, 4000), rng.uniform(-300, 300, 4000), np.zeros(4000)])
    plan = enu @ rot  # ENU -> plan
    zone = patch.ground_zone(plan[:, 0], plan[:, 1])
    outside = (np.abs(enu[:, 0]) > half + 1) | (np.abs(enu[:, 1]) > half + 1)
    assert set(np.unique(zone[outside]).tolist()) <= {0, 1}
    assert set(np.unique(zone[~outside]).tolist()) - {0, 1}
