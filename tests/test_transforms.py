"""nerfstudio transforms.json: round trips, the OpenGL convention on disk, per-frame intrinsics, held-out views."""

from __future__ import annotations

import json

import numpy as np
import pytest

from survey_io import Camera, Georef, Survey, SurveyError, SurveyImage, read_transforms, write_transforms

GEOREF = Georef("EPSG:32651", (350000.0, 3450000.0, 5.0))


def _rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _survey(root, cameras, n=6, seed=0) -> Survey:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = _rotation(rng), rng.uniform(-500, 500, 3)
        images.append(SurveyImage(f"images/{i:04d}.png", i % len(cameras), c2w))
    return Survey(root, cameras, images, GEOREF)


def test_round_trip_shared_intrinsics(tmp_path):
    cam = Camera(320, 240, 280.0, 281.5, 160.25, 119.75, "OPENCV", k1=-0.1, k2=0.01, p1=1e-3, p2=-2e-3)
    survey = _survey(tmp_path, [cam])
    survey.test_names = ["images/0001.png", "images/0004.png"]
    path = write_transforms(survey, tmp_path / "transforms.json")
    meta = json.loads(path.read_text())
    assert meta["fl_x"] == 280.0 and "fl_x" not in meta["frames"][0]  # shared intrinsics at the top level
    assert meta["test_filenames"] == survey.test_names
    assert meta["val_filenames"] == meta["test_filenames"]  # ns-train evaluates on "val"
    assert sorted(meta["train_filenames"]) == sorted({im.name for im in survey.images} - set(survey.test_names))
    back = read_transforms(path)
    assert back.georef == GEOREF and back.cameras == [cam]
    assert back.test_names == survey.test_names
    assert [im.name for im in back.test_images] == survey.test_names
    for a, b in zip(back.images, survey.images, strict=True):
        assert a.name == b.name
        # flipping two axes is exact in float64
        np.testing.assert_array_equal(a.c2w, b.c2w)


def test_round_trip_per_frame_intrinsics(tmp_path):
    cams = [Camera(320, 240, 280.0, 280.0, 160.0, 120.0, "PINHOLE"),
            Camera(640, 480, 560.0, 561.0, 320.5, 240.5, "OPENCV_FISHEYE", k1=0.1, k2=0.01, k3=-0.001, k4=1e-4),
            Camera(320, 240, 300.0, 300.0, 160.0, 120.0, "SIMPLE_RADIAL", k1=0.05)]
    survey = _survey(tmp_path, cams, n=7, seed=1)
    path = write_transforms(survey, tmp_path / "transforms.json")
    meta = json.loads(path.read_text())
    assert "fl_x" not in meta and all("fl_x" in f for f in meta["frames"])
    back = read_transforms(path)
    for a, b in zip(back.images, survey.images, strict=True):
        assert back.cameras[a.camera] == survey.cameras[b.camera]
        np.testing.assert_array_equal(a.c2w, b.c2w)


def test_nadir_camera_on_disk_is_opengl(tmp_path):
    """A camera 100 m up looking straight down, image top to the north.

    OpenCV: x = east, y (down the image) = south, z (forward) = down.  OpenGL flips y and z: x = east,
    y (up the image) = north, z (backwards, out of the lens) = up.  So on disk the rotation is the identity.
    """
    c2w_cv = np.array([[1.0, 0, 0, 12.0], [0, -1.0, 0, -7.0], [0, 0, -1.0, 100.0], [0, 0, 0, 1.0]])
    survey = Survey(tmp_path, [Camera(100, 80, 90.0, 90.0, 50.0, 40.0)], [SurveyImage("a.png", 0, c2w_cv)], GEOREF)
    path = write_transforms(survey, tmp_path / "transforms.json")
    on_disk = json.loads(path.read_text())["frames"][0]["transform_matrix"]
    assert on_disk == [[1.0, 0.0, 0.0, 12.0], [0.0, 1.0, 0.0, -7.0], [0.0, 0.0, 1.0, 100.0], [0.0, 0.0, 0.0, 1.0]]
    np.testing.assert_array_equal(read_transforms(path).images[0].c2w, c2w_cv)


def test_plain_nerfstudio_file_needs_a_georef(tmp_path):
    meta = {"w": 64, "h": 48, "fl_x": 50.0, "fl_y": 50.0, "cx": 32.0, "cy": 24.0,
            "frames": [{"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist()}]}
    path = tmp_path / "transforms.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(SurveyError, match="no 'georef'") as err:
        read_transforms(path)
    assert str(path) in str(err.value)
    survey = read_transforms(path, georef=GEOREF)
    assert survey.georef == GEOREF
    assert survey.cameras[0].camera_model == "PINHOLE"
    # nerfstudio's identity pose (OpenGL) looks along -z: in OpenCV that is a camera with y and z flipped
    np.testing.assert_array_equal(survey.images[0].c2w, np.diag([1.0, -1.0, -1.0, 1.0]))


def test_semantics_and_depth_paths(tmp_path):
    cam = Camera(64, 48, 50.0, 50.0, 32.0, 24.0)
    im = SurveyImage("rgb/0.png", 0, np.eye(4), semantics=tmp_path / "sem" / "0.png",
                     depth=tmp_path / "depth" / "0.npy")
    path = write_transforms(Survey(tmp_path, [cam], [im], GEOREF), tmp_path / "transforms.json")
    frame = json.loads(path.read_text())["frames"][0]
    assert frame["semantics_file_path"] == "sem/0.png" and frame["depth_file_path"] == "depth/0.npy"
    back = read_transforms(path).images[0]
    assert back.semantics == (tmp_path / "sem" / "0.png").resolve()
    assert back.depth == (tmp_path / "depth" / "0.npy").resolve()


def test_fl_y_defaults_to_fl_x_and_principal_point_to_centre(tmp_path):
    meta = {"w": 64, "h": 48, "fl_x": 50.0, "georef": GEOREF.to_dict(),
            "frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}
    path = tmp_path / "transforms.json"
    path.write_text(json.dumps(meta))
    cam = read_transforms(path).cameras[0]
    assert (cam.fl_y, cam.cx, cam.cy) == (50.0, 32.0, 24.0)
