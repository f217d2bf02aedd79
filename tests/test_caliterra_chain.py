"""The real-survey chain in CI size: caliterra's first 10 JPEGs -> ingest -> a 200-step `drone` run
(the default preset for a survey without depth maps) -> ortho + DSM export -> the figures of
examples/bench_caliterra.py, checked against independent expectations.  Plus the DSM survey
check (held-out points, coverage) against a closed form on a synthetic raster."""

import importlib.util
import json

import numpy as np
import pytest
from _paths import CALITERRA

from citygen.export.survey_check import dsm_point_errors, dsm_survey_check
from citygen.images import load_rgb
from citygen.metrics import psnr
from survey_io import Camera, Georef, Survey, SurveyImage
from survey_io.geotiff import write_geotiff

pytest.importorskip("pycolmap")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_caliterra", CALITERRA.parents[2] / "examples" / "bench_caliterra.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_caliterra_chain_small(tmp_path):
    import torch

    work = tmp_path / "bench"
    fig = _bench().main(["--work", str(work), "--src", str(CALITERRA), "--images", "10", "--ingest-max-size", "600",
                         "--steps", "200",
                         "--max-seconds", "0", "--downscale", "4", "--threads", "1", "--export-gsd", "1.0",
                         "--ingest-threads", "1"])
    assert json.loads((work / "bench_caliterra.json").read_text()) == fig
    assert fig["ingest"]["registered"] >= 9 and fig["ingest"]["held_out_views"] >= 1
    run = fig["run"]
    assert run["preset"] == "drone" and "without depth maps" in run["preset_reason"] and run["steps"] == 200
    assert run["box_source"] == "sfm-points"
    # the held-out view beats the best constant image (the training pixels' mean colour)
    from survey_io import read_transforms

    survey = read_transforms(work / "survey" / "transforms.json")
    test = survey.test_images[0]
    cam = survey.camera_of(test).scaled(0.25)
    gt = torch.from_numpy(load_rgb(survey.image_path(test), (cam.width, cam.height))).float() / 255
    mean = torch.stack([torch.from_numpy(load_rgb(survey.image_path(im), (cam.width, cam.height))).float().mean((0, 1))
                        for im in survey.train_images]).mean(0) / 255
    assert run["heldout_views"]["psnr"] > psnr(mean.expand_as(gt), gt) + 1.0
    assert 0 < run["heldout_views"]["ssim"] <= 1
    # rendered depth and the DSM against the held-out SfM points (never trained on).  Measured on
    # the 2-core box with ground opacity 0.01 (drone.yaml): 87 % of the view observations and 94 %
    # of the points within 2 GSD (1 m DSM cells), DSM median 0.20 m, 1 of 224 points on nodata,
    # 99 % of the cells two cameras see covered (at 100 steps 27 of the 224 points were still on
    # nodata: the weaker term fills the ground later).  Before the ground opacity term the DSM
    # covered 34 % of that ground.
    depth = run["heldout_views"]["depth_vs_heldout_points"]
    assert depth["num_observations"] > 50 and depth["share_within_2gsd"] > 0.6
    dsm = run["export"]["dsm_vs_heldout_points"]
    assert dsm["points_in_raster"] > 100 and dsm["median_abs_m"] < 1.0 and dsm["share_within_2gsd"] > 0.7
    assert dsm["points_on_nodata"] <= 0.05 * dsm["points_in_raster"]
    cov = run["export"]["coverage"]
    assert cov["cells_seen_by_2_cameras"] > 1000 and cov["share"] > 0.9
    assert (work / "export" / "dsm.tif").is_file() and (work / "export" / "ortho.tif").is_file()


def test_survey_check_against_closed_form(tmp_path):
    """Two nadir pinhole cameras 100 m up see overlapping 80 m x 60 m squares of flat ground; a DSM
    at z = 0 with a nodata quarter, and held-out points with known offsets from it."""
    georef = Georef("EPSG:32633", (500000.0, 4500000.0, 300.0))  # the DSM holds CRS heights: local + 300
    cam = Camera(800, 600, 1000.0, 1000.0, 400.0, 300.0, "PINHOLE")  # footprint 80 m x 60 m at 100 m
    images = []
    for x in (-20.0, 20.0):
        c2w = np.eye(4)
        c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])
        c2w[:3, 3] = (x, 0.0, 100.0)
        images.append(SurveyImage(f"{x}.jpg", 0, c2w))
    survey = Survey(tmp_path, [cam], images, georef)
    # a 1 m raster over x in [-100, 100), y in [-50, 50): both cameras see x in [-20, 20], y in [-30, 30]
    z = np.full((100, 200), 300.0, np.float32)
    z[:, 100:] = -9999.0  # x >= 0: no data
    from rasterio.transform import from_origin

    path = tmp_path / "dsm.tif"
    write_geotiff(path, z, crs=georef.crs, transform=from_origin(500000.0 - 100, 4500000.0 + 50, 1.0, 1.0), nodata=-9999.0)
    xyz = np.array([[-10.5, 0.5, 0.5], [-10.5, 5.5, 1.5], [-30.5, 10.5, 3.0], [10.5, 0.5, 0.0], [500, 0, 0]])
    obs = np.zeros((0,), np.int64)
    np.savez(tmp_path / "points3D_heldout.npz", xyz=xyz, image_names=np.array(["-20.0.jpg"]), obs_point=obs,
             obs_image=obs, obs_xy=np.zeros((0, 2)))
    rep = dsm_survey_check(path, survey)
    seen2 = 40 * 60  # 1 m cells with centres inside x in (-20, 20), y in (-30, 30)
    assert rep["coverage"]["cells_seen_by_2_cameras"] == seen2
    assert rep["coverage"]["share"] == pytest.approx(0.5)
    hp = rep["heldout_points"]
    assert hp["points_total"] == 5 and hp["points_in_raster"] == 4 and hp["points_on_nodata"] == 1
    # errors -0.5, -1.5, -3.0 over data; 2 GSD = 2 m: two of the four points in the raster
    assert hp["median_abs_m"] == pytest.approx(1.5) and hp["rmse_m"] == pytest.approx(np.sqrt((0.25 + 2.25 + 9) / 3))
    assert hp["share_within_2gsd"] == pytest.approx(0.5)
    assert rep["image_gsd_m"] == pytest.approx((100 - 0.5) / 1000)  # over the median point height
    # the same errors point by point (the README's map of them): NaN on nodata and off the raster
    per_point = dsm_point_errors(path, survey)
    np.testing.assert_allclose(per_point["error"], [-0.5, -1.5, -3.0, np.nan, np.nan])
    np.testing.assert_array_equal(per_point["xyz"], xyz)
