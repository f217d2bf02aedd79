"""Viewer: camera and input (closed form), progressive scheduling, display modes against the
renderer's own output (EGL screenshots), measuring in an analytic scene and in the synthetic
city, camera paths, the baked PLY preview, the glfw window under Xvfb, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from boxscene import box_entry_exit

from citygen.errors import CitygenError
from survey_io import Camera, Georef
from survey_io.semantics import CLASSES
from viewer.app import BLOCK_LINE_COLOR, HeadlessViewer, SurveyView, ViewerApp
from viewer.camera import FlyCamera, angles_from_rotation, intrinsics
from viewer.camera_path import CameraPath, render_camera_path
from viewer.colormap import (
    TURBO_LUT,
    colorize_classes,
    colorize_depth,
    disparity01,
    lut_lookup,
    to_uint8,
)
from viewer.controls import Controls
from viewer.display import Frame, colorize
from viewer.hud import HudInfo, hud_lines
from viewer.measure import Measurement, pick, project, unproject
from viewer.ply import read_ply
from viewer.scheduler import RenderScheduler
from viewer.source import TileSource

# ------------------------------------------------------------------------------------------------
# An analytic tile: ground z = 0 over |x|, |y| <= 40 plus two boxes, ray-cast exactly.
BOXES = [((-12.0, -10.0, 0.0), (-4.0, -2.0, 10.0), (0.85, 0.30, 0.25), 2),
         ((3.0, 2.0, 0.0), (11.0, 12.0, 6.0), (0.25, 0.45, 0.85), 3)]
SKY = (0.6, 0.75, 0.9)


def cast(o: np.ndarray, d: np.ndarray):
    """Nearest hit of rays: ray parameter t (inf = miss), rgb, accumulation, label."""
    n = len(o)
    t = np.full(n, np.inf)
    rgb = np.tile(np.asarray(SKY), (n, 1))
    lab = np.zeros(n, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(d[:, 2] < 0, -o[:, 2] / d[:, 2], np.inf)
    p = o + np.where(np.isfinite(tg), tg, 0.0)[:, None] * d
    inside = (np.abs(p[:, 0]) <= 40) & (np.abs(p[:, 1]) <= 40) & np.isfinite(tg)
    t[inside] = tg[inside]
    checker = (np.floor(p[:, 0] / 5) + np.floor(p[:, 1] / 5)) % 2 == 0
    rgb[inside] = np.where(checker[inside, None], (0.55, 0.50, 0.42), (0.35, 0.35, 0.38))
    lab[inside] = np.where(checker[inside], 0, 1)
    for lo, hi, color, label in BOXES:
        tn, tf = box_entry_exit(o, d, lo, hi)
        hit = (tf >= tn) & (tn > 0) & (tn < t)
        t[hit], rgb[hit], lab[hit] = tn[hit], color, label
    return t, rgb, np.isfinite(t).astype(np.float32), lab


class FakeTileRenderer:
    """The TileRenderer API over the analytic scene (exact depth and semantics)."""

    def __init__(self, plan=None):
        self.georef = Georef("EPSG:32651", (350000.0, 3450000.0, 20.0))
        self.classes = CLASSES
        self.plan = plan
        self.bounds = np.array([[-40.0, -40.0, 0.0], [40.0, 40.0, 10.0]])
        self.device = "cpu"
        self.calls = {"rays": 0, "view": 0}

    def _out(self, o, d, shape):
        t, rgb, acc, lab = cast(o, d)
        sem = np.full((len(o), len(self.classes)), -4.0)
        sem[np.arange(len(o)), lab] = 4.0
        f = lambda a, s: torch.tensor(a.reshape(s), dtype=torch.float32)
        return t, f(rgb, shape + (3,)), f(acc, shape), f(sem, shape + (-1,))

    def render_rays(self, origins, dirs, appearance=None):
        self.calls["rays"] += 1
        o, d = origins.double().numpy(), dirs.double().numpy()
        t, rgb, acc, sem = self._out(o, d, (len(o),))
        dist = np.where(np.isfinite(t), t * np.linalg.norm(d, axis=1), 0.0)
        return {"rgb": rgb, "distance": torch.tensor(dist, dtype=torch.float32), "acc": acc, "semantics": sem}

    def render_view(self, camera, c2w, appearance=None):
        self.calls["view"] += 1
        H, W = camera.height, camera.width
        j, i = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        d = np.stack([(i - camera.cx) / camera.fl_x, (j - camera.cy) / camera.fl_y, np.ones_like(i)], -1).reshape(-1, 3)
        d = d @ np.asarray(c2w)[:3, :3].T  # z-unit camera directions: t is the z-depth
        o = np.broadcast_to(np.asarray(c2w)[:3, 3], d.shape)
        t, rgb, acc, sem = self._out(o, d, (H, W))
        depth = torch.tensor(np.where(np.isfinite(t), t, 0.0).reshape(H, W), dtype=torch.float32)
        return {"rgb": rgb, "depth": depth, "acc": acc, "semantics": sem}


def nadir(height: float, x: float = 0.0, y: float = 0.0) -> np.ndarray:
    """OpenCV c2w looking straight down, image x = east, image y = south."""
    m = np.eye(4)
    m[:3, :3] = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]]).T
    m[:3, 3] = (x, y, height)
    return m


@pytest.fixture(scope="module")
def gl_ctx():
    import moderngl

    try:
        ctx = moderngl.create_standalone_context(backend="egl")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no EGL OpenGL context ({err}); install libegl1 libegl-mesa0 libgl1-mesa-dri libgles2")
    yield ctx
    ctx.release()


def make_app(size=(96, 64), plan=None, **kw) -> ViewerApp:
    return ViewerApp(TileSource(FakeTileRenderer(plan)), size=size, **kw)


def outside(overlays, shape) -> np.ndarray:
    """Mask of the pixels no HUD panel covers."""
    mask = np.ones(shape[:2], bool)
    for o in overlays:
        x0, y0, x1, y1 = o.rect
        mask[y0:y1, x0:x1] = False
    return mask


# -- camera and controls --------------------------------------------------------------------------
def test_camera_axes_and_angle_round_trip():
    cam = FlyCamera(yaw=0.0, pitch=-90.0)
    R = cam.rotation
    np.testing.assert_allclose(R[:, 2], [0, 0, -1], atol=1e-12)        # nadir looks down
    np.testing.assert_allclose(R[:, 0], [1, 0, 0], atol=1e-12)         # heading north: image x = east
    cam = FlyCamera(yaw=90.0, pitch=0.0)
    np.testing.assert_allclose(cam.forward, [1, 0, 0], atol=1e-12)     # heading 90 = east
    np.testing.assert_allclose(cam.rotation[:, 1], [0, 0, -1], atol=1e-12)  # image y = down
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        from viewer.camera_path import matrix_from_quat

        R = matrix_from_quat(q)
        c = FlyCamera()
        c.set_c2w(np.block([[R, np.ones((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]]))
        np.testing.assert_allclose(c.rotation, R, atol=1e-9)
        assert np.isclose(np.linalg.det(c.rotation), 1.0)
    yaw, pitch, roll = angles_from_rotation(nadir(10.0)[:3, :3])
    assert (round(yaw, 9) % 360, pitch, round(roll, 9)) == (0.0, -90.0, 0.0)


def test_controls_move_and_look_closed_form():
    cam = FlyCamera(position=np.zeros(3), yaw=30.0, pitch=-20.0, speed=4.0)
    ctl = Controls(cam, look_sensitivity=0.25, boost=3.0)
    fwd = cam.forward.copy()
    ctl.key_down("w")
    assert ctl.update(0.5)
    np.testing.assert_allclose(cam.position, fwd * 2.0, atol=1e-12)
    ctl.key_down("shift")
    ctl.update(0.5)
    np.testing.assert_allclose(cam.position, fwd * 2.0 + fwd * 6.0, atol=1e-12)
    ctl.key_up("w"), ctl.key_up("shift")
    start = cam.position.copy()
    ctl.key_down("d"), ctl.key_down("e")
    ctl.update(1.0)
    np.testing.assert_allclose(cam.position, start + 4.0 * cam.right + [0, 0, 4.0], atol=1e-12)
    ctl.key_up("d"), ctl.key_up("e")
    assert not ctl.update(1.0)
    # drag 40 px right and 20 px down: heading +10 deg, pitch -5 deg
    ctl.mouse_down(100, 100)
    ctl.mouse_move(140, 120)
    ctl.mouse_up(140, 120)
    assert math.isclose(cam.yaw, 40.0) and math.isclose(cam.pitch, -25.0)
    assert ctl.take_clicks() == []            # a drag is not a click
    ctl.mouse_down(50, 60, "right")
    ctl.mouse_up(51, 60, "right")
    clicks = ctl.take_clicks()
    assert [(c.x, c.y, c.button) for c in clicks] == [(51, 60, "right")]
    ctl.scroll(2)
    assert math.isclose(cam.speed, 4.0 * 1.25 ** 2)


def test_orbit_keeps_distance_and_target_centred():
    cam = FlyCamera(position=np.array([0.0, -50.0, 30.0]))
    target = np.array([5.0, 3.0, 2.0])
    cam.start_orbit(target)
    dist = np.linalg.norm(cam.position - target)
    ctl = Controls(cam, look_sensitivity=0.5)
    ctl.mouse_down(0, 0)
    ctl.mouse_move(60, -30)
    ctl.mouse_up(60, -30)
    assert math.isclose(np.linalg.norm(cam.position - target), dist, rel_tol=1e-12)
    k = cam.intrinsics(200, 100)
    uv, _ = project(k, cam.c2w(), target[None])
    np.testing.assert_allclose(uv[0], [100.0, 50.0], atol=1e-9)
    ctl.scroll(1)                                   # zoom in by 1/1.25
    assert math.isclose(np.linalg.norm(cam.position - target), dist / 1.25, rel_tol=1e-12)
    ctl.key_down("w")
    ctl.update(0.1)
    assert cam.orbit_target is None                 # flying leaves orbit mode


def test_survey_view_frames_bounds():
    bounds = np.array([[-300.0, -200.0, -5.0], [300.0, 200.0, 60.0]])
    cam = FlyCamera(fov_y=50.0)
    cam.frame_bounds(bounds, aspect=16 / 9)
    k = cam.intrinsics(1600, 900)
    corners = np.array([[x, y, z] for x in bounds[:, 0] for y in bounds[:, 1] for z in bounds[:, 2]])
    uv, z = project(k, cam.c2w(), corners)
    assert np.all(z > 0)
    assert np.all((uv >= 0) & (uv <= [1600, 900]))
    cam.fit_scene(bounds)
    assert math.isclose(cam.speed, 0.1 * np.linalg.norm(bounds[1] - bounds[0]))


def test_app_jumps_to_training_camera_and_plays_path(tmp_path):
    now = [0.0]
    cam = Camera(width=400, height=300, fl_x=350.0, fl_y=350.0, cx=200.0, cy=150.0)
    views = [SurveyView("a.jpg", cam, nadir(80.0, 5.0, 5.0)), SurveyView("b.jpg", cam, _pose(45, -60, (0, -30, 40)))]
    app = make_app(survey_views=views, clock=lambda: now[0], out_dir=tmp_path)
    app.key_down("n")
    np.testing.assert_allclose(app.camera.c2w(), views[0].c2w, atol=1e-9)
    assert app.camera.fov_y == pytest.approx(math.degrees(2 * math.atan(150 / 350)))
    app.key_down("k")                                   # keyframe at view a
    app.key_down("n")
    np.testing.assert_allclose(app.camera.c2w(), views[1].c2w, atol=1e-9)
    app.key_down("k")                                   # keyframe at view b
    app.path.seconds = 2.0
    app.path.retime()
    app.key_down("l")                                   # play: t = 0 -> view a, t = 2 s -> view b
    app.update()
    np.testing.assert_allclose(app.camera.c2w(), views[0].c2w, atol=1e-9)
    now[0] = 1.0
    app.update()
    mid = app.path.pose_at(1.0).c2w
    np.testing.assert_allclose(app.camera.c2w(), mid, atol=1e-9)
    now[0] = 2.5
    app.update()
    np.testing.assert_allclose(app.camera.c2w(), views[1].c2w, atol=1e-9)
    app.key_down("j")
    assert CameraPath.load(tmp_path / "camera_path.json").keyframes[1].c2w == pytest.approx(views[1].c2w)


# -- scheduler ------------------------------------------------------------------------------------
def test_scheduler_coarse_when_moving_then_refines_in_bands():
    s = RenderScheduler(frame_budget=0.1, rest_delay=0.5)
    job = s.next_job(0.0, "a", 640, 480)
    assert (job.scale, job.row0, job.row1, job.new_pass) == (32, 0, 15, True)   # no estimate yet: coarsest
    s.report(job, job.n_rays / (160 * 120 / 0.1))   # throughput: 160x120 rays in 0.1 s
    assert s.throughput == pytest.approx(160 * 120 / 0.1)
    assert s.next_job(0.2, "a", 640, 480) is None   # still resting
    seen = {}
    t = 0.6
    while not s.done:
        job = s.next_job(t, "a", 640, 480)
        assert job is not None
        seen.setdefault(job.scale, []).append((job.row0, job.row1))
        s.report(job, job.n_rays / s.throughput)    # keep the throughput constant
        t += 0.01
    assert list(seen) == [16, 8, 4, 2, 1]
    for scale, bands in seen.items():               # every row once, in order, within the budget
        h = 480 // scale
        assert bands[0][0] == 0 and bands[-1][1] == h
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))
        assert all((r1 - r0) * (640 // scale) <= 0.1 * s.throughput + 640 // scale for r0, r1 in bands)
    assert s.next_job(t, "a", 640, 480) is None
    job = s.next_job(t, "b", 640, 480)               # the camera moved: interactive scale again
    assert job.new_pass and job.scale == 4 and (job.row0, job.row1) == (0, 120)  # 160x120 fits 0.1 s


# -- colour maps ------------------------------------------------------------------------------------
def test_colormaps_reference():
    assert disparity01(np.array([2.0]), 2.0, 10.0)[0] == 1.0
    assert disparity01(np.array([10.0]), 2.0, 10.0)[0] == 0.0
    d = disparity01(np.linspace(2, 10, 50), 2.0, 10.0)
    assert np.all(np.diff(d) < 0)
    np.testing.assert_allclose(lut_lookup(TURBO_LUT, np.array([0.0, 1.0, 100 / 255])),
                               TURBO_LUT[[0, 255, 100]], atol=1e-6)
    ids = np.array([[2, 0]], np.uint8)
    rgb = colorize_classes(ids, np.array([[1.0, 0.2]]))
    np.testing.assert_allclose(rgb[0, 0] * 255, (220, 80, 60), atol=1e-3)       # building colour
    assert not np.allclose(rgb[0, 1] * 255, (128, 110, 90))                     # empty pixel: background


# -- EGL screenshots against the renderer ----------------------------------------------------------
def test_display_modes_match_renderer_output(gl_ctx):
    app = make_app(size=(200, 150), scheduler=RenderScheduler(frame_budget=1e-6))  # 1-row bands via render_rays
    hv = HeadlessViewer(app, ctx=gl_ctx)
    first = hv.frame()
    assert app.frame_scale == 32 and first.shape == (150, 200, 3)
    img = hv.settle()
    assert app.scheduler.done and app.source.renderer.calls["rays"] > 10
    ref = app.source.renderer.render_view(app.window_camera, app.camera.c2w())
    mask = outside(app.overlays, img.shape)
    assert mask.mean() > 0.3
    expected = colorize(ref, "rgb")
    assert np.abs(img.astype(int) - expected.astype(int))[mask].max() <= 2
    frame = Frame.from_render(ref)
    app.key_down("2")
    img = hv.draw()
    expected = to_uint8(colorize_depth(frame.depth, frame.acc, *app.near_far))
    diff = np.abs(img.astype(int) - expected.astype(int))[outside(app.overlays, img.shape)]
    assert diff.max() <= 2
    app.key_down("3")
    img = hv.draw()
    expected = to_uint8(colorize_classes(frame.class_ids, frame.acc))
    assert np.abs(img.astype(int) - expected.astype(int))[outside(app.overlays, img.shape)].max() <= 2
    assert len(app.overlays) == 2                   # status + legend
    hv.release()


def test_hi_res_screenshot_rerenders(gl_ctx, tmp_path):
    app = make_app()
    hv = HeadlessViewer(app, ctx=gl_ctx)
    hv.settle()
    path = app.screenshot(tmp_path / "shot.png", size=(192, 128), hud=False)
    from PIL import Image

    img = np.asarray(Image.open(path))
    ref = app.source.renderer.render_view(app.camera.intrinsics(192, 128), app.camera.c2w())
    assert img.shape == (128, 192, 3)
    assert np.abs(img.astype(int) - colorize(ref).astype(int)).max() <= 2
    hv.release()


def test_block_overlay_lines_at_projected_edges(gl_ctx):
    from citygen.partition.plan import Block

    blocks = [Block("b_r0_c0", 0, 0, (-20.0, -20.0, 0.0, 0.0), (-25, -25, 5, 5), (0, 10)),
              Block("b_r0_c1", 0, 1, (0.0, -20.0, 20.0, 0.0), (-5, -25, 25, 5), (0, 10))]
    plan = SimpleNamespace(blocks=blocks, ground={"kind": "plane", "height": 0.0})
    app = make_app(size=(120, 120), plan=plan)
    app.camera.set_c2w(nadir(60.0, 0.0, -10.0))
    app.camera.fov_y = 60.0
    app.show_hud = False
    hv = HeadlessViewer(app, ctx=gl_ctx)
    plain = hv.settle()
    app.key_down("b")
    img = hv.draw()
    line = np.array(BLOCK_LINE_COLOR[:3]) * 255
    k = app.window_camera
    # midpoints of the west edge of block 0, the shared edge and the east edge of block 1
    pts = np.array([[-20.0, -10.0, 0.0], [0.0, -10.0, 0.0], [20.0, -10.0, 0.0], [0.0, -20.0, 0.0]])
    uv, _ = project(k, app.camera.c2w(), pts)
    for u, v in uv:
        i, j = int(u), int(v)
        patch = img[j - 1:j + 2, i - 1:i + 2].reshape(-1, 3).astype(float)
        assert np.min(np.abs(patch - line).max(axis=1)) <= 2, (u, v)
    changed = np.any(img != plain, axis=-1)
    assert 0 < changed.mean() < 0.15                  # thin lines, nothing else touched
    u, v = project(k, app.camera.c2w(), np.array([[10.0, -10.0, 0.0]]))[0][0]
    assert not changed[int(v) - 3:int(v) + 4, int(u) - 3:int(u) + 4].any()  # a block's interior
    hv.release()


def test_measure_known_distance_and_pick(gl_ctx):
    app = make_app(size=(160, 120))
    app.camera.set_c2w(nadir(50.0))
    app.camera.fov_y = 70.0
    hv = HeadlessViewer(app, ctx=gl_ctx)
    hv.settle()
    k, c2w = app.window_camera, app.camera.c2w()

    def expected_hit(px, py):
        o = c2w[:3, 3]
        d = c2w[:3, :3] @ np.array([(px + 0.5 - k.cx) / k.fl_x, (py + 0.5 - k.cy) / k.fl_y, 1.0])
        t, *_ = cast(o[None], d[None])
        return o + t[0] * d

    # a pixel on the tall box's roof (centre (-8, -6), top z = 10) and one on open ground
    (u_roof, v_roof), (u_gnd, v_gnd) = project(k, c2w, np.array([[-8.0, -6.0, 10.0], [20.0, 15.0, 0.0]]))[0]
    app.key_down("m")
    app.mouse_down(u_roof, v_roof), app.mouse_up(u_roof, v_roof)
    app.mouse_down(u_gnd, v_gnd), app.mouse_up(u_gnd, v_gnd)
    app.update()
    a = expected_hit(math.floor(u_roof), math.floor(v_roof))
    b = expected_hit(math.floor(u_gnd), math.floor(v_gnd))
    assert math.isclose(a[2], 10.0, abs_tol=1e-9) and math.isclose(b[2], 0.0, abs_tol=1e-9)
    assert app.measurement.distance == pytest.approx(np.linalg.norm(b - a), abs=2e-3)
    assert app.measurement.height_difference == pytest.approx(-10.0, abs=2e-3)
    assert "dz -10.00 m" in app.measurement.describe()
    p = app.pick_at(u_roof, v_roof)
    assert p.class_name == "building"
    np.testing.assert_allclose(p.crs, a + np.array(app.georef.origin), atol=2e-3)
    hv.release()


def test_measure_building_height_in_synthetic_city():
    """A building of the synthetic city: roof minus ground under a nadir view, against the
    generator's own heights (scene.json records the same numbers)."""
    from survey_io.synthetic.raycast import SceneGeometry
    from survey_io.synthetic.shading import render_view
    from survey_io.synthetic.survey import PRESETS, build_city

    city = build_city(PRESETS["tiny"], seed=0)
    parts = [(b, p) for b in city.buildings for p in b["parts"] if p["roof"] == "flat"]
    b, part = max(parts, key=lambda bp: bp[1]["top_z"] - bp[1]["base_z"])
    x0, y0, x1, y1 = part["footprint"]
    centre = city.to_enu(np.array([(x0 + x1) / 2, (y0 + y1) / 2, 0.0]))
    cam = intrinsics(120, 120, 40.0)
    c2w = nadir(part["top_z"] + 60.0, centre[0], centre[1])
    view = render_view(SceneGeometry(city), c2w, cam.K, cam.width, cam.height, antialias=False, shadows=False)
    frame = Frame(view.rgb / 255.0, view.depth, (view.depth > 0).astype(np.float32), view.semantics)
    roof = pick(frame, cam, c2w, 60.0, 60.0, city.georef, CLASSES)
    assert roof.class_name == "building"
    ground_px = np.argwhere(np.isin(view.semantics, (0, 1)))         # ground or road pixels
    j, i = ground_px[np.argmin(np.hypot(ground_px[:, 0] - 60, ground_px[:, 1] - 60))]
    ground = pick(frame, cam, c2w, i + 0.5, j + 0.5, city.georef, CLASSES)
    m = Measurement()
    m.add(ground.local), m.add(roof.local)
    # ground truth from the generator: the highest of the building's boxes (main volume and
    # roof units) over the roof point, and the bare surface under the ground point
    bx = city.boxes
    q = city.to_plan(roof.local)
    over = (bx.building == b["id"]) & np.all((bx.lo[:, :2] <= q[:2]) & (q[:2] <= bx.hi[:, :2]), axis=1)
    truth_roof = float(bx.hi[over, 2].max())
    g = city.to_plan(ground.local)
    truth_ground = float(city.surface_ground(np.array([g[0]]), np.array([g[1]]))[0])
    assert roof.local[2] == pytest.approx(truth_roof, abs=0.02)
    assert ground.local[2] == pytest.approx(truth_ground, abs=0.05)
    assert m.height_difference == pytest.approx(truth_roof - truth_ground, abs=0.05)
    assert m.height_difference > 40.0


