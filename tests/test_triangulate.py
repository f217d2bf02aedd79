"""`citygen triangulate`: points for a posed survey without them, against the synthetic city's
ground-truth surface (its DSM), with a pinhole and a distorted (OPENCV) camera."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from survey_io import read_transforms
from survey_io.colmap import read_colmap, read_colmap_point_table
from survey_io.geotiff import read_geotiff
from survey_io.ingest import heldout_point_mask
from survey_io.nerfstudio import write_transforms
from survey_io.synthetic.survey import SyntheticConfig, make_survey

pycolmap = pytest.importorskip("pycolmap")

#: the first two strips (20 nadir images of 240x180) over a 120 m city at 60 m: seconds to render
#: and triangulate; about 40 % of the points lie over the ground-truth DSM (the strips fly its edge).
CONFIG = SyntheticConfig(area_m=120.0, altitude_m=60.0, width=240, height=180, front_overlap=0.8,
                         side_overlap=0.7, oblique_headings=(), max_building_height_m=20.0, antialias=False,
                         ortho_gsd_m=0.5, test_every=0, max_images=20, write_depth=False)
#: OPENCV distortion of the warped copy: ~7 px at the image corners, far beyond the tolerance.
DISTORTION = {"k1": -0.12, "k2": 0.03, "p1": 0.002, "p2": -0.001}


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tri") / "city"
    make_survey(out, CONFIG, seed=3, progress=False, workers=1)
    return out


def _height_errors(survey_dir: Path, xyz: np.ndarray) -> np.ndarray:
    """Each point's height minus the ground-truth surface's (the DSM) under it, for points over the
    DSM: of the 3x3 cells around the point, the one nearest in height -- a keypoint on a roof edge
    lies within a cell of both the roof and the street below."""
    survey = read_transforms(survey_dir / "transforms.json")
    dsm = read_geotiff(survey_dir / "dsm.tif")
    enh = survey.georef.local_to_crs(xyz)
    col, row = ~dsm.transform @ (enh[:, 0], enh[:, 1])
    col, row = np.floor(col).astype(int), np.floor(row).astype(int)
    h, w = dsm.array.shape
    inside = (col >= 1) & (row >= 1) & (col < w - 1) & (row < h - 1)
    col, row, z = col[inside], row[inside], enh[inside, 2]
    dz = np.stack([z - dsm.array[row + dr, col + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=1)
    return dz[np.arange(len(z)), np.argmin(np.abs(dz), axis=1)]


def _distort(survey_dir: Path, out: Path) -> None:
    """A copy of the survey seen through an OPENCV lens: each distorted pixel takes the pinhole
    image's colour where its ray goes (the undistorted position, by fixed-point iteration)."""
    survey = read_transforms(survey_dir / "transforms.json")
    cam = survey.cameras[0]
    u, v = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
    xd, yd = (u - cam.cx) / cam.fl_x, (v - cam.cy) / cam.fl_y
    x, y = xd.copy(), yd.copy()
    k1, k2, p1, p2 = (DISTORTION[k] for k in ("k1", "k2", "p1", "p2"))
    for _ in range(50):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        x = (xd - (2 * p1 * x * y + p2 * (r2 + 2 * x * x))) / radial
        y = (yd - (p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)) / radial
    # bilinear: nearest-pixel sampling alone would blur keypoints by half a pixel
    sx = np.clip(x * cam.fl_x + cam.cx - 0.5, 0, cam.width - 1.001)
    sy = np.clip(y * cam.fl_y + cam.cy - 0.5, 0, cam.height - 1.001)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    (out / "images").mkdir(parents=True)
    for im in survey.images:
        rgb = np.asarray(Image.open(survey.image_path(im)).convert("RGB"), dtype=np.float64)
        warped = ((rgb[y0, x0] * (1 - fx) + rgb[y0, x0 + 1] * fx) * (1 - fy)
                  + (rgb[y0 + 1, x0] * (1 - fx) + rgb[y0 + 1, x0 + 1] * fx) * fy)
        Image.fromarray(np.round(warped).astype(np.uint8)).save(out / im.name, quality=95)
    shutil.copy(survey_dir / "dsm.tif", out / "dsm.tif")
    distorted = replace(survey, root=out, cameras=[replace(cam, camera_model="OPENCV", **DISTORTION)],
                        images=[replace(im, semantics=None) for im in survey.images])
    write_transforms(distorted, out / "transforms.json")


def _triangulate(survey_dir: Path, out: Path | None = None) -> dict:
    from citygen.cli import entrypoint

    extra = ["--out", str(out)] if out is not None else []
    assert entrypoint(["triangulate", str(survey_dir), "--num-threads", "1", *extra]) == 0
    return json.loads(((out or survey_dir) / "triangulate_report.json").read_text())


