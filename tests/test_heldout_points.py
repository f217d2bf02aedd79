"""Rendered depth against held-out SfM points as every command reports it (issue 15): a composited
tile's views (`citygen render`, `citygen train-tile`'s evaluation, the demo) scored on a posed
survey whose scene is known in closed form, against figures computed by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from citygen.metrics import NO_HELDOUT_POINTS, NO_POINT_IN_VIEWS
from citygen.render.tile_views import render_tile_views
from survey_io import Camera, Georef, Survey, SurveyImage

H_CAM = 40.0   # camera height over the ground (z = 0), metres
F = 100.0      # focal length, pixels at full resolution
W, HGT = 64, 48


def _nadir(x: float) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])  # looking straight down; image x = world x, image y = -world y
    c2w[:3, 3] = (x, 0.0, H_CAM)
    return c2w


def _survey(root, with_points: bool, points_in_view: bool = True):
    """Two nadir cameras 40 m over flat ground; the second is held out.  Held-out points lie on the
    ground at the centres of chosen pixels of the held-out view, plus one on a 10 m high roof."""
    cam = Camera(W, HGT, F, F, W / 2, HGT / 2, "PINHOLE")
    images = [SurveyImage("a.jpg", 0, _nadir(-5.0)), SurveyImage("b.jpg", 0, _nadir(5.0))]
    survey = Survey(root, [cam], images, Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)), test_names=["b.jpg"])
    pix = np.array([[4, 4], [10, 31], [33, 20], [60, 45], [21, 7]], float)  # (col, row) at full resolution
    # pixel centre (col + 0.5, row + 0.5) -> the ground point it sees: x = X + (u - cx) H / f, y = -(v - cy) H / f
    uv = pix + 0.5
    ground = np.stack([5.0 + (uv[:, 0] - W / 2) * H_CAM / F, -(uv[:, 1] - HGT / 2) * H_CAM / F, np.zeros(len(uv))], -1)
    roof_uv = np.array([[40.5, 12.5]])
    roof = np.array([[5.0 + (40.5 - W / 2) * 30.0 / F, -(12.5 - HGT / 2) * 30.0 / F, 10.0]])  # 30 m below the camera
    xyz = np.concatenate([ground, roof])
    obs_xy = np.concatenate([uv, roof_uv])
    if with_points:
        np.savez(root / "points3D_heldout.npz", xyz=xyz, image_names=np.array(["b.jpg" if points_in_view else "a.jpg"]),
                 obs_point=np.arange(len(xyz)), obs_image=np.zeros(len(xyz), np.int64), obs_xy=obs_xy)
    return survey, pix


class _FlatGroundRenderer:
    """A tile renderer stand-in whose field is flat ground at z = 0 seen from ``H_CAM``, its depth
    off by ``offset`` metres plus ``slope`` metres per rendered column."""

    device = "cpu"
    classes = ("ground",)
    block_ids = ["0_0"]
    missing_blocks: list = []
    plan = SimpleNamespace(grid=SimpleNamespace(rows=1, cols=1), margin_m=0.0)

    def __init__(self, offset: float = 0.0, slope: float = 0.0):
        self.offset, self.slope = offset, slope

    def render_view(self, cam, c2w):
        h, w = cam.height, cam.width
        depth = torch.full((h, w), c2w[2, 3] + self.offset, dtype=torch.float64)
        depth = depth + self.slope * torch.arange(w, dtype=torch.float64)[None, :]
        return {"rgb": torch.zeros(h, w, 3), "semantics": torch.zeros(h, w, 1), "depth": depth.float(),
                "acc": torch.ones(h, w), "weights": torch.ones(h, w, 1)}


@pytest.mark.parametrize("downscale", [1, 2])
def test_tile_views_score_depth_against_heldout_points(tmp_path, downscale):
    survey, pix = _survey(tmp_path, with_points=True)
    gsd_ground, gsd_roof = H_CAM / (F / downscale), 30.0 / (F / downscale)  # z / fl_x of the rendered camera

    # a perfect ground: 0 on the ground points, +10 m on the roof point (the field has no roof)
    rep = render_tile_views(_FlatGroundRenderer(), survey, ["test"], tmp_path / "v0", downscale=downscale)
    hp = rep["heldout_points"]
    assert hp["num_observations"] == 6
    assert hp["median_abs_m"] == pytest.approx(0.0, abs=1e-5)
    assert hp["rmse_m"] == pytest.approx(np.sqrt(10.0**2 / 6), rel=1e-5)
    assert hp["share_within_2gsd"] == pytest.approx(5 / 6)

    # a constant offset of 0.3 m: the ground points are off by exactly that
    rep = render_tile_views(_FlatGroundRenderer(offset=0.3), survey, ["test"], tmp_path / "v1", downscale=downscale)
    hp = rep["heldout_points"]
    errs = np.array([0.3] * 5 + [10.3])
    assert hp["median_abs_m"] == pytest.approx(0.3, abs=1e-5)
    assert hp["rmse_m"] == pytest.approx(np.sqrt(np.mean(errs**2)), rel=1e-5)
    assert hp["share_within_2gsd"] == pytest.approx(np.mean(errs <= 2 * np.array([gsd_ground] * 5 + [gsd_roof])))

    # depth growing along the columns: each point reads the rendered pixel that holds it
    slope = 0.05
    rep = render_tile_views(_FlatGroundRenderer(slope=slope), survey, ["test"], tmp_path / "v2", downscale=downscale)
    cols = np.concatenate([pix[:, 0], [40]]) // downscale
    errs = slope * cols + np.array([0.0] * 5 + [10.0])
    hp = rep["heldout_points"]
    assert hp["median_abs_m"] == pytest.approx(np.median(np.abs(errs)), abs=1e-5)
    assert hp["rmse_m"] == pytest.approx(np.sqrt(np.mean(errs**2)), rel=1e-5)


def test_tile_views_say_why_there_are_no_point_figures(tmp_path):
    survey, _ = _survey(tmp_path, with_points=False)
    rep = render_tile_views(_FlatGroundRenderer(), survey, ["test"], tmp_path / "v")
    assert rep["heldout_points"] == NO_HELDOUT_POINTS == "no held-out points (survey has no SfM points)"
    # points observed only in a training view: none in the scored views
    (tmp_path / "b").mkdir()
    survey, _ = _survey(tmp_path / "b", with_points=True, points_in_view=False)
    rep = render_tile_views(_FlatGroundRenderer(), survey, ["test"], tmp_path / "b" / "v")
    assert rep["heldout_points"] == NO_POINT_IN_VIEWS


def test_demo_summary_and_table_carry_points_and_coverage(tmp_path, monkeypatch):
    """`citygen demo` puts the held-out point figures (or the sentence) beside its ground-truth
    figures, in summary.json and in the printed table, with the DSM's coverage."""
    import io
    import json

    from rich.console import Console

    from citygen import demo

    survey, _ = _survey(tmp_path, with_points=True)
    monkeypatch.setattr(demo.tile_training, "open_tile", lambda tile: _FlatGroundRenderer(offset=0.3))
    monkeypatch.setattr(demo, "load_survey", lambda data: survey)
    render = demo._render(tmp_path / "tile", tmp_path / "transforms.json", tmp_path / "renders")
    assert render["heldout_points"]["median_abs_m"] == pytest.approx(0.3, abs=1e-5)
    assert json.loads((tmp_path / "renders" / "metrics.json").read_text())["heldout_points"] == render["heldout_points"]
    summary = {"timings_s": dict.fromkeys(["synthetic survey", "ingest check (EXIF/XMP pose priors)", "partition",
                                           "train tile", "render held-out views", "export"], 1.0),
               "ingest": {"images": 2, "position_error_m_max": 0.0, "rotation_error_deg_max": 0.0},
               "plan": {"blocks": 1}, "train": {"0_0": {"step": 10}}, "render": render,
               "export": {"vs_ground_truth": {"dsm": {"rmse_m": 1.0}, "ortho": {"psnr_db": 20.0}},
                          "survey_check": {"coverage": {"share": 0.929}, "heldout_points": NO_HELDOUT_POINTS}}}
    out = io.StringIO()
    demo._print(Console(file=out, width=400), summary, tmp_path)
    text = out.getvalue()
    assert "depth vs held-out points: median |error| 0.3 m, RMSE" in text
    assert "DSM covers 92.9 % of the ground 2 cameras see" in text
    assert "DSM vs held-out points: no held-out points (survey has no SfM points)" in text