# -- HUD ------------------------------------------------------------------------------------------
def test_hud_shows_crs_and_lonlat():
    import pyproj

    g = Georef("EPSG:32651", (350000.0, 3450000.0, 20.0))
    info = HudInfo(np.array([10.0, -5.0, 100.0]), 370.0, -45.0, g, fps=30.0, gsd_m=0.05, edit_state="style: none")
    text = "\n".join(hud_lines(info))
    assert "E 350010.00" in text and "N 3449995.00" in text and "H 120.0 m" in text
    lon, lat = pyproj.Transformer.from_crs("EPSG:32651", "EPSG:4326", always_xy=True).transform(350010.0, 3449995.0)
    assert f"lon {lon:.6f}" in text and f"lat {lat:.6f}" in text
    assert "heading  10.0" in text and "5.0 cm/px" in text and "edit: style: none" in text


# -- camera paths ---------------------------------------------------------------------------------
def _pose(yaw, pitch, pos):
    c = FlyCamera(position=np.asarray(pos, float), yaw=yaw, pitch=pitch)
    return c.c2w()


def test_camera_path_json_round_trip_and_interpolation(tmp_path):
    path = CameraPath(fps=10, seconds=2, width=64, height=48, interpolation="linear")
    path.add(_pose(0, -30, (0, 0, 50)), 50.0)
    path.add(_pose(90, -30, (100, 0, 50)), 70.0)
    mid = path.pose_at(1.0)
    np.testing.assert_allclose(mid.c2w[:3, 3], (50, 0, 50), atol=1e-9)
    assert mid.fov == pytest.approx(60.0)
    yaw, pitch, roll = angles_from_rotation(mid.c2w[:3, :3])
    assert (yaw, pitch, roll) == pytest.approx((45.0, -30.0, 0.0), abs=1e-9)   # slerp of a pure heading turn
    f = path.save(tmp_path / "camera_path.json")
    d = json.loads(f.read_text())
    assert d["camera_type"] == "perspective" and (d["render_width"], d["render_height"]) == (64, 48)
    assert len(d["camera_path"]) == 20 and d["camera_path"][0]["fov"] == 50.0
    assert d["camera_path"][0]["aspect"] == pytest.approx(64 / 48)
    gl = np.asarray(d["camera_path"][0]["camera_to_world"]).reshape(4, 4)      # row-major OpenGL
    cv = path.keyframes[0].c2w
    np.testing.assert_allclose(gl[:3, 0], cv[:3, 0]), np.testing.assert_allclose(gl[:3, 1], -cv[:3, 1])
    np.testing.assert_allclose(gl[:3, 2], -cv[:3, 2]), np.testing.assert_allclose(gl[:3, 3], cv[:3, 3])
    back = CameraPath.load(f)
    assert back.interpolation == "linear" and len(back.keyframes) == 2
    for a, b in zip(path.keyframes, back.keyframes):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)
        assert (a.fov, a.time) == (b.fov, b.time)
    frames = back.sample()
    np.testing.assert_allclose(frames[0].c2w, path.keyframes[0].c2w, atol=1e-12)
    np.testing.assert_allclose(frames[-1].c2w, path.keyframes[-1].c2w, atol=1e-12)
    # Catmull-Rom passes through every keyframe
    spline = CameraPath(seconds=3)
    for k, p in enumerate([(0, 0, 10), (10, 5, 12), (20, -5, 11), (30, 0, 10)]):
        spline.add(_pose(10 * k, -20, p), 50.0)
    for key in spline.keyframes:
        np.testing.assert_allclose(spline.pose_at(key.time).c2w, key.c2w, atol=1e-9)
    # a nerfstudio path (no citygen block) renders frame by frame as it stands
    del d["citygen"]
    (tmp_path / "ns.json").write_text(json.dumps(d))
    ns = CameraPath.load(tmp_path / "ns.json")
    assert ns.frames is not None and len(ns.sample()) == 20
    np.testing.assert_allclose(ns.sample()[7].c2w, frames[7].c2w, atol=1e-9)
    (tmp_path / "bad.json").write_text(json.dumps({"render_width": 4, "render_height": 4, "camera_path": [{"fov": 40}]}))
    with pytest.raises(CitygenError, match="bad.json"):
        CameraPath.load(tmp_path / "bad.json")


