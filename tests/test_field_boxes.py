"""Field boxes from the survey's own data: depth maps first, else the SfM points of
``sparse/0`` (as ``citygen ingest`` writes it), else the plan's range -- always under the
cameras.  Expectations are written out here (depth: 0.5 / 99.5 percentiles; SfM points: 0.5
percentile to the highest point; + 10 % + 2 m), not taken from the code."""

from __future__ import annotations

import numpy as np

from citygen.partition import Block, Grid, TilePlan
from citygen.tile import CAMERA_CLEARANCE_M, field_box, tile_tasks
from citygen.train.data import scene_box
from survey_io import Camera, Georef, Survey, SurveyImage, write_transforms
from survey_io.colmap import write_colmap
from survey_io.ingest import heldout_point_mask

CAM_Z = 40.0
RECT = (-30.0, -30.0, 30.0, 30.0)
KNOWN_GROUND = {"kind": "plane", "height": 0.0, "source": "median of sparse points"}
GUESSED_GROUND = {"kind": "plane", "height": 0.0, "source": "median camera height - flight_height_m (120.0 m)"}


def _survey_with_points(root, z: np.ndarray, xy_half: float = 15.0, seed: int = 0):
    """Four nadir cameras at CAM_Z over the origin, no depth maps, and a COLMAP model in
    root/sparse/0 whose points have heights ``z`` (spread over |x|, |y| <= xy_half)."""
    cam = Camera(64, 48, 50.0, 50.0, 32.0, 24.0, "PINHOLE")
    images = []
    for i, (x, y) in enumerate([(-10, -10), (10, -10), (-10, 10), (10, 10)]):
        c2w = np.eye(4)
        c2w[:3, 3] = (x, y, CAM_Z)  # camera -z axis = world down: nadir
        images.append(SurveyImage(f"img/{i:03d}.jpg", 0, c2w))
    (root / "img").mkdir(parents=True, exist_ok=True)
    survey = Survey(root, [cam], images, Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)))
    write_transforms(survey, root / "transforms.json")
    rng = np.random.default_rng(seed)
    xyz = np.column_stack([rng.uniform(-xy_half, xy_half, len(z)), rng.uniform(-xy_half, xy_half, len(z)), z])
    write_colmap(survey, root / "sparse" / "0", text=True, points=(xyz, np.zeros((len(z), 3), np.uint8)))
    # pycolmap numbers the points 1..N in the order given; ingest holds out a hashed tenth of them
    return survey, z[~heldout_point_mask(np.arange(1, len(z) + 1))]


def _plan(tile, names, ground) -> None:
    grid = Grid(origin=(RECT[0], RECT[1]), block_size=(60.0, 60.0), rows=1, cols=1)
    block = Block(id="b_r0_c0", row=0, col=0, core=RECT, extended=RECT, z_range=(-20.0, 250.0), images=names)
    TilePlan(georef=Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)), grid=grid, margin_m=0.0, blocks=[block],
             ground=ground, config={"z_below_ground_m": 20.0}).save(tile / "plan.json")


def _padded(z):
    """SfM points: from the 0.5 percentile to the highest point, padded."""
    z0, z1 = np.percentile(z, 0.5), np.max(z)
    pad = 0.1 * (z1 - z0) + 2.0
    return z0 - pad, z1 + pad


def _block_record(tmp_path, z, ground):
    survey, kept = _survey_with_points(tmp_path / "survey", z)
    _plan(tmp_path / "tile", [im.name for im in survey.images], ground)
    tasks, record = tile_tasks(tmp_path / "tile", tmp_path / "survey" / "transforms.json", _tiny_cfg())
    rec = record["blocks"]["b_r0_c0"]
    np.testing.assert_allclose(tasks[0].kwargs["aabb"], rec["aabb"])
    return np.asarray(rec["aabb"]), rec["box_source"], kept


def _tiny_cfg():
    from citygen.tile import resolve_config

    return resolve_config("tiny")


def test_sfm_box_follows_the_points_and_stays_under_the_cameras(tmp_path):
    z = np.random.default_rng(1).uniform(-3.0, 38.0, 400)  # surfaces up to just under the flight
    box, source, kept = _block_record(tmp_path, z, GUESSED_GROUND)
    z0, z1 = _padded(kept)
    assert source == "sfm-points"
    np.testing.assert_allclose(box[:, :2], [RECT[:2], RECT[2:]])
    assert z1 > CAM_Z - CAMERA_CLEARANCE_M  # the padded top would reach the cameras ...
    np.testing.assert_allclose(box[:, 2], [z0, CAM_Z - CAMERA_CLEARANCE_M], atol=1e-9)  # ... and is cut under them
    # the held-out tenth really is left out: the percentiles of all points differ
    assert abs(_padded(z)[0] - z0) > 1e-6


