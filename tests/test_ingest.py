"""Georegistration (robust similarity) and `citygen ingest` (pycolmap SfM + alignment)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from _paths import CALITERRA

from survey_io.align import Similarity, _so3_exp, align_similarity, umeyama

REAL = CALITERRA


def _angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip((np.trace(Ra.T @ Rb) - 1) / 2, -1, 1)))


def _known(seed: int = 0) -> Similarity:
    rng = np.random.default_rng(seed)
    return Similarity(float(rng.uniform(0.2, 20)), _so3_exp(rng.normal(size=3)), rng.normal(size=3) * 100)


# -- closed-form alignment -------------------------------------------------------------------
def test_umeyama_exact_and_weighted():
    truth = _known(1)
    src = np.random.default_rng(2).normal(size=(10, 3)) * 30
    dst = truth.apply(src)
    fit = umeyama(src, dst)
    assert fit.scale == pytest.approx(truth.scale, rel=1e-12)
    np.testing.assert_allclose(fit.rotation, truth.rotation, atol=1e-12)
    np.testing.assert_allclose(fit.translation, truth.translation, atol=1e-9)
    # A corrupted point with zero weight has no influence.
    bad = dst.copy()
    bad[3] += 1000.0
    w = np.ones(10)
    w[3] = 0.0
    fit = umeyama(src, bad, weights=w)
    np.testing.assert_allclose(fit.matrix(), truth.matrix(), atol=1e-9)
    # A reflection is never returned: mirrored data gives a proper rotation.
    fit = umeyama(src, dst * np.array([1, 1, -1]))
    assert np.linalg.det(fit.rotation) == pytest.approx(1.0)


def test_similarity_on_poses():
    truth = _known(3)
    c2w = np.eye(4)
    c2w[:3, :3] = _so3_exp(np.array([0.1, 0.2, 0.3]))
    c2w[:3, 3] = [1, 2, 3]
    out = truth.apply_to_c2w(c2w)
    np.testing.assert_allclose(out[:3, 3], truth.matrix()[:3, :3] @ c2w[:3, 3] + truth.translation)
    np.testing.assert_allclose(out[:3, :3], truth.rotation @ c2w[:3, :3])
    # A point seen along the camera's axis stays on it.
    p_cam = np.array([0, 0, 5.0])
    p_world = truth.apply(c2w[:3, :3] @ p_cam + c2w[:3, 3])
    d = out[:3, :3].T @ (p_world - out[:3, 3])
    np.testing.assert_allclose(d[:2], 0, atol=1e-9)
    assert d[2] == pytest.approx(5.0 * truth.scale)


def test_robust_alignment_recovers_similarity_with_noise_and_outliers():
    truth = _known(4)
    rng = np.random.default_rng(5)
    src = rng.uniform(-50, 50, size=(60, 3)) / truth.scale
    dst = truth.apply(src) + rng.normal(size=(60, 3)) * 0.5
    outliers = rng.choice(60, 18, replace=False)  # 30 %
    dst[outliers] += rng.normal(size=(18, 3)) * 40 + 30
    result = align_similarity(src, dst, seed=0)
    assert set(np.flatnonzero(~result.inliers)) == set(outliers)
    assert result.transform.scale == pytest.approx(truth.scale, rel=0.01)
    assert _angle_deg(result.transform.rotation, truth.rotation) < 0.5
    inl = result.inliers
    np.testing.assert_allclose(result.residuals, dst - result.transform.apply(src))
    # The inliers' residuals are the noise: 3D RMSE ~ 0.5 * sqrt(3).
    assert np.sqrt(np.mean(np.sum(result.residuals[inl] ** 2, axis=1))) < 1.2
    # Plain least squares on the same data is far off: the robust fit is doing the work.
    naive = umeyama(src, dst)
    assert _angle_deg(naive.rotation, truth.rotation) > 2 or abs(naive.scale / truth.scale - 1) > 0.05
    # Deterministic for a seed.
    again = align_similarity(src, dst, seed=0)
    np.testing.assert_array_equal(again.transform.matrix(), result.transform.matrix())
    # With an explicit threshold (MSAC) the same outliers are found.
    assert set(np.flatnonzero(~align_similarity(src, dst, threshold=3.0).inliers)) == set(outliers)


def test_drifting_altitude_with_level_prior():
    """GPS altitude drifts with time; down-weighting it and the nadir prior keep the model level."""
    rng = np.random.default_rng(6)
    truth = Similarity(2.0, _so3_exp(np.array([0.0, 0.0, 0.7])), np.array([5.0, -3.0, 100.0]))
    # A lawnmower flight at constant height, nadir cameras (SfM frame: viewing direction is -z).
    xs, ys = np.meshgrid(np.linspace(-40, 40, 8), np.linspace(-30, 30, 4))
    src = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], axis=1) / truth.scale
    dst = truth.apply(src) + np.c_[rng.normal(size=(32, 2)) * 0.3, np.zeros(32)]
    dst[:, 2] += np.linspace(0, 30, 32)  # +30 m drift over the flight, correlated with y
    src_dirs = np.tile([0, 0, -1.0], (32, 1))
    dst_dirs = src_dirs @ truth.rotation.T
    plain = align_similarity(src, dst)
    level = align_similarity(src, dst, vertical_weight=0.1, src_dirs=src_dirs, dst_dirs=dst_dirs,
                             direction_weight=20.0)
    tilt = lambda sim: math.degrees(math.acos(-(sim.rotation @ truth.rotation.T @ [0, 0, -1.0])[2]))
    assert tilt(plain.transform) > 5.0  # positions alone follow the drift
    assert tilt(level.transform) < 1.0
    assert level.stats()["horizontal"]["rmse"] < 1.0
    assert level.stats()["vertical"]["rmse"] > 5.0  # the drift shows up in the report, not in the model


def test_collinear_cameras_roll_fixed_by_directions():
    rng = np.random.default_rng(7)
    truth = _known(8)
    src = np.c_[np.linspace(0, 100, 15), rng.normal(size=(15, 2)) * 1e-3]
    dst = truth.apply(src) + rng.normal(size=(15, 3)) * 0.05
    src_dirs = np.tile([0, 0.6, -0.8], (15, 1))
    result = align_similarity(src, dst, src_dirs=src_dirs, dst_dirs=src_dirs @ truth.rotation.T,
                              direction_weight=1.0)
    assert _angle_deg(result.transform.rotation, truth.rotation) < 0.5
    with pytest.raises(ValueError):
        align_similarity(src[:2], dst[:2])


# -- ingest's rules, on made-up inputs ----------------------------------------------------------------
def _lawnmower(n_strips=4, per_strip=10, spacing=20.0, step=8.0) -> np.ndarray:
    """Camera positions of a serpentine flight at 100 m, in capture order (strips alternate direction)."""
    pts = []
    for s in range(n_strips):
        xs = np.arange(per_strip) * step
        for x in (xs if s % 2 == 0 else xs[::-1]):
            pts.append([x, s * spacing, 100.0])
    return np.array(pts)


@pytest.mark.parametrize("lag", [2, 0, -1])
def test_gps_lag_estimator_recovers_a_known_shift(lag):
    from survey_io.ingest import estimate_gps_lag

    rng = np.random.default_rng(11)
    truth = _lawnmower()
    n = len(truth)
    # The recorded fix of frame i is where the camera was at frame i - lag (a stale fix).
    recorded = np.array([truth[min(max(i - lag, 0), n - 1)] for i in range(n)]) + rng.normal(size=(n, 3)) * 0.3
    sim = _known(12)
    inv = Similarity(1 / sim.scale, sim.rotation.T, -sim.rotation.T @ sim.translation / sim.scale)
    registered = np.setdiff1d(np.arange(n), [5, 17])  # two frames SfM did not register
    src = inv.apply(truth[registered])
    est = estimate_gps_lag(src, recorded, registered, 3, lambda a, b: align_similarity(a, b, vertical_weight=0.1))
    assert est.best_frames == lag and est.frames == lag and est.applied == (lag != 0)
    assert set(est.per_shift) == set(range(-3, 4))
    if lag:
        # The true shift removes the lag error (a frame is 8 m along strips); what is left is the noise.
        assert est.per_shift[lag]["median_horizontal_m"] < 0.8
        assert est.per_shift[0]["median_horizontal_m"] > 4.0
    # Lag off: nothing is tried or applied.
    off = estimate_gps_lag(src, recorded, registered, 0, lambda a, b: align_similarity(a, b))
    assert (off.frames, off.applied, set(off.per_shift)) == (0, False, {0})


def test_gps_lag_needs_a_clear_margin():
    """A shift that helps by less than LAG_MIN_GAIN (20 %) is reported, not applied."""
    from survey_io.align import AlignmentResult
    from survey_io.ingest import estimate_gps_lag

    medians = {-1: 10.0, 0: 10.0, 1: 8.5}  # 15 % better: below the margin

    def fake_align(src, dst):
        k = int(round(dst[0, 0] - src[0, 0]))  # the shift, read back from the track below
        h = np.full(len(src), medians[k])
        return AlignmentResult(Similarity.identity(), np.c_[h, np.zeros((len(src), 2))], np.ones(len(src), bool), 1.0)

    track = np.c_[np.arange(6.0), np.zeros((6, 2))]
    est = estimate_gps_lag(track, track, np.arange(6), 1, fake_align)
    assert (est.best_frames, est.frames, est.applied) == (1, 0, False)
    medians[1] = 7.9  # 21 % better
    est = estimate_gps_lag(track, track, np.arange(6), 1, fake_align)
    assert (est.best_frames, est.frames, est.applied) == (1, 1, True)


def test_shifted_track_extrapolates_past_the_ends():
    from survey_io.ingest import shifted_track

    track = np.array([[0.0, 0, 0], [1, 0, 0], [3, 0, 0]])
    np.testing.assert_allclose(shifted_track(track, 1)[:, 0], [1, 3, 5])
    np.testing.assert_allclose(shifted_track(track, -1)[:, 0], [-1, 0, 1])
    np.testing.assert_allclose(shifted_track(track, 2)[:, 0], [3, 5, 7])
    np.testing.assert_array_equal(shifted_track(track, 0), track)


def test_holdout_every_8th_in_name_order():
    from survey_io.ingest import holdout_names

    names = [f"IMG_{i:02d}.jpg" for i in range(20)]
    shuffled = list(np.random.default_rng(0).permutation(names))
    assert holdout_names(shuffled, 8) == ["IMG_00.jpg", "IMG_08.jpg", "IMG_16.jpg"]
    assert holdout_names(shuffled, 0) == []
    assert holdout_names(names[:3], 8) == ["IMG_00.jpg"]


def test_heldout_point_rule():
    from survey_io.ingest import heldout_point_mask

    ids = np.arange(1, 20001)
    mask = heldout_point_mask(ids)
    expected = np.array([(int(i) * 2654435761) % 2**32 % 10 == 0 for i in ids])  # Python integers: no overflow
    np.testing.assert_array_equal(mask, expected)
    assert 0.09 < mask.mean() < 0.11


def test_focal_observability_rule():
    from survey_io.ingest import FOCAL_OBSERVABLE_SPREAD_DEG, focal_is_observable, view_spread_deg

    def axis(tilt_deg, heading_deg):
        t, h = math.radians(tilt_deg), math.radians(heading_deg)
        return [math.sin(t) * math.sin(h), math.sin(t) * math.cos(h), -math.cos(t)]

    # Four oblique strips at 30 deg, one per side: their mean axis is nadir, each 30 deg from it.
    obliques = np.array([axis(30, h) for h in (0, 90, 180, 270) for _ in range(5)])
    assert view_spread_deg(obliques) == pytest.approx(30.0, abs=1e-9)
    assert focal_is_observable(obliques)
    # Nadir flight with a few degrees of wobble: not observable.
    rng = np.random.default_rng(1)
    nadir = np.array([axis(abs(t), h) for t, h in zip(rng.normal(0, 3, 50), rng.uniform(0, 360, 50))])
    assert view_spread_deg(nadir) < 8 and not focal_is_observable(nadir)
    # One-sided oblique at a constant tilt: all axes parallel, the spread is 0 whatever the tilt.
    assert view_spread_deg(np.array([axis(45, 90)] * 10)) == pytest.approx(0.0, abs=1e-6)
    assert FOCAL_OBSERVABLE_SPREAD_DEG == 15.0


def test_colmap_camera_mapping():
    pycolmap = pytest.importorskip("pycolmap")
    from survey_io.sfm import colmap_to_camera

    cam = pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", 500.0, 640, 480)
    cam.params = [510.0, 321.0, 239.0, -0.05]
    c = colmap_to_camera(cam)
    assert (c.camera_model, c.fl_x, c.fl_y, c.cx, c.cy, c.k1, c.k2) == ("OPENCV", 510.0, 510.0, 321.0, 239.0, -0.05, 0.0)
    cam = pycolmap.Camera.create_from_model_name(2, "OPENCV", 500.0, 640, 480)
    cam.params = [500.0, 502.0, 320.0, 240.0, 0.01, 0.02, 0.001, 0.002]
    c = colmap_to_camera(cam)
    assert (c.fl_y, c.k1, c.k2, c.p1, c.p2) == (502.0, 0.01, 0.02, 0.001, 0.002)


# -- ingest on the real drone images --------------------------------------------------------------
#: Measured on IMG_9389..IMG_9400 (this box, pycolmap 4.2.1): registered 12/12, horizontal GPS
#: residual RMSE 8.3 m over the 11 written images (8.1 m with no GPS tampering), ~10 s unloaded.
#: The camera's GPS lags by about one frame (2 s), hence metres, not decimetres.
SUBSET_HORIZONTAL_RMSE_BOUND_M = 12.0


#: A uniform grey image added to the subset: SfM finds no features in it.
BLANK = "IMG_9388.jpg"

#: In the subset, this image's GPS latitude is moved 0.002 deg (222 m) north: a gross GPS error.
BAD_GPS = "IMG_9394.jpg"


def _shift_gps_latitude(path: Path, dlat: float) -> None:
    """Rewrite the EXIF APP1 segment in place (the JPEG's pixel data is untouched)."""
    from PIL import Image, TiffImagePlugin

    data = path.read_bytes()
    with Image.open(path) as im:
        exif = im.getexif()
    gps = exif.get_ifd(0x8825)
    lat = sum(float(v) / 60**i for i, v in enumerate(gps[2])) + dlat
    minutes = (lat - int(lat)) * 60
    gps[2] = (TiffImagePlugin.IFDRational(int(lat), 1), TiffImagePlugin.IFDRational(int(minutes), 1),
              TiffImagePlugin.IFDRational(round((minutes - int(minutes)) * 60 * 10**6), 10**6))
    new = exif.tobytes()
    pos = 2
    while data[pos] == 0xFF:
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            path.write_bytes(data[:pos] + b"\xff\xe1" + (len(new) + 2).to_bytes(2, "big") + new
                             + data[pos + 2 + length:])
            return
        pos += 2 + length
    raise AssertionError("no EXIF segment")


@pytest.fixture(scope="module")
def real_subset_ingest(tmp_path_factory):
    if not REAL.is_dir():
        pytest.fail(f"real data set missing at {REAL}")
    from survey_io.ingest import ingest

    src = tmp_path_factory.mktemp("caliterra12")
    for name in sorted(p.name for p in (REAL / "images").glob("*.jpg"))[:12]:
        shutil.copy(REAL / "images" / name, src / name)
    _shift_gps_latitude(src / BAD_GPS, 0.002)
    # A featureless frame (uniform grey, the first image's EXIF: same GPS and time, so it sorts
    # first in capture order and shifts no other image's GPS under a lag correction).
    from PIL import Image

    with Image.open(src / "IMG_9389.jpg") as first:
        exif = first.info["exif"]
    Image.new("RGB", (1000, 750), (128, 128, 128)).save(src / BLANK, quality=90, exif=exif)
    out = tmp_path_factory.mktemp("ingest") / "out"
    return src, out, ingest(src, out)


def test_ingest_real_subset(real_subset_ingest):
    from survey_io.drone import read_drone_folder
    from survey_io.nerfstudio import read_transforms

    src, out, result = real_subset_ingest
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["total"] == 13 and report["registered"] >= 11  # >= 90 % of the 12 real images
    assert BLANK in report["unregistered"] and len(report["unregistered"]) == 13 - report["registered"]
    assert set(report["unregistered_reasons"]) == set(report["unregistered"])
    assert report["unregistered_reasons"][BLANK].startswith("no features")
    # The moved GPS fix is caught as an outlier, ~222 m off, on the image that carries it after the
    # lag correction (the image `lag` frames before BAD_GPS in capture order).
    lag = report["gps_lag"]
    names = sorted(report["per_image"])
    bad_holder = [n for n in names if report["per_image"][n]["gps_fix_of"] == BAD_GPS]
    assert report["gps_outliers"] == bad_holder and len(bad_holder) == 1
    assert int(bad_holder[0][4:8]) == int(BAD_GPS[4:8]) - lag["frames"]
    assert 150 < report["per_image"][bad_holder[0]]["horizontal_m"] < 300
    # Lag: measured +2 frames on this subset; it clears the margin over no shift.
    assert lag["applied"] and lag["frames"] != 0
    per_shift = {int(k): v["median_horizontal_m"] for k, v in lag["per_shift"].items()}
    assert per_shift[lag["frames"]] == min(per_shift.values()) <= 0.8 * per_shift[0]
    res = report["gps_residual_written_m"]
    assert res["horizontal"]["rmse"] < SUBSET_HORIZONTAL_RMSE_BOUND_M
    assert report["gps_residual_m"]["horizontal"]["max"] > 150
    assert set(report["per_image"]) == {im.name for im in result.survey.images} | set(bad_holder)
    assert report["sfm"]["mean_reprojection_error_px"] < 1.0

    survey = read_transforms(out / "transforms.json")
    assert len(survey.images) == report["written"] == report["registered"] - 1
    assert bad_holder[0] not in {Path(im.name).name for im in survey.images}
    assert survey.georef == result.survey.georef
    for im in survey.images:
        assert (survey.root / im.name).resolve().parent == (out / "images").resolve()
        assert (survey.root / im.name).read_bytes() == (src / Path(im.name).name).read_bytes()
    # Held out: every 8th written image in name order, read back from transforms.json.
    written = sorted(Path(im.name).name for im in survey.images)
    assert [Path(n).name for n in survey.test_names] == written[::8]
    meta = json.loads((out / "transforms.json").read_text())
    assert meta["val_filenames"] == meta["test_filenames"] == [f"images/{n}" for n in written[::8]]
    # The residuals in the report are the GPS fix each image was given minus the written camera
    # centres (independent recomputation from the EXIF of the image named by gps_fix_of).
    prior = {im.name: im for im in read_drone_folder(src, georef=survey.georef).images}
    h = []
    for im in survey.images:
        name = Path(im.name).name
        fix = report["per_image"][name]["gps_fix_of"]
        if fix == "extrapolated":
            continue
        r = prior[fix].gps - im.c2w[:3, 3]
        np.testing.assert_allclose(r, report["per_image"][name]["residual_enu_m"], atol=1e-6)
        h.append(np.hypot(r[0], r[1]))
        # Independent of GPS: the README says the camera looks roughly straight down.
        tilt = math.degrees(math.acos(-im.c2w[2, 2]))
        assert tilt < 20.0, (name, tilt)
    assert len(h) >= len(survey.images) - abs(lag["frames"])
    # Focal length: a nadir-only flight keeps the EXIF prior, 4.5 mm at FocalPlaneXResolution
    # 4098.36 px/inch (README): 4.5 * 4098.36 / 25.4 = 726.09 px, unchanged by bundle adjustment.
    focal = report["focal"]
    assert focal["refined"] is False and focal["spread_from"] == "sfm poses" and focal["view_spread_deg"] < 15
    cam = survey.cameras[0]
    assert cam.camera_model == "OPENCV" and cam.fl_x == pytest.approx(4.5 * 4098.36 / 25.4, abs=0.01)
    assert focal["cameras"][0]["used_px"] == cam.fl_x
    assert focal["cameras"][0]["source"] == "exif focal-plane resolution"
    # The sparse model is in the same local frame as transforms.json.
    import pycolmap

    rec = pycolmap.Reconstruction(out / "sparse" / "0")
    for image in rec.images.values():
        match = [im for im in survey.images if Path(im.name).name == image.name]
        if match:
            np.testing.assert_allclose(image.projection_center(), match[0].c2w[:3, 3], atol=1e-6)
    pts = np.array([p.xyz for p in rec.points3D.values()])
    cams = np.array([im.c2w[2, 3] for im in survey.images])
    assert np.median(pts[:, 2]) < cams.min()  # the ground is below the drone
    # No DJI take-off altitude: the frame's origin height was moved onto the ground (median point).
    assert abs(np.median(pts[:, 2])) < 0.5 and cams.min() > 30
    assert report["origin_height_from"].startswith("median SfM point height")

    # Held-out points: exactly the model's points whose id passes the hash rule (recomputed with
    # Python integers), with their positions, errors and tracks; observations reproject onto xy.
    held = np.load(out / "points3D_heldout.npz")
    expected = sorted(i for i in rec.points3D if (int(i) * 2654435761) % 2**32 % 10 == 0)
    assert held["point3D_id"].tolist() == expected and report["held_out_points"]["num_points"] == len(expected)
    assert 0.07 * len(rec.points3D) < len(expected) < 0.13 * len(rec.points3D)
    for k in range(0, len(expected), 25):
        p = rec.points3D[expected[k]]
        np.testing.assert_allclose(held["xyz"][k], p.xyz)
        assert held["error_px"][k] == pytest.approx(p.error) and held["track_length"][k] == p.track.length()
    by_name = {im.name: im for im in rec.images.values()}
    errs = []
    for j in range(0, len(held["obs_point"]), 7):
        image = by_name[str(held["image_names"][held["obs_image"][j]])]
        uv = rec.cameras[image.camera_id].img_from_cam(image.cam_from_world() * held["xyz"][held["obs_point"][j]])
        errs.append(np.linalg.norm(np.asarray(uv).ravel()[:2] - held["obs_xy"][j]))
    assert np.median(errs) < 1.0


# -- the command line ----------------------------------------------------------------------------
def test_cli_ingest_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    from citygen.cli import entrypoint

    empty = tmp_path / "empty"
    empty.mkdir()
    assert entrypoint(["ingest", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "no JPEG" in err

    folder = tmp_path / "trunc"
    folder.mkdir()
    for name in ("IMG_9389.jpg", "IMG_9390.jpg"):
        shutil.copy(REAL / "images" / name, folder / name)
    data = (folder / "IMG_9390.jpg").read_bytes()
    (folder / "IMG_9390.jpg").write_bytes(data[: len(data) // 2])
    assert entrypoint(["ingest", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder / "IMG_9390.jpg") in err and "truncated" in err
    assert not (tmp_path / "out" / "transforms.json").exists()


# -- evaluation against held-out SfM points -------------------------------------------------------
def test_point_depth_errors_by_hand():
    from citygen.metrics import point_depth_errors, summarize_point_errors
    from survey_io.survey import Camera

    cam = Camera(width=4, height=3, fl_x=2.0, fl_y=2.0, cx=2.0, cy=1.5, camera_model="PINHOLE")
    depth = np.full((3, 4), 10.0)
    c2w = np.eye(4)
    c2w[:3, 3] = [1.0, 2.0, 3.0]  # camera at (1, 2, 3) looking along +z
    xyz = np.array([[1, 2, 12.0], [1, 2, 13.0], [5, 2, 15.0], [1, 2, 1.0], [1, 2, 13.0]])
    obs = np.array([[0.5, 0.5], [3.9, 2.9], [2.2, 1.0], [1.0, 1.0], [4.5, 1.0]])  # last: outside; 4th: behind
    err, gsd = point_depth_errors(depth, cam, c2w, xyz, obs)
    np.testing.assert_allclose(err, [10 - 9, 10 - 10, 10 - 12])
    np.testing.assert_allclose(gsd, [9 / 2, 10 / 2, 12 / 2])
    s = summarize_point_errors(err, gsd)
    assert s["num_observations"] == 3 and s["median_abs_m"] == 1.0
    assert s["rmse_m"] == pytest.approx(math.sqrt(5 / 3)) and s["share_within_2gsd"] == 1.0
    # GSD / 10: 2 GSD = 0.9, 1.0, 1.2 m against |errors| 1, 0, 2 m: only the second is within.
    assert summarize_point_errors(err, gsd / 10)["share_within_2gsd"] == pytest.approx(1 / 3)
    # Half resolution: full-resolution pixel (5.0, 3.0) is rendered pixel (2, 1).
    depth2 = np.zeros((3, 4))
    depth2[1, 2] = 7.0
    err, _ = point_depth_errors(depth2, cam, np.eye(4), np.array([[0, 0, 5.0]]), np.array([[5.0, 3.0]]), 2.0)
    np.testing.assert_allclose(err, [2.0])
    assert summarize_point_errors(np.zeros(0), np.zeros(0)) is None