def test_render_camera_path_frames(tmp_path):
    path = CameraPath(fps=2, seconds=1.5, width=40, height=30)
    path.add(nadir(60.0, -5, 0), 50.0)
    path.add(nadir(50.0, 5, 0), 40.0)
    f = path.save(tmp_path / "p.json")
    renderer = FakeTileRenderer()
    summary = render_camera_path(renderer, f, tmp_path / "frames", resolution=(32, 24), progress=False)
    pngs = sorted((tmp_path / "frames").glob("frame_*.png"))
    assert summary["frames"] == 3 == len(pngs)
    from PIL import Image

    last = np.asarray(Image.open(pngs[-1]))
    ref = renderer.render_view(intrinsics(32, 24, 40.0), path.keyframes[-1].c2w)
    np.testing.assert_array_equal(last, colorize(ref))
    if summary["video"] is None:
        assert "PNG frames only" in summary["message"]
    else:
        assert Path(summary["video"]).stat().st_size > 0


# -- baked PLY preview ------------------------------------------------------------------------------
def _triangle_ply(tmp_path: Path, binary: bool) -> Path:
    verts = [(-10.0, -10.0, 0.0, 200, 30, 40, 2), (10.0, -10.0, 0.0, 200, 30, 40, 2), (0.0, 10.0, 0.0, 200, 30, 40, 2)]
    head = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment crs EPSG:32651",
            "comment origin 350000 3450000 20", "element vertex 3"]
    head += [f"property float {c}" for c in "xyz"] + [f"property uchar {c}" for c in ("red", "green", "blue", "class")]
    head += ["element face 1", "property list uchar int vertex_indices", "end_header"]
    p = tmp_path / f"tri_{'bin' if binary else 'ascii'}.ply"
    if binary:
        body = b"".join(np.array(v[:3], "<f4").tobytes() + bytes(v[3:]) for v in verts)
        body += bytes([3]) + np.array([0, 1, 2], "<i4").tobytes()
        p.write_bytes(("\n".join(head) + "\n").encode() + body)
    else:
        lines = [" ".join(str(x) for x in v) for v in verts] + ["3 0 1 2"]
        p.write_text("\n".join(head + lines) + "\n")
    return p


