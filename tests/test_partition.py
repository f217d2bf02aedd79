"""Partition: footprints, grid, assignment, cap, coverage, plan.json, sizing, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from citygen.cli import entrypoint
from citygen.config import load_config
from citygen.errors import CitygenError
from citygen.partition import (
    GroundModel,
    PartitionConfig,
    TilePlan,
    compute_footprints,
    plan_tile,
)
from citygen.partition.estimate import SizingConfig
from citygen.partition.layout import FlightLayout, synthetic_survey
from citygen.partition.run import PlanRequest, run_plan
from survey_io import Camera, Georef, Survey, SurveyImage, write_transforms

# a CRS origin that is deliberately not a multiple of any block size
ORIGIN = (500123.4, 5000077.7, 30.0)
NADIR = np.array([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])  # image right = east, image down = south


def pose(R: np.ndarray, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = R
    m[:3, 3] = t
    return m


def make_survey(poses: list[np.ndarray], camera: Camera, names=None, origin=ORIGIN) -> Survey:
    names = names or [f"img_{i:03d}.jpg" for i in range(len(poses))]
    images = [SurveyImage(name=n, camera=0, c2w=p) for n, p in zip(names, poses)]
    return Survey(root=__import__("pathlib").Path("/nonexistent"), cameras=[camera], images=images,
                  georef=Georef("EPSG:32633", origin))


def bounds(x0, y0, x1, y1, origin=ORIGIN):
    return (x0 + origin[0], y0 + origin[1], x1 + origin[0], y1 + origin[1])


def oblique_rotation(forward) -> np.ndarray:
    """OpenCV c2w rotation for a view along ``forward`` with image-up towards +Z (built by hand)."""
    f = np.asarray(forward, float) / np.linalg.norm(forward)
    right = np.cross(f, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(f, right), f], axis=1)


# -- footprints ------------------------------------------------------------------------------
@pytest.mark.parametrize("ground_z, heightfield", [(0.0, False), (12.5, False), (12.5, True)])
def test_nadir_footprint_matches_closed_form(ground_z, heightfield):
    cam = Camera(width=400, height=300, fl_x=250.0, fl_y=250.0, cx=200, cy=150)
    h = 120.0
    survey = make_survey([pose(NADIR, [30.0, -40.0, h])], cam)
    ground = GroundModel.plane(ground_z)
    if heightfield:   # a flat plateau as a raster, with a 0 m plain around it: exercises the ray march
        ground = GroundModel.from_array(np.full((100, 100), ground_z), x0=-500, y0=500, dx=10, dy=10)
        ground.height = 0.0
    fp = compute_footprints(survey, ground, grid=(8, 6), max_dist=5000)
    width, height = 400 * (h - ground_z) / 250, 300 * (h - ground_z) / 250   # w * h / f
    x0, y0, x1, y1 = fp.bboxes[0]
    assert x1 - x0 == pytest.approx(width) and y1 - y0 == pytest.approx(height)
    assert (x0 + x1) / 2 == pytest.approx(30.0) and (y0 + y1) / 2 == pytest.approx(-40.0)
    assert fp.areas[0] == pytest.approx(width * height)
    assert fp.valid[0]


def test_heightfield_intersection_matches_tilted_plane():
    # z = 0.1 x - 0.05 y + 3 is reproduced exactly by bilinear interpolation of its samples
    dx = 2.0
    xs = np.arange(0, 400, dx) + dx / 2                      # pixel centres, west to east
    ys = 400 - (np.arange(0, 200) * dx + dx / 2)             # pixel centres, north to south
    heights = 0.1 * xs[None, :] - 0.05 * ys[:, None] + 3.0
    ground = GroundModel.from_array(heights, x0=0.0, y0=400.0, dx=dx, dy=dx)
    rng = np.random.default_rng(0)
    o = np.column_stack([rng.uniform(100, 300, 50), rng.uniform(100, 300, 50), np.full(50, 150.0)])
    d = np.column_stack([rng.uniform(-0.4, 0.4, 50), rng.uniform(-0.4, 0.4, 50), -np.ones(50)])
    pts, hit = ground.intersect(o, d, max_dist=1000)
    # analytic: o_z + t d_z = 0.1 (o_x + t d_x) - 0.05 (o_y + t d_y) + 3
    t = (0.1 * o[:, 0] - 0.05 * o[:, 1] + 3 - o[:, 2]) / (d[:, 2] - 0.1 * d[:, 0] + 0.05 * d[:, 1])
    assert hit.all()
    np.testing.assert_allclose(pts, o + d * t[:, None], atol=0.05)


def test_rays_above_horizon_are_clipped_and_sky_views_see_nothing():
    cam = Camera(width=400, height=300, fl_x=250.0, fl_y=250.0, cx=200, cy=150)
    level = oblique_rotation([1.0, 0, 0])                   # looking east, horizon in the middle
    sky = oblique_rotation([1.0, 0, 1.0])                    # looking 45 degrees up
    survey = make_survey([pose(level, [0, 0, 100.0]), pose(sky, [0, 0, 100.0])], cam)
    fp = compute_footprints(survey, GroundModel.plane(0.0), grid=(8, 6), max_dist=800)
    assert fp.valid.tolist() == [True, False]
    dist = np.linalg.norm(fp.polygons[0] - [0, 0], axis=1)
    assert dist.max() == pytest.approx(800, rel=1e-6)       # clipped at the max distance
    plan = plan_tile(survey, PartitionConfig(block_size_m=500), 0.0, footprints=fp)
    assert plan.unassigned_images == ["img_001.jpg"]


# -- grid and assignment --------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_flight():
    layout = FlightLayout(area_km2=1.0, altitude_m=100.0, image_size=(400, 300), focal_px=300.0,
                          forward_overlap=0.6, side_overlap=0.5, oblique_spacing_factor=2.0)
    survey, _ = synthetic_survey(layout, seed=1)
    survey = dataclasses.replace(survey, georef=Georef("EPSG:32633", ORIGIN))  # a CRS origin off round numbers
    config = PartitionConfig(block_size_m=250.0, margin_m=20.0)
    return survey, config, plan_tile(survey, config, 0.0)


def test_every_image_lands_in_a_block(small_flight):
    survey, _, plan = small_flight
    assert plan.unassigned_images == []
    placed = set(itertools.chain.from_iterable(b.images for b in plan.blocks))
    assert placed == {im.name for im in survey.images}


def test_cores_tile_the_grid_and_margins_overlap_by_twice_the_margin(small_flight):
    survey, config, plan = small_flight
    g = plan.grid
    # snapped: the grid origin is a multiple of the block size in CRS coordinates
    for axis in (0, 1):
        crs = g.origin[axis] + survey.georef.origin[axis]
        assert crs / 250.0 == pytest.approx(round(crs / 250.0), abs=1e-9)
    ex = g.extent
    cores = np.array([b.core for b in plan.blocks])
    area = np.prod(cores[:, 2:] - cores[:, :2], axis=1)
    assert area.sum() == pytest.approx((ex[2] - ex[0]) * (ex[3] - ex[1]))
    assert cores[:, :2].min(axis=0) == pytest.approx(ex[:2]) and cores[:, 2:].max(axis=0) == pytest.approx(ex[2:])
    for a, b in itertools.combinations(cores, 2):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        assert min(w, h) <= 1e-9                      # no two cores share area
    by_rc = {(b.row, b.col): b for b in plan.blocks}
    for (r, c), b in by_rc.items():
        if (r, c + 1) in by_rc:
            e = by_rc[(r, c + 1)].extended
            assert b.extended[2] - e[0] == pytest.approx(2 * config.margin_m)
        if (r + 1, c) in by_rc:
            e = by_rc[(r + 1, c)].extended
            assert b.extended[3] - e[1] == pytest.approx(2 * config.margin_m)
    # the grid covers every footprint: the footprints' union bounding box lies inside it
    fp = compute_footprints(small_flight[0], GroundModel.plane(0.0), config.footprint_grid, config.max_ray_distance_m)
    bb = fp.bboxes
    assert bb[:, 0].min() >= ex[0] and bb[:, 2].max() <= ex[2]
    assert bb[:, 1].min() >= ex[1] and bb[:, 3].max() <= ex[3]
    # and is no larger than it must be: ceil of the snapped extent over the block size
    assert g.cols == math.ceil((bb[:, 2].max() + ORIGIN[0]) / 250) - math.floor((bb[:, 0].min() + ORIGIN[0]) / 250)
    assert g.rows == math.ceil((bb[:, 3].max() + ORIGIN[1]) / 250) - math.floor((bb[:, 1].min() + ORIGIN[1]) / 250)


def test_blocks_override_splits_the_extent_exactly():
    cam = Camera(width=400, height=300, fl_x=400.0, fl_y=400.0, cx=200, cy=150)
    poses = [pose(NADIR, [x, y, 100.0]) for x in (0, 100, 200) for y in (0, 80)]
    plan = plan_tile(make_survey(poses, cam), PartitionConfig(blocks=(2, 2), margin_fraction=0.1), 0.0)
    assert (plan.grid.rows, plan.grid.cols) == (2, 2)
    # footprints 100 x 75 m: extent x in [-50, 250], y in [-37.5, 117.5]
    assert plan.grid.extent == pytest.approx((-50, -37.5, 250, 117.5))
    assert plan.grid.block_size == pytest.approx((150, 77.5))
    assert plan.margin_m == pytest.approx(0.1 * 77.5)
    assert [b.id for b in plan.blocks] == ["b_r0_c0", "b_r0_c1", "b_r1_c0", "b_r1_c1"]


def test_oblique_view_lands_in_the_block_it_looks_at():
    # blocks A = [0, 1000] x [0, 1000] and B = [1000, 2000] x [0, 1000], margin 50
    cam = Camera(width=400, height=300, fl_x=1000.0, fl_y=1000.0, cx=200, cy=150)
    tilt = math.radians(80.0)   # near edge at 200 tan(80 - 8.53 deg) = 597 m east of the camera
    oblique = pose(oblique_rotation([math.sin(tilt), 0, -math.cos(tilt)]), [500.0, 500.0, 200.0])
    nadir = pose(NADIR, [500.0, 500.0, 200.0])
    survey = make_survey([oblique, nadir], cam, names=["oblique.jpg", "nadir.jpg"])
    config = PartitionConfig(block_size_m=1000.0, margin_m=50.0, bounds_crs=bounds(0, 0, 2000, 1000),
                             snap_to_block_size=False)
    plan = plan_tile(survey, config, 0.0)
    a, b = plan.block("b_r0_c0"), plan.block("b_r0_c1")
    assert a.core == pytest.approx((0, 0, 1000, 1000)) and b.core == pytest.approx((1000, 0, 2000, 1000))
    assert "oblique.jpg" in b.images and "oblique.jpg" not in a.images
    assert "nadir.jpg" in a.images and "nadir.jpg" not in b.images


def test_cap_keeps_the_images_that_see_most_of_the_core():
    # nadir footprints 400 x 300 m (w h / f = 400 * 100 / 100) centred at y = 500 in a
    # single 1000 m block; their overlap with the core is (min(cx+200, 1000) - max(cx-200, 0)) * 300
    cam = Camera(width=400, height=300, fl_x=100.0, fl_y=100.0, cx=200, cy=150)
    centres = {"e.jpg": -150.0, "d.jpg": -100.0, "c.jpg": -50.0, "b.jpg": 0.0, "a.jpg": 500.0,
               "tie_y.jpg": 25.0, "tie_x.jpg": 25.0}
    survey = make_survey([pose(NADIR, [cx, 500.0, 100.0]) for cx in centres.values()], cam, names=list(centres))
    overlap = {n: (min(cx + 200, 1000) - max(cx - 200, 0)) * 300 for n, cx in centres.items()}
    ranked = sorted(overlap, key=lambda n: (-overlap[n], n))     # best first, ties by name
    for cap in (1, 2, 3, 4):
        config = PartitionConfig(block_size_m=1000.0, margin_m=50.0, bounds_crs=bounds(0, 0, 1000, 1000),
                                 snap_to_block_size=False, max_images_per_block=cap)
        block = plan_tile(survey, config, 0.0).blocks[0]
        assert block.images == ranked[:cap]
        assert block.coverage["n_candidates"] == len(centres)
        assert block.coverage["n_dropped_by_cap"] == len(centres) - cap
    assert ranked[1:3] == ["tie_x.jpg", "tie_y.jpg"]    # cap 2 had to break the tie


def test_coverage_flags_a_half_seen_block():
    # three cameras see x in [0, 400] of block A (1000 m, 10 x 10 cells): 4 of 10 cell columns
    cam = Camera(width=400, height=1000, fl_x=100.0, fl_y=100.0, cx=200, cy=500)
    poses = [pose(NADIR, [200.0, 500.0, 100.0])] * 3 + [pose(NADIR, [1500.0, 500.0, 100.0])] * 3
    cam_b = [pose(NADIR, [1000.0 + x, 500.0, 100.0]) for x in (200.0, 500.0, 800.0)]
    survey = make_survey(poses[:3] + cam_b, cam)
    config = PartitionConfig(block_size_m=1000.0, margin_m=0.0, bounds_crs=bounds(0, 0, 2000, 1000),
                             snap_to_block_size=False, coverage_cells=10, coverage_min_views=3)
    plan = plan_tile(survey, config, 0.0)
    a, b = plan.blocks
    assert a.coverage["covered_fraction"] == pytest.approx(0.4) and a.low_coverage
    # block B: footprints [1000,1400], [1300,1700], [1600,2000]: every cell seen by 1 or 2 -> none by 3
    assert b.coverage["covered_fraction"] == 0.0 and b.coverage["views_max"] == 2
    assert plan.view_counts[:, :4].min() == 3 and plan.view_counts[:, 4:10].max() == 0


# -- ground estimate ---------------------------------------------------------------------------
def test_ground_auto_from_depth_maps_and_fallback(tmp_path):
    from citygen.partition.ground import estimate_ground

    cam = Camera(width=40, height=30, fl_x=40.0, fl_y=40.0, cx=20, cy=15)
    survey = make_survey([pose(NADIR, [0, 0, 100.0]), pose(NADIR, [50, 0, 110.0])], cam)
    config = PartitionConfig(flight_height_m=90.0)
    assert estimate_ground(survey, config).height == pytest.approx(105.0 - 90.0)
    for im in survey.images:          # a flat ground at z = -5: depth = camera height + 5
        im.depth = tmp_path / f"{im.name}.npy"
        np.save(im.depth, np.full((30, 40), im.c2w[2, 3] + 5.0))
    assert estimate_ground(survey, config).height == pytest.approx(-5.0)
    pts = np.array([[0, 0, 1.0], [0, 0, 2.0], [0, 0, 7.0]])
    assert estimate_ground(survey, config, points=pts).height == pytest.approx(2.0)


def test_ground_from_geotiff(tmp_path):
    from survey_io.geotiff import write_geotiff

    georef = Georef("EPSG:32633", ORIGIN)
    heights = np.full((50, 60), ORIGIN[2] + 7.0, dtype=np.float32)
    tif = write_geotiff(tmp_path / "dtm.tif", heights, crs=georef, origin_xy=(ORIGIN[0] - 100, ORIGIN[1] + 100),
                        gsd=4.0)
    ground = GroundModel.from_geotiff(tif, georef)
    assert ground.height_at(np.array([[0.0, 0.0], [50.0, -50.0]])) == pytest.approx([7.0, 7.0])
    assert ground.x0 == pytest.approx(-100) and ground.y0 == pytest.approx(100)
    with pytest.raises(CitygenError, match="differs"):
        GroundModel.from_geotiff(tif, Georef("EPSG:32632", ORIGIN))


# -- plan.json -------------------------------------------------------------------------------
def test_plan_json_round_trip(tmp_path, small_flight):
    _, _, plan = small_flight
    path = plan.save(tmp_path / "plan.json")
    loaded = TilePlan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    d = json.loads(path.read_text())
    blk = d["blocks"][3]
    assert blk["id"] == f"b_r{blk['row']}_c{blk['col']}"
    np.testing.assert_allclose(np.array(blk["core"]["crs"]) - np.array(blk["core"]["local"]),
                               [ORIGIN[0], ORIGIN[1], ORIGIN[0], ORIGIN[1]])
    assert blk["z_range"]["crs"][0] - blk["z_range"]["local"][0] == pytest.approx(ORIGIN[2])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: "not json {", "not valid JSON"),
    (lambda d: {**d, "version": 99}, "unsupported version"),
    (lambda d: {k: v for k, v in d.items() if k != "grid"}, "missing key"),
    (lambda d: {**d, "blocks": [{**d["blocks"][0], "core": {"local": [v + 1 for v in d["blocks"][0]["core"]["local"]]}}]
                + d["blocks"][1:]}, "does not match the grid"),
    (lambda d: {**d, "blocks": [{**d["blocks"][0], "images": "x.jpg"}]}, "must be lists"),
    (lambda d: {**d, "blocks": d["blocks"] + d["blocks"][:1]}, "duplicate block ids"),
])
def test_malformed_plan_json_names_the_file(tmp_path, small_flight, mutate, message):
    d = small_flight[2].to_dict()
    bad = mutate(json.loads(json.dumps(d)))
    path = tmp_path / "plan.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(CitygenError, match=message) as err:
        TilePlan.load(path)
    assert str(path) in str(err.value)


# -- dry run and sizing ----------------------------------------------------------------------
def _hash_params_by_hand(f) -> int:
    """tcnn HashGrid size, written out from the documented formula (float32 level scales)."""
    scale = np.float32(math.exp(math.log(f.max_resolution / f.base_resolution) / (f.n_levels - 1)))
    total = 0
    for level in range(f.n_levels):
        s = np.float32(np.exp2(np.float32(level) * np.log2(scale, dtype=np.float32), dtype=np.float32)
                       * np.float32(f.base_resolution) - np.float32(1))
        res = int(np.ceil(s)) + 1
        entries = min(res**3, (2**32 - 1) // 2)
        total += min(-(-entries // 8) * 8, 2**f.log2_hashmap_size)
    return total * f.n_features_per_level


@pytest.mark.parametrize("area_km2, block, per_axis", [(100.0, 1000.0, 10), (2.0, 500.0, 3)])
def test_dry_run_block_count_and_sizing_formula(area_km2, block, per_axis):
    layout = FlightLayout(area_km2=area_km2, altitude_m=600.0, forward_overlap=0.6, side_overlap=0.4)
    sizing = SizingConfig(gpu="h100", rays_per_second=4.0e5, image_cache_on_gpu=False)
    report = run_plan(PlanRequest(dry_run=True, layout=layout,
                                  partition=PartitionConfig(block_size_m=block),
                                  train_preset="city-100km2", downscale=4, sizing=sizing))
    s = report["summary"]
    assert per_axis == math.ceil(math.sqrt(area_km2) * 1000 / block)
    assert s["blocks"] == per_axis**2 and s["grid"] == [per_axis, per_axis]
    assert s["unassigned_images"] == 0 and s["images_per_block"]["min"] > 0

    # one block, independently: params, bytes, seconds from the documented formulas
    train = load_config("city-100km2")
    f = train.field
    est = report["blocks"][0]
    n = est["n_images"]
    E, H, G, D, A, S = f.n_levels * f.n_features_per_level, f.hidden_dim, f.geo_feat_dim, f.sh_degree**2, \
        f.appearance_dim, f.semantic_hidden_dim
    mlp = (E * H + H) + (H * (1 + G) + 1 + G) + ((G + D + A) * H + H) + (f.color_hidden_layers - 1) * (H * H + H) \
        + (H * 3 + 3) + (G * S + S) + (S * 7 + 7)
    params = _hash_params_by_hand(f) + mlp + n * A
    occupancy = 4 * train.render.grid_resolution**3
    assert est["params"]["total"] == params
    assert est["model_bytes"] == 4 * params + occupancy
    assert est["model_bytes_per_km2"] == pytest.approx((4 * params + occupancy) / (block * block / 1e6))
    cam = report["assumptions"]["camera"]
    cache = n * (cam["width"] // 4) * (cam["height"] // 4) * 4
    gpu = 16 * params + occupancy + train.rays_per_batch * 48 * 512 + 1.5e9
    assert est["memory_bytes"]["gpu_total"] == pytest.approx(gpu)
    assert est["memory_bytes"]["host_total"] == cache
    assert est["train_seconds"] == pytest.approx(train.steps * train.rays_per_batch / 4.0e5)


def test_cli_plan_writes_plan_and_picture(tmp_path, capsys):
    cam = Camera(width=200, height=150, fl_x=150.0, fl_y=150.0, cx=100, cy=75)
    poses = [pose(NADIR, [x, y, 80.0]) for x in range(0, 300, 40) for y in range(0, 200, 40)]
    survey = make_survey(poses, cam)
    survey.root = tmp_path
    from PIL import Image

    blank = tmp_path / survey.images[0].name
    Image.new("RGB", (cam.width, cam.height)).save(blank)  # plan checks every image's size (header only)
    for im in survey.images[1:]:
        (tmp_path / im.name).write_bytes(blank.read_bytes())
    data = write_transforms(survey, tmp_path / "transforms.json")
    out = tmp_path / "tile"
    rc = entrypoint(["plan", "--data", str(data), "--out", str(out), "--blocks", "2x2", "--ground-height", "0",
                     "--train-preset", "tiny"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["blocks"] == 4 and report["summary"]["unassigned_images"] == 0
    plan = TilePlan.load(out / "plan.json")
    assert len(plan.blocks) == 4 and plan.n_images == len(poses)
    from PIL import Image

    with Image.open(out / "plan.png") as img:
        assert img.size[0] > 100 and img.getextrema() != ((255, 255), (255, 255), (255, 255))
    assert json.loads((out / "plan_report.json").read_text())["summary"] == report["summary"]


def test_plan_picture_draws_the_orthophoto_underneath(tmp_path, small_flight):
    from PIL import Image

    from citygen.partition.draw import draw_plan
    from survey_io.geotiff import write_geotiff

    _, _, plan = small_flight
    ex = plan.grid.extent
    red = np.zeros((64, 64, 3), dtype=np.uint8)
    red[..., 0] = 200
    side = 1.5 * max(ex[2] - ex[0], ex[3] - ex[1])     # the ortho covers the whole picture
    cx, cy = (ex[0] + ex[2]) / 2 + ORIGIN[0], (ex[1] + ex[3]) / 2 + ORIGIN[1]
    tif = write_geotiff(tmp_path / "ortho.tif", red, crs=plan.georef, gsd=side / 64,
                        origin_xy=(cx - side / 2, cy + side / 2))
    draw_plan(plan, tmp_path / "plain.png", size_px=300)
    draw_plan(plan, tmp_path / "ortho.png", size_px=300, ortho=tif)
    plain = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int64)
    ortho = np.asarray(Image.open(tmp_path / "ortho.png"), dtype=np.int64)
    def reddish(img):   # the ortho's red (200, 0, 0) under the translucent layers
        return ((img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 120)).mean()

    assert reddish(ortho) > 0.5 and reddish(plain) < 0.2


def test_ground_above_the_cameras_is_refused():
    cam = Camera(width=40, height=30, fl_x=40.0, fl_y=40.0, cx=20, cy=15)
    survey = make_survey([pose(NADIR, [0, 0, 50.0])], cam)
    with pytest.raises(CitygenError, match="not below the cameras"):
        plan_tile(survey, PartitionConfig(), 60.0)


def test_cli_plan_bad_input_is_one_line(tmp_path, capsys):
    assert entrypoint(["plan", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert entrypoint(["plan", "--dry-run", "--blocks", "2by2"]) == 2
    assert "ROWSxCOLS" in capsys.readouterr().err
