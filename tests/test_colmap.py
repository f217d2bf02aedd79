"""COLMAP sparse models: write with pycolmap, read back, compare with the closed-form survey."""

from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest

from survey_io import Camera, Georef, Survey, SurveyError, SurveyImage
from survey_io.colmap import read_colmap, read_colmap_points, write_colmap

GEOREF = Georef("EPSG:32633", (500000.0, 5000000.0, 100.0))


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world looking from ``eye`` at ``target`` (x right, y down, z forward)."""
    z = np.asarray(target, float) - np.asarray(eye, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:  # looking straight down: image top towards +y (north)
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], 1)
    c2w[:3, 3] = eye
    return c2w


def plane_survey(tmp_path) -> Survey:
    """Six cameras over the z=0 plane, one camera of each supported model."""
    cams = [
        Camera(640, 480, 500.0, 500.0, 320.0, 240.0, "SIMPLE_PINHOLE"),
        Camera(640, 480, 500.0, 505.5, 321.25, 239.5, "PINHOLE"),
        Camera(800, 600, 610.0, 610.0, 400.5, 300.5, "SIMPLE_RADIAL", k1=-0.031),
        Camera(800, 600, 610.0, 610.0, 400.0, 300.0, "RADIAL", k1=-0.031, k2=0.004),
        Camera(1024, 768, 700.0, 702.0, 512.0, 384.0, "OPENCV", k1=0.01, k2=-0.002, p1=3e-4, p2=-1e-4),
        Camera(1024, 768, 300.0, 301.0, 512.0, 384.0, "OPENCV_FISHEYE", k1=0.1, k2=-0.01, k3=0.002, k4=-1e-4),
    ]
    images = []
    for i in range(6):
        eye = (10.0 * i - 25.0, 3.0 * i, 40.0 + i)
        target = (0.0, 0.0, 0.0) if i else (eye[0], eye[1], 0.0)  # first one nadir
        images.append(SurveyImage(f"img/{i:03d}.jpg", i, look_at(eye, target)))
    return Survey(tmp_path / "images", cams, images, GEOREF)


@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
def test_round_trip(tmp_path, text):
    survey = plane_survey(tmp_path)
    xyz = np.array([[1.0, 2.0, 0.0], [-3.5, 4.25, 0.0], [7.0, -1.0, 0.5]])
    rgb = np.array([[255, 0, 0], [0, 128, 0], [1, 2, 3]], dtype=np.uint8)
    model = write_colmap(survey, tmp_path / "sparse" / "0", text=text, points=(xyz, rgb))
    suffix = "txt" if text else "bin"
    assert (model / f"cameras.{suffix}").exists() and (model / "georef.json").exists()

    back = read_colmap(model, survey.root)
    assert back.georef == GEOREF  # from the georef.json sidecar
    assert back.root == survey.root
    assert [im.name for im in back.images] == [im.name for im in survey.images]
    for a, b in zip(back.images, survey.images, strict=True):
        # pycolmap keeps quaternions: exact up to float64 round-off of the conversion
        np.testing.assert_allclose(a.c2w, b.c2w, rtol=0, atol=1e-12)
        assert back.cameras[a.camera] == survey.cameras[b.camera]  # intrinsics exactly
    got_xyz, got_rgb = read_colmap_points(model)
    np.testing.assert_array_equal(got_xyz, xyz)
    np.testing.assert_array_equal(got_rgb, rgb)


def test_pose_convention_matches_colmap_definition(tmp_path):
    """COLMAP's cam_from_world maps a world point X to R X + t; our c2w must invert it."""
    survey = plane_survey(tmp_path)
    model = write_colmap(survey, tmp_path / "m", text=True)
    lines = [ln for ln in (model / "images.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    first = lines[0].split()  # IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME
    qw, qx, qy, qz, tx, ty, tz = map(float, first[1:8])
    # quaternion -> matrix, by hand
    R = np.array([
        [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
        [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
        [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)],
    ])
    im = next(i for i in survey.images if i.name == first[9])
    centre = im.c2w[:3, 3]
    np.testing.assert_allclose(R @ centre + np.array([tx, ty, tz]), 0.0, atol=1e-9)  # centre maps to the origin
    np.testing.assert_allclose(R.T, im.c2w[:3, :3], atol=1e-12)


def test_explicit_georef_overrides_missing_sidecar(tmp_path):
    survey = plane_survey(tmp_path)
    model = write_colmap(survey, tmp_path / "m", text=False)
    (model / "georef.json").unlink()
    with pytest.raises(SurveyError, match="no georeferencing") as err:
        read_colmap(model, survey.root)
    assert str(model) in str(err.value)
    other = Georef("EPSG:32633", (1.0, 2.0, 3.0))
    assert read_colmap(model, survey.root, georef=other).georef == other


def test_old_model_without_rigs_and_frames(tmp_path):
    """Models from COLMAP < 3.12 have only cameras/images/points3D."""
    survey = plane_survey(tmp_path)
    model = write_colmap(survey, tmp_path / "m", text=True)
    (model / "rigs.txt").unlink()
    (model / "frames.txt").unlink()
    back = read_colmap(model, survey.root)
    np.testing.assert_allclose(back.images[3].c2w, survey.images[3].c2w, atol=1e-12)


@pytest.mark.parametrize("name", ["cameras.bin", "images.bin", "points3D.bin", "rigs.bin", "frames.bin"])
def test_truncated_binary_names_the_file(tmp_path, name):
    survey = plane_survey(tmp_path)
    model = write_colmap(survey, tmp_path / "m", text=False,
                         points=(np.zeros((2, 3)), np.zeros((2, 3), np.uint8)))
    data = (model / name).read_bytes()
    (model / name).write_bytes(data[: len(data) - 5])
    with pytest.raises(SurveyError, match="truncated") as err:
        read_colmap(model, survey.root)
    assert name in str(err.value)


def test_trailing_garbage_is_refused(tmp_path):
    survey = plane_survey(tmp_path)
    model = write_colmap(survey, tmp_path / "m", text=False)
    with open(model / "images.bin", "ab") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(SurveyError, match="unexpected bytes") as err:
        read_colmap(model, survey.root)
    assert "images.bin" in str(err.value)


@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
def test_unsupported_camera_model(tmp_path, text):
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, "FULL_OPENCV", 500.0, 640, 480)
    rec.add_camera_with_trivial_rig(cam)
    rec.add_image_with_trivial_frame(pycolmap.Image(name="a.jpg", camera_id=1, image_id=1),
                                     pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3)))
    model = tmp_path / "m"
    model.mkdir()
    (rec.write_text if text else rec.write_binary)(str(model))
    (model / "georef.json").write_text(json.dumps(GEOREF.to_dict()))
    with pytest.raises(SurveyError, match="FULL_OPENCV") as err:
        read_colmap(model, tmp_path)
    assert "cameras." in str(err.value)


def test_missing_and_incomplete_models(tmp_path):
    with pytest.raises(SurveyError, match="not found"):
        read_colmap(tmp_path / "nope", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SurveyError, match="no COLMAP model"):
        read_colmap(empty, tmp_path)
    model = write_colmap(plane_survey(tmp_path), tmp_path / "m", text=True)
    (model / "points3D.txt").unlink()
    with pytest.raises(SurveyError, match="missing points3D.txt"):
        read_colmap(model, tmp_path)


def test_write_refuses_lossy_models(tmp_path):
    survey = plane_survey(tmp_path)
    survey.cameras[0] = Camera(640, 480, 500.0, 501.0, 320.0, 240.0, "SIMPLE_PINHOLE")
    with pytest.raises(SurveyError, match="one focal length"):
        write_colmap(survey, tmp_path / "m")
    survey.cameras[0] = Camera(640, 480, 500.0, 500.0, 320.0, 240.0, "PINHOLE", k1=0.1)
    with pytest.raises(SurveyError, match="cannot hold distortion"):
        write_colmap(survey, tmp_path / "m")