def test_ply_reader_ascii_binary_and_errors(tmp_path):
    a, b = read_ply(_triangle_ply(tmp_path, False)), read_ply(_triangle_ply(tmp_path, True))
    for m in (a, b):
        np.testing.assert_array_equal(m.positions, [[-10, -10, 0], [10, -10, 0], [0, 10, 0]])
        np.testing.assert_array_equal(m.colors, [[200, 30, 40]] * 3)
        np.testing.assert_array_equal(m.classes, [2, 2, 2])
        np.testing.assert_array_equal(m.faces, [[0, 1, 2]])
        assert m.georef() == Georef("EPSG:32651", (350000.0, 3450000.0, 20.0))
    # a point cloud as citygen's exporter writes it: double CRS coordinates, header georeference
    from citygen.export.ply import write_ply

    v = np.zeros(2, dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("red", "u1"), ("green", "u1"),
                           ("blue", "u1"), ("class", "u1")])
    v["x"], v["y"], v["z"], v["class"] = (350010.25, 349990.5), 3450000.125, (21.0, 25.0), (2, 255)
    cloud = read_ply(write_ply(tmp_path / "pts.ply", v, comments=("crs EPSG:32651", "coordinates x,y,z in the crs, metres")))
    tile = Georef("EPSG:32651", (350000.0, 3450000.0, 20.0))
    assert not cloud.is_mesh and cloud.in_crs
    np.testing.assert_array_equal(cloud.localized(tile).positions, [[10.25, 0.125, 1.0], [-9.5, 0.125, 5.0]])
    np.testing.assert_array_equal(cloud.classes, [2, 255])
    bad = tmp_path / "bad.ply"
    bad.write_bytes(_triangle_ply(tmp_path, True).read_bytes()[:-5])
    with pytest.raises(CitygenError, match="bad.ply.*truncated"):
        read_ply(bad)
    (tmp_path / "no.ply").write_text("hello\n")
    with pytest.raises(CitygenError, match="not a PLY"):
        read_ply(tmp_path / "no.ply")