@pytest.mark.parametrize("lens", ["pinhole", "opencv"])
def test_points_lie_on_the_true_surface(city, tmp_path, lens):
    if lens == "pinhole":
        survey_dir = tmp_path / "pinhole"
        shutil.copytree(city, survey_dir)
    else:
        survey_dir = tmp_path / "opencv"
        _distort(city, survey_dir)
    report = _triangulate(survey_dir)
    table = read_colmap_point_table(survey_dir / "sparse" / "0")
    assert report["num_points3D"] == len(table["id"]) >= 100
    dz = _height_errors(survey_dir, table["xyz"])
    assert len(dz) >= 40
    # measured (pinhole / opencv): 198 / 270 points, 79 / 115 over the DSM, median |dz| 0.20 / 0.21 m,
    # 80th percentile 0.79 / 1.25 m.  The distorted images read as pinhole (distortion ignored): median
    # |dz| 2.41 m, 80th percentile 3.95 m; flipped camera axes triangulate nothing.
    assert np.median(np.abs(dz)) < 0.6
    assert np.mean(np.abs(dz) < 1.0) > 0.55
    assert report["median_reprojection_error_px"] < 1.0


def test_output_round_trips_and_holds_out_a_tenth(city, tmp_path):
    out = tmp_path / "out"
    report = _triangulate(city, out)
    assert not (city / "sparse").exists(), "--out leaves the survey folder alone"
    survey = read_transforms(city / "transforms.json")
    # OUT is a survey of its own: same poses, model beside its transforms.json, in the same frame.
    copy = read_transforms(out / "transforms.json")
    model = read_colmap(out / "sparse" / "0", out)
    assert model.georef == survey.georef
    assert [im.name for im in model.images] == sorted(im.name for im in survey.images)
    by_name = {im.name: im for im in survey.images}
    for im in model.images:
        np.testing.assert_allclose(im.c2w, by_name[im.name].c2w, atol=1e-9)
    for a, b in zip(copy.images, survey.images):
        np.testing.assert_array_equal(a.c2w, b.c2w)
        assert (out / a.name).read_bytes() == (city / b.name).read_bytes()
    assert model.cameras[0] == survey.cameras[0]
    # the held-out tenth: exactly the hashed ids of the model, with their coordinates
    table = read_colmap_point_table(out / "sparse" / "0")
    held = np.load(out / "points3D_heldout.npz")
    expected = table["id"][heldout_point_mask(table["id"])]
    np.testing.assert_array_equal(held["point3D_id"], expected)
    assert 0 < len(expected) < 0.2 * len(table["id"])
    row = {int(i): k for k, i in enumerate(table["id"])}
    np.testing.assert_allclose(held["xyz"], table["xyz"][[row[int(i)] for i in expected]])
    assert report["held_out_points"]["num_points"] == len(expected)


def test_refuses_a_survey_with_points_unless_forced(city, tmp_path, capsys):
    from citygen.cli import entrypoint

    survey_dir = tmp_path / "s"
    shutil.copytree(city, survey_dir)
    (survey_dir / "sparse" / "0").mkdir(parents=True)
    assert entrypoint(["triangulate", str(survey_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("citygen: error: ") and "sparse/0" in err and "--force" in err and "\n" not in err
    assert not list((survey_dir / "sparse" / "0").iterdir())
    assert entrypoint(["triangulate", str(survey_dir), "--force", "--num-threads", "1"]) == 0
    assert read_colmap_point_table(survey_dir / "sparse" / "0")["id"].size >= 100
    assert not [p for p in survey_dir.iterdir() if p.name.startswith(".")], "no scratch left behind"
    assert entrypoint(["triangulate", str(tmp_path / "missing")]) == 2
    assert "missing: file not found" in capsys.readouterr().err


def test_blocks_exchange_survey_becomes_a_survey_with_points(city, tmp_path, capsys):
    from citygen.cli import entrypoint
    from survey_io import write_blocks_exchange

    xml = write_blocks_exchange(read_transforms(city / "transforms.json"), tmp_path / "at" / "block.xml")
    assert entrypoint(["triangulate", str(xml)]) == 2
    assert "needs --out" in capsys.readouterr().err
    out = tmp_path / "out"
    _triangulate(xml, out)
    shutil.copy(city / "dsm.tif", out / "dsm.tif")
    # the XML's frame may have another origin than the synthetic survey's: compare in the CRS
    dz = _height_errors(out, read_colmap_point_table(out / "sparse" / "0")["xyz"])
    assert len(dz) >= 40 and np.median(np.abs(dz)) < 0.6