def test_sfm_floor_never_cuts_the_known_ground_off(tmp_path):
    z = np.random.default_rng(2).uniform(5.0, 25.0, 400)  # roofs and canopy only: the ground is never matched
    box, source, kept = _block_record(tmp_path, z, KNOWN_GROUND)
    z0, z1 = _padded(kept)
    assert source == "sfm-points" and z0 > -2.0
    # plan ground = z_range[0] + z_below_ground_m = 0; floor at most 2 m under it
    np.testing.assert_allclose(box[:, 2], [-2.0, z1], atol=1e-9)


def test_sfm_box_without_a_known_ground_starts_at_the_points(tmp_path):
    z = np.random.default_rng(2).uniform(5.0, 25.0, 400)
    box, source, kept = _block_record(tmp_path, z, GUESSED_GROUND)
    np.testing.assert_allclose(box[:, 2], _padded(kept), atol=1e-9)


def test_few_points_fall_back_to_the_plan(tmp_path):
    box, source, kept = _block_record(tmp_path, np.linspace(0.0, 10.0, 12), KNOWN_GROUND)
    assert len(kept) < 16 and source == "plan"
    # the one-block guess over the plan's ground (0 m: its z range starts 20 m below it) with the
    # cameras h = CAM_Z above it: [-0.1 h, 0.6 h], inside the plan's range and under the cameras
    np.testing.assert_allclose(box[:, 2], [-0.1 * CAM_Z, 0.6 * CAM_Z])
    assert box[1, 2] < CAM_Z - CAMERA_CLEARANCE_M


def test_depth_heights_keep_the_old_rule():
    block = Block(id="b", row=0, col=0, core=RECT, extended=RECT, z_range=(-20.0, 250.0))
    for seen, cams in [((1.0, 31.0), [120.0]), ((-25.0, 300.0), [400.0]), ((0.0, 30.0), [20.0])]:
        pad = 0.1 * (seen[1] - seen[0]) + 2.0
        lo, hi = max(-20.0, seen[0] - pad), min(250.0, seen[1] + pad, min(cams) - 2.0)
        np.testing.assert_allclose(field_box(block, cams, seen)[:, 2], [lo, hi])


def test_one_block_box_from_sfm_points_and_fallback(tmp_path):
    from survey_io import read_transforms

    z = np.random.default_rng(3).uniform(-1.0, 20.0, 300)
    _, kept = _survey_with_points(tmp_path / "a", z)
    survey = read_transforms(tmp_path / "a" / "transforms.json")
    box, source = scene_box(survey, survey.train_images)
    assert source == "sfm-points"
    np.testing.assert_allclose(box[:, 2], _padded(kept), atol=1e-9)
    assert box[0, 0] < -15.0 and box[1, 0] > 15.0 and box[0, 1] < -15.0 and box[1, 1] > 15.0  # covers the points

    _survey_with_points(tmp_path / "b", np.linspace(0.0, 10.0, 12))
    survey = read_transforms(tmp_path / "b" / "transforms.json")
    box, source = scene_box(survey, survey.train_images)
    h = CAM_Z  # ground plane z = 0: the camera rule, [-0.1 h, 0.6 h] padded by 5 % of its size
    assert source == "plan"
    np.testing.assert_allclose(box[:, 2], [-0.1 * h - 0.05 * 0.7 * h, 0.6 * h + 0.05 * 0.7 * h])


def test_sparse_roofs_stay_inside_the_sfm_box(tmp_path):
    """SfM finds few features on flat roofs: 3 roof points at 30 m among 1000 ground points (under
    0.5 %, so the 99.5 percentile is ground) still lift the top over the roof, not the ground."""
    z = np.concatenate([np.random.default_rng(4).uniform(-1.0, 1.0, 1000), np.full(3, 30.0)])
    box, source, kept = _block_record(tmp_path, z, KNOWN_GROUND)
    roof = kept.max()
    assert source == "sfm-points" and roof == 30.0 and np.percentile(kept, 99.5) < 2.0
    pad = 0.1 * (30.0 - np.percentile(kept, 0.5)) + 2.0
    np.testing.assert_allclose(box[1, 2], 30.0 + pad, atol=1e-9)
    assert box[1, 2] < CAM_Z - CAMERA_CLEARANCE_M