def test_baked_triangle_renders_at_expected_pixels(gl_ctx, tmp_path):
    model = read_ply(_triangle_ply(tmp_path, True))
    app = ViewerApp(baked=model, size=(100, 80), georef=model.georef())
    app.camera.set_c2w(nadir(40.0))
    app.show_hud = False
    hv = HeadlessViewer(app, ctx=gl_ctx)
    img = hv.frame()
    k, c2w = app.window_camera, app.camera.c2w()
    # rasterise the projected triangle ourselves: pixel centres inside the three edges
    uv, _ = project(k, c2w, model.positions)
    jj, ii = np.mgrid[0:80, 0:100] + 0.5
    def edge(a, b):
        return (b[0] - a[0]) * (jj - a[1]) - (b[1] - a[1]) * (ii - a[0])
    e = [edge(uv[0], uv[1]), edge(uv[1], uv[2]), edge(uv[2], uv[0])]
    inside = (np.sign(e[0]) == np.sign(e[1])) & (np.sign(e[1]) == np.sign(e[2]))
    margin = np.min(np.abs(np.stack(e)) / np.array([np.hypot(*(uv[1] - uv[0])), np.hypot(*(uv[2] - uv[1])),
                                                     np.hypot(*(uv[0] - uv[2]))])[:, None, None], axis=0)
    sure = margin > 0.75                               # away from the edges' rasterisation rule
    is_red = np.all(img == (200, 30, 40), axis=-1)
    assert is_red[inside & sure].all() and not is_red[~inside & sure].any()
    assert inside.sum() > 500
    p = app.pick_at(50.0, 40.0)                        # baked depth buffer -> the point under the cursor
    np.testing.assert_allclose(p.local, unproject(k, c2w, 50.5, 40.5, 40.0), atol=0.02)  # the pixel centre
    app.key_down("3")
    img = hv.frame()
    assert np.all(img[np.where(inside & sure)] == (220, 80, 60))  # class 2 = building colour
    hv.release()
    # a tile with a baked model: fly over the model, render the tile once the camera rests
    both = ViewerApp(TileSource(FakeTileRenderer()), baked=model, size=(100, 80))
    both.camera.set_c2w(nadir(40.0))
    both.show_hud = False
    hv = HeadlessViewer(both, ctx=gl_ctx)
    both.key_down("w")
    moving = hv.frame()
    assert both.source.renderer.calls == {"rays": 0, "view": 0}
    assert np.all(moving == (200, 30, 40), axis=-1).sum() > 500          # the baked triangle
    both.key_up("w")
    resting = hv.settle()
    ref = both.source.renderer.render_view(both.window_camera, both.camera.c2w())
    assert np.abs(resting.astype(int) - colorize(ref).astype(int)).max() <= 2
    hv.release()


# -- window under Xvfb ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xvfb_display():
    exe = shutil.which("Xvfb")
    if exe is None:
        pytest.skip("Xvfb not found (Debian package xvfb); the window test needs an X server")
    for n in range(90, 120):
        if not os.path.exists(f"/tmp/.X{n}-lock") and not os.path.exists(f"/tmp/.X11-unix/X{n}"):
            break
    proc = subprocess.Popen([exe, f":{n}", "-screen", "0", "320x240x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(f"/tmp/.X11-unix/X{n}"):
            break
        time.sleep(0.05)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{n}"
    yield f":{n}"
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old
    proc.terminate()
    proc.wait(timeout=10)


WINDOW_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_viewer import make_app, outside
from viewer.display import colorize
from viewer.window import ViewerWindow

app = make_app(size=(96, 64), out_dir=sys.argv[2])
win = ViewerWindow(app, visible=True)
try:
    size = list(app.size)
    win.run(max_frames=3)
    app.key_down("w")
    win.step()                                   # a moving frame renders coarsely
    moving_scale = app.frame_scale
    app.key_up("w")
    app.settle()
    win.step()
    img = win.read_rgb()
    ref = colorize(app.source.renderer.render_view(app.window_camera, app.camera.c2w()))
    mask = outside(app.overlays, img.shape)
    diff = int(np.abs(img.astype(int) - ref.astype(int))[mask].max())
    shot = app.screenshot()
    print(json.dumps({"size": size, "moving_scale": moving_scale, "diff": diff, "masked": float(mask.mean()),
                      "shot": str(shot), "renderer": win.ctx.info["GL_RENDERER"]}))
finally:
    win.close()
"""


def test_window_under_xvfb(xvfb_display, tmp_path):
    """A real glfw window (GLX under Xvfb) renders, moves and takes a screenshot.  It runs in a
    child process: GLX and the EGL contexts of the other tests do not share a process."""
    pytest.importorskip("glfw", reason="pip install glfw for the window")
    import sys

    res = subprocess.run([sys.executable, "-c", WINDOW_SCRIPT, str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "DISPLAY": xvfb_display})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["size"] == [96, 64] and out["moving_scale"] > 1
    assert out["masked"] > 0.1 and out["diff"] <= 2
    shot = Path(out["shot"])
    assert shot.parent == tmp_path and shot.stat().st_size > 0


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_view_headless_ply_and_bad_input(tmp_path, capsys, gl_ctx):
    from citygen.cli import entrypoint

    ply = _triangle_ply(tmp_path, True)
    out = tmp_path / "shot.png"
    assert entrypoint(["view", str(ply), "--screenshot", str(out), "--width", "64", "--height", "48", "--no-hud"]) == 0
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape == (48, 64, 3) and np.all(img == (200, 30, 40), axis=-1).sum() > 50
    assert entrypoint(["view", str(tmp_path / "missing")]) == 2
    assert "missing: no such tile folder" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("x")
    assert entrypoint(["view", str(tmp_path / "x.txt")]) == 2


# -- live edit and style toggles -------------------------------------------------------------------
def _analytic_tile(tmp_path: Path):
    """A one-block TileRenderer over the closed-form city of citygen.edit.analytic, and a tile
    folder whose stack removes vehicles and stores a 'night' style on buildings."""
    from citygen.config import RenderConfig
    from citygen.edit import EditStack
    from citygen.edit.analytic import AnalyticCityField
    from citygen.partition.plan import Block, Grid, TilePlan
    from citygen.render.tile import BlockSource, TileRenderer
    from citygen.style import named_style

    field = AnalyticCityField(with_occupancy=True, occupancy_resolution=32)
    rect = (-20.0, -20.0, 20.0, 20.0)
    plan = TilePlan(georef=Georef("EPSG:32651", (350000.0, 3450000.0, 0.0)),
                    grid=Grid(origin=rect[:2], block_size=(40.0, 40.0), rows=1, cols=1), margin_m=0.0,
                    blocks=[Block(id="b", row=0, col=0, core=rect, extended=rect, z_range=(-2.0, 14.0))])
    loads = []
    source = BlockSource("b", rect, rect, field.aabb.numpy().astype(np.float64), lambda: loads.append(1) or field)
    renderer = TileRenderer(plan, [source], classes=CLASSES, render_config=RenderConfig(step_size=0.25))
    stack = EditStack(tile_dir=tmp_path, ground={"kind": "plane", "height": 0.0})
    stack.add("remove", {"class": "vehicle"})
    stack.add("restyle", {"class": "building"}, {"method": "named", "name": "night",
                                                 "transforms": named_style("night", ["building"])})
    stack.save()
    return renderer, loads


def test_edit_and_style_toggles_rerender_live(gl_ctx, tmp_path):
    """t toggles the stack's edits, c cycles none / named styles / the tile's stored style; each
    press re-renders, and the pixels match the closed-form scene under the transforms."""
    from citygen.edit.analytic import BUILDING, DEFAULT_BOXES, GROUND_RGB, VEHICLE
    from citygen.style import NAMED_STYLES
    from viewer.edits import live_edits_for_tile

    renderer, loads = _analytic_tile(tmp_path)
    live = live_edits_for_tile(renderer, tmp_path, raster_cell=0.5)
    app = ViewerApp(TileSource(renderer), size=(64, 64), live_edits=live, scheduler=RenderScheduler(frame_budget=10.0))
    app.camera.set_c2w(nadir(45.0))
    app.camera.fov_y = 50.0
    cam, c2w = app.window_camera, app.camera.c2w()
    roof, car = DEFAULT_BOXES[0], DEFAULT_BOXES[3]
    (roof_px, car_px, ground_px), _ = project(cam, c2w, np.array([[-8.0, -6.0, 10.0], [-0.5, 5.8, 1.5],
                                                                  [-16.0, 16.0, 0.0]]))
    at = lambda uv: (int(uv[1]), int(uv[0]))  # (row, col) of a continuous pixel position

    def affine(style, key, rgb):
        t = NAMED_STYLES[style][key]
        return np.clip(np.asarray(t["matrix"]) @ np.asarray(rgb) + np.asarray(t["offset"]), 0.0, 1.0)

    hv = HeadlessViewer(app, ctx=gl_ctx)

    def shown():
        img = hv.settle()
        f = app.frame
        assert app.scheduler.done and f.rgb.shape == (64, 64, 3)
        return img, f, "\n".join(hud_lines(app.hud_info()))

    # opened as stored: vehicles removed, the tile's night style on buildings
    img, f, hud = shown()
    assert live.style.name == "tile:e2_restyle" and "edits on (1)" in hud and "style tile:e2_restyle" in hud
    assert f.class_ids[at(roof_px)] == BUILDING and f.class_ids[at(car_px)] != VEHICLE
    np.testing.assert_allclose(f.rgb[at(roof_px)], affine("night", "building", roof.rgb), atol=0.01)
    np.testing.assert_allclose(f.rgb[at(ground_px)], GROUND_RGB, atol=0.01)   # the style is on buildings only
    assert np.abs(img.astype(int) - colorize(f).astype(int))[outside(app.overlays, img.shape)].max() <= 2

    assert app.update() is False  # settled: nothing left to render
    app.key_down("t")  # edits off: the vehicle is back, the style stays
    assert app.update() is True and app.message == "edits off"  # a new pass starts at once
    _, f, hud = shown()
    assert "edits off (1)" in hud and f.class_ids[at(car_px)] == VEHICLE
    np.testing.assert_allclose(f.rgb[at(car_px)], car.rgb, atol=0.01)
    np.testing.assert_allclose(f.rgb[at(roof_px)], affine("night", "building", roof.rgb), atol=0.01)

    app.key_down("c")  # the cycle wraps from the tile's style to none: the trained colours
    _, f, hud = shown()
    assert "style none" in hud
    np.testing.assert_allclose(f.rgb[at(roof_px)], roof.rgb, atol=0.01)

    app.key_down("c")  # the first named style, on every class
    _, f, hud = shown()
    first = next(iter(NAMED_STYLES))
    assert f"style {first}" in hud
    np.testing.assert_allclose(f.rgb[at(roof_px)], affine(first, "*", roof.rgb), atol=0.01)
    np.testing.assert_allclose(f.rgb[at(ground_px)], affine(first, "*", GROUND_RGB), atol=0.01)

    app.key_down("t")  # edits on again, with the named style
    _, f, hud = shown()
    assert "edits on (1)" in hud and f.class_ids[at(car_px)] != VEHICLE
    app.key_down("shift")
    app.key_down("c")  # shift+c: back to none
    app.key_up("shift")
    _, f, hud = shown()
    assert "style none" in hud and f.class_ids[at(car_px)] != VEHICLE
    np.testing.assert_allclose(f.rgb[at(roof_px)], roof.rgb, atol=0.01)
    assert len(loads) == 1  # switching re-wraps the loaded block: nothing is reloaded from disk
    hv.release()


def test_toggles_without_a_tile_say_so():
    app = make_app()
    assert app.toggle_edits() is None and "no edit stack" in app.message
    assert app.next_style() is None and "no styles" in app.message


# -- the envelope layer (issue 16) ------------------------------------------------------------------
QUADS = {"west": ((-10.0, -5.0, 0.0), (0.0, 5.0), (200, 30, 40)),
         "east": ((0.0, -5.0, 0.0), (10.0, 5.0), (30, 160, 90))}


def quad_envelopes():
    """Two blocks' display shells, each a flat coloured rectangle at z = 0 facing up (counter-
    clockwise seen from above, as the envelope orients its shells: the drawer culls back faces)."""
    from citygen.render.envelope import Shell

    out = {}
    for name, ((x0, y0, z), (x1, y1), rgb) in QUADS.items():
        v = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], np.float32)
        f = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
        out[name] = Shell(v, f, np.tile(np.array(rgb, np.uint8), (4, 1)))
    return out


def test_envelope_layer_draws_blocks_at_projected_pixels(gl_ctx):
    from viewer.launch import envelope_model

    app = ViewerApp(baked=envelope_model(quad_envelopes()), size=(100, 80), baked_label="envelope", cull_baked=True)
    app.camera.set_c2w(nadir(40.0))
    app.show_hud = False
    hv = HeadlessViewer(app, ctx=gl_ctx)
    img = hv.frame()
    hv.release()
    k, c2w = app.window_camera, app.camera.c2w()
    jj, ii = np.mgrid[0:80, 0:100] + 0.5
    covered = np.zeros((80, 100), bool)
    for (x0, y0, z), (x1, y1), rgb in QUADS.values():
        # a nadir view maps the rectangle to an axis-aligned pixel rectangle (pinhole projection)
        uv, _ = project(k, c2w, np.array([[x0, y0, z], [x1, y1, z]]))
        u0, u1 = sorted(uv[:, 0])
        v0, v1 = sorted(uv[:, 1])
        inner = (ii > u0 + 0.75) & (ii < u1 - 0.75) & (jj > v0 + 0.75) & (jj < v1 - 0.75)
        assert inner.sum() > 300 and np.all(img[inner] == rgb)
        covered |= (ii > u0 - 0.75) & (ii < u1 + 0.75) & (jj > v0 - 0.75) & (jj < v1 + 0.75)
    assert np.all(img[~covered] == 0)                     # the clear colour around the blocks
    assert app.layer() == "envelope"


def test_hud_layer_switches_from_envelope_to_neural_at_rest(gl_ctx):
    from viewer.launch import envelope_model

    now = [0.0]
    app = ViewerApp(TileSource(FakeTileRenderer()), baked=envelope_model(quad_envelopes()), size=(64, 48),
                    clock=lambda: now[0], baked_label="envelope", min_neural_scale=4, cull_baked=True)
    app.camera.set_c2w(nadir(40.0))
    hv = HeadlessViewer(app, ctx=gl_ctx)
    renderer = app.source.renderer
    app.key_down("w")
    now[0] += 0.05
    hv.frame()
    assert app.layer() == "envelope" and "layer envelope" in hud_lines(app.hud_info())[0]
    assert renderer.calls == {"rays": 0, "view": 0}      # flying: no neural rendering at all
    assert abs(app.pick_at(32.0, 24.0).local[2]) < 0.05  # picking reads the envelope's depth while flying
    app.key_up("w")
    now[0] += 0.05
    app.show_hud = False
    img = hv.frame()                                     # at rest: the first (coarsest) neural pass
    assert renderer.calls["rays"] + renderer.calls["view"] == 1
    # 64x48 at 1/32 is 2x2 of the 4096 rays of the passes 1/32 .. 1/1: 0 %
    assert app.layer() == "neural (refining 0%)"
    assert "layer neural (refining 0%)" in hud_lines(app.hud_info())[0]
    assert np.all(img == QUADS["west"][2], axis=-1).sum() > 50   # the envelope stays until 1/4
    resting = hv.settle()
    assert app.layer() == "neural"
    ref = renderer.render_view(app.window_camera, app.camera.c2w())
    assert np.abs(resting.astype(int) - colorize(ref).astype(int)).max() <= 2
    hv.release()


def flat_levels(x0, y0, x1, y1, z, n_levels, rgb=(90, 90, 90)):
    """A flat upward-facing rectangle as ``n_levels`` display levels: level k has 2 * 4^(L-1-k)
    triangles (a grid), errors 0, 0.1, 1.0, ... (as if measured against the finest)."""
    from citygen.export.envelope import ViewLevel
    from citygen.render.envelope import Shell

    out = []
    for k in range(n_levels):
        n = 2 ** (n_levels - 1 - k)
        xs, ys = np.linspace(x0, x1, n + 1), np.linspace(y0, y1, n + 1)
        v = np.array([[x, y, z] for y in ys for x in xs], np.float32)
        f = [[j * (n + 1) + i, j * (n + 1) + i + 1, (j + 1) * (n + 1) + i + 1] for j in range(n) for i in range(n)]
        f += [[j * (n + 1) + i, (j + 1) * (n + 1) + i + 1, (j + 1) * (n + 1) + i] for j in range(n) for i in range(n)]
        out.append(ViewLevel(Shell(v, np.array(f, np.int32), np.tile(np.uint8(rgb), (len(v), 1))),
                             0.0 if k == 0 else 0.1 * 10 ** (k - 1)))
    return out


def test_frustum_culls_exactly_the_boxes_outside_closed_form():
    from viewer.gl import projection_matrix, view_matrix
    from viewer.lod import boxes_outside, frustum_planes

    # 90 degrees both ways, identity pose (OpenCV: looking along +z): the frustum is
    # |x| <= z, |y| <= z, 1 <= z <= 100 in world coordinates
    cam = Camera(100, 100, 50.0, 50.0, 50.0, 50.0)
    clip = projection_matrix(cam, 1.0, 100.0) @ view_matrix(np.eye(4))
    rng = np.random.default_rng(7)
    centre = rng.uniform([-90, -90, -20], [90, 90, 120], (4000, 3))
    half = rng.uniform(0.5, 10.0, (4000, 3))
    boxes = np.stack([centre - half, centre + half], axis=1)
    corners = np.stack([boxes[:, [i, j, k], [0, 1, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)], axis=1)
    x, y, z = corners[..., 0], corners[..., 1], corners[..., 2]
    halfspaces = [z - x, z + x, z - y, z + y, z - 1.0, 100.0 - z]            # >= 0 inside
    expected = np.any([np.all(h < 0, axis=1) for h in halfspaces], axis=0)   # all corners out by one plane
    got = boxes_outside(boxes, frustum_planes(clip))
    assert 500 < expected.sum() < 3500 and np.array_equal(got, expected)


def test_select_drops_blocks_outside_and_picks_levels_by_pixel_error():
    from viewer.gl import projection_matrix, view_matrix
    from viewer.lod import build_lod_mesh, select

    # nadir camera at height h over the origin, 100x100 at f = 50 px: the ground footprint is
    # |x|, |y| <= h; blocks of 4 x 4 m at z = 0
    blocks = {"centre": flat_levels(-2, -2, 2, 2, 0.0, 3), "east_in": flat_levels(10, -2, 14, 2, 0.0, 3),
              "east_out": flat_levels(60, -2, 64, 2, 0.0, 3), "north_out": flat_levels(-2, 70, 2, 74, 0.0, 3),
              "above": flat_levels(-2, -2, 2, 2, 80.0, 3)}                  # behind the camera at h = 40
    mesh = build_lod_mesh(blocks, chunks_per_side=1)
    cam = Camera(100, 100, 50.0, 50.0, 50.0, 50.0)

    def run(h, pixel_error=1.5, max_triangles=None):
        c2w = nadir(h)
        clip = projection_matrix(cam, 0.1, 1000.0) @ view_matrix(c2w)
        return select(mesh, clip, c2w[:3, 3], 50.0, pixel_error, max_triangles)

    d = run(40.0)
    assert d.blocks_drawn == ("centre", "east_in") and d.chunks_culled == 3
    # level errors 0 / 0.1 / 1.0 m span e * 50 / 40 px: 1.0 m is 1.25 px <= 1.5: the coarsest
    assert d.level_chunks == [0, 0, 2] and d.triangles == 2 * 2
    # at 10 m: 1.0 m = 5 px, 0.1 m = 0.5 px -> level 1 (8 triangles each); "above" is no longer behind
    d = run(10.0)
    assert d.blocks_drawn == ("centre", "east_in") and d.level_chunks == [0, 2, 0] and d.triangles == 16
    # at 2 m only the centre block is in view (east_in starts at x = 10 > 2), 0.1 m = 2.5 px: the finest
    d = run(2.0)
    assert d.blocks_drawn == ("centre",) and d.level_chunks == [1, 0, 0] and d.triangles == 32
    # a budget of 12 triangles coarsens the farthest chunk first: at 10 m both blocks are at level 1
    # (16 triangles); east_in (farther) drops to level 2 -> 8 + 2 = 10
    d = run(10.0, max_triangles=12)
    assert d.level_chunks == [0, 1, 1] and d.triangles == 10


def test_envelope_layer_draws_only_selected_ranges(gl_ctx):
    from viewer.launch import envelope_model

    # the finest level red, the coarser ones green: close up the finest is drawn, far away not
    blocks = {"b": [lv if k else type(lv)(type(lv.shell)(lv.shell.vertices, lv.shell.triangles,
                                                           np.tile(np.uint8([250, 0, 0]), (len(lv.shell.vertices), 1))),
                                          lv.error_m)
                    for k, lv in enumerate(flat_levels(-5, -5, 5, 5, 0.0, 2, rgb=(0, 250, 0)))]}
    app = ViewerApp(baked=envelope_model(blocks), size=(64, 64), baked_label="envelope", cull_baked=True)
    app.show_hud = False
    hv = HeadlessViewer(app, ctx=gl_ctx)
    f = app.window_camera.fl_y
    app.camera.set_c2w(nadir(0.1 * f / 3.0))       # 0.1 m error = 3 px: the finest level
    img = hv.frame()
    assert np.all(img[32, 32] == (250, 0, 0)) and app.drawer.last_draw.level_chunks[0] > 0
    app.camera.set_c2w(nadir(0.1 * f / 0.5))       # 0.5 px: the coarse level
    img = hv.frame()
    assert np.all(img[32, 32] == (0, 250, 0)) and app.drawer.last_draw.level_chunks[0] == 0
    hv.release()


def test_cli_bench_view_one_json_on_a_tiny_tile(gl_ctx, tmp_path, capsys):
    """``citygen bench view`` end to end on a one-block tile: an untrained field (the layer needs
    only its box and checkpoint) whose envelope is a sphere of 14k triangles written beside it."""
    o3d = pytest.importorskip("open3d")
    from citygen.cli import entrypoint
    from citygen.config import TrainConfig, to_dict
    from citygen.render.envelope import Envelope, Shell, save_envelope
    from citygen.store.checkpoint import save_checkpoint
    from citygen.store.field import build_field
    from citygen.store.layout import envelope_file, envelope_view_file

    cfg = TrainConfig()
    cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.base_resolution = 2, 10, 4
    cfg.field.max_resolution, cfg.field.hidden_dim, cfg.field.appearance_dim = 16, 16, 4
    cfg.field.semantic_hidden_dim, cfg.field.backend = 16, "torch"
    cfg.render.grid_resolution = 16
    aabb = np.array([[-20.0, -20.0, -2.0], [20.0, 20.0, 10.0]])
    field = build_field(cfg, aabb, 2, len(CLASSES), torch.zeros(2, 3), torch.device("cpu"))
    run = tmp_path / "tile"
    meta = {"config": to_dict(cfg), "aabb": aabb.tolist(), "classes": list(CLASSES),
            "georef": Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)).to_dict(), "image_names": ["a", "b"],
            "optimizer": {"type": "Adam", "groups": []}}
    save_checkpoint(run / "checkpoints", 1, {f"model.{k}": v for k, v in field.state_dict().items()}, meta)
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=6.0, resolution=60)       # 14160 triangles
    v = np.asarray(sphere.vertices, np.float32) + np.float32([0, 0, 3])
    inner = Shell(v, np.asarray(sphere.triangles, np.int32), np.tile(np.uint8([200, 80, 40]), (len(v), 1)))
    empty = Shell(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.uint8))
    save_envelope(envelope_file(run), Envelope(empty, inner, 1.0, 2.0, 3.0, 0.5))   # newer than the checkpoint
    capsys.readouterr()
    assert entrypoint(["bench", "view", "--tile", str(run), "--res", "96x64", "--view-frames", "4",
                       "--out", str(tmp_path / "view.json")]) == 0
    r = json.loads(capsys.readouterr().out)                                           # one JSON on stdout
    assert r == json.loads((tmp_path / "view.json").read_text())
    assert r["frames"] == 4 and r["size"] == [96, 64] and r["layer"] == "envelope" and r["lod"] is True
    assert 0 < r["frame_ms_median"] <= r["frame_ms_p95"] <= r["frame_ms_max"] and r["cpu_ms_per_frame"] > 0
    assert r["triangles"] == 14160 and r["lod_level_triangles"][0] == 14160            # under 25k: kept whole
    assert 0 < r["lod_level_triangles"][1] <= 6000 and r["lod_level_error_m"][0] == 0.0
    assert 0 <= r["lod_level_error_m"][1] < 0.1 * 6.0
    assert 0 < r["triangles_drawn_median"] <= r["triangles_drawn_max"] <= 14160
    assert r["chunks"] <= 16 and 0 < sum(r["lod_levels_used"]) <= 4 * r["chunks"]
    assert len(r["load_average_before"]) == 3 and r["cpu_count"] >= 1 and r["date_utc"].endswith("Z")
    assert set(r["split_ms_median"]) == {"submit", "gl_finish", "lod_select", "hud", "readback"}
    assert envelope_view_file(run).is_file()                                          # the levels, baked


def test_hud_text_refreshed_at_most_every_tenth_second_while_flying(gl_ctx, monkeypatch):
    import viewer.app as viewer_app
    from viewer.launch import envelope_model

    now = [0.0]
    app = ViewerApp(baked=envelope_model(quad_envelopes()), size=(64, 48), clock=lambda: now[0],
                    baked_label="envelope", cull_baked=True)
    app.camera.set_c2w(nadir(40.0))
    hv = HeadlessViewer(app, ctx=gl_ctx)
    made = []
    real = viewer_app.hud_overlays
    monkeypatch.setattr(viewer_app, "hud_overlays", lambda *a, **k: made.append(now[0]) or real(*a, **k))
    app.external_motion = True
    for _ in range(10):                      # 10 frames 30 ms apart: refreshed at 0, 0.12, 0.24
        first = hv.frame()
        now[0] += 0.03
    assert made == pytest.approx([0.0, 0.12, 0.24])
    # between refreshes the same panels are drawn again (from the uploaded textures)
    assert np.array_equal(first, hv.draw()) and len(made) == 3
    app.external_motion = False              # at rest: every frame
    hv.frame()
    hv.frame()
    assert len(made) == 5
    hv.release()


def test_scheduler_progress_closed_form():
    s = RenderScheduler(scales=(1, 2, 4), max_interactive_scale=4)
    assert s.progress == 0.0
    job = s.next_job(0.0, "a", 64, 48)                   # 16x12 in one job (no throughput yet)
    assert job.scale == 4 and s.progress == pytest.approx(192 / (192 + 768 + 3072))
    s.report(job, 192 / 960.0)                           # 960 rays/s: 64 rays (2 rows of 32) per 1/15 s
    s.refine_now()
    job = s.next_job(1.0, "a", 64, 48)
    assert (job.scale, job.row0, job.row1) == (2, 0, 2)
    assert s.progress == pytest.approx((192 + 2 * 32) / 4032)


def test_bench_view_flies_envelope_then_refines(gl_ctx, tmp_path):
    from viewer.launch import bench_view, envelope_model

    app = ViewerApp(TileSource(FakeTileRenderer()), baked=envelope_model(quad_envelopes()), size=(64, 48),
                    baked_label="envelope", min_neural_scale=4, cull_baked=True)
    renderer = app.source.renderer
    result = bench_view(app, frames=4, screenshot=tmp_path / "fly.png", rest_jobs=50)
    assert result["frames"] == 4 and result["layer"] == "envelope" and result["triangles"] == 4
    assert 0 < result["frame_ms_median"] <= result["frame_ms_p95"] <= result["frame_ms_max"]
    assert result["fps_median"] == pytest.approx(1e3 / result["frame_ms_median"])
    split = result["split_ms_median"]
    assert set(split) == {"submit", "gl_finish", "lod_select", "hud", "readback"} and min(split.values()) >= 0
    assert split["lod_select"] + split["hud"] <= split["submit"] + 1e-6   # both inside the draw call
    # two blocks of 2 triangles, one level, chunks of 1 triangle each (4 chunks of the 4x4 grid per block)
    assert result["chunks"] == 4 and result["lod_level_triangles"] == [4] and result["lod_level_error_m"] == [0.0]
    assert 0 <= result["triangles_drawn_median"] <= result["triangles_drawn_max"] <= 4
    assert sum(result["lod_levels_used"]) + 4 * result["chunks_culled_median"] >= 0
    assert len(result["load_average_before"]) == len(result["load_average_after"]) == 3 and result["cpu_count"] >= 1
    assert result["lod"] is True and json.loads(json.dumps(result)) == result      # one JSON
    rest = result["rest"]
    # flying rendered nothing neural; at rest the passes 1/32 .. 1/1 of 64x48 finish within 50 jobs
    assert rest["layer"] == "neural" and rest["scale"] == 1 and rest["neural_shown_after_s"] is not None
    assert renderer.calls["rays"] + renderer.calls["view"] == rest["jobs"]
    assert (tmp_path / "fly.png").is_file() and (tmp_path / "fly_rest.png").is_file()
