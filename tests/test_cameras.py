"""The camera model (citygen/cameras.py) against COLMAP's camera models (pycolmap), closed
forms for pinhole rays, and hand-written pose conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from citygen import cameras
from citygen.errors import CitygenError
from survey_io import Camera

pycolmap = pytest.importorskip("pycolmap")

W, H = 64, 48
# (COLMAP model, COLMAP params, the same lens as a survey_io.Camera); moderate aerial-lens
# coefficients, normalised radius up to ~0.8 in the image corners.
LENSES = {
    "SIMPLE_RADIAL": ([50.0, 31.3, 24.6, -0.08],
                      Camera(W, H, 50.0, 50.0, 31.3, 24.6, "SIMPLE_RADIAL", k1=-0.08)),
    "RADIAL": ([52.0, 32.1, 23.8, 0.05, -0.01],
               Camera(W, H, 52.0, 52.0, 32.1, 23.8, "RADIAL", k1=0.05, k2=-0.01)),
    "OPENCV": ([50.0, 51.5, 31.7, 24.2, -0.12, 0.03, 0.001, -0.002],
               Camera(W, H, 50.0, 51.5, 31.7, 24.2, "OPENCV", k1=-0.12, k2=0.03, p1=0.001, p2=-0.002)),
    "OPENCV_FISHEYE": ([40.0, 40.5, 32.2, 23.9, 0.05, -0.01, 0.002, -1e-4],
                       Camera(W, H, 40.0, 40.5, 32.2, 23.9, "OPENCV_FISHEYE", k1=0.05, k2=-0.01, k3=0.002, k4=-1e-4)),
}


def _colmap(model: str) -> "pycolmap.Camera":
    params, _ = LENSES[model]
    return pycolmap.Camera(model=model, width=W, height=H, params=params)


def _colmap_cam_from_img(cam, uv: np.ndarray) -> np.ndarray:
    if hasattr(cam, "cam_from_img"):
        return np.asarray(cam.cam_from_img(uv))
    return np.asarray(cam.image_to_world(uv))  # pycolmap < 0.5


def _colmap_img_from_cam(cam, xyz: np.ndarray) -> np.ndarray:
    if hasattr(cam, "img_from_cam"):
        return np.asarray(cam.img_from_cam(xyz))
    return np.asarray(cam.world_to_image(xyz[:, :2] / xyz[:, 2:]))


def _pixel_positions() -> np.ndarray:
    """Continuous pixel positions over the whole image, corners and edges included."""
    u, v = np.meshgrid(np.linspace(0.0, W, 17), np.linspace(0.0, H, 13))
    return np.stack([u.ravel(), v.ravel()], axis=-1)


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.mark.parametrize("model", list(LENSES))
def test_undistortion_matches_colmap(model):
    _, cam = LENSES[model]
    uv = _pixel_positions()
    ref = _colmap_cam_from_img(_colmap(model), uv)
    x, y = cameras.pixel_to_normalized(cam, uv[:, 0], uv[:, 1])
    # measured (2-core x86-64): <= 1.2e-11, COLMAP's own solver tolerance; 10 iterations gave 1e-10
    np.testing.assert_allclose(np.stack([x, y], -1), ref, atol=1e-9, rtol=0)
    # the torch path gives the same numbers
    xt, yt = cameras.pixel_to_normalized(cam, torch.from_numpy(uv[:, 0]), torch.from_numpy(uv[:, 1]))
    np.testing.assert_allclose(torch.stack([xt, yt], -1).numpy(), ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("model", list(LENSES))
def test_projection_matches_colmap_and_round_trips(model):
    _, cam = LENSES[model]
    rng = np.random.default_rng(3)
    xyz = np.concatenate([rng.uniform(-0.6, 0.6, (50, 2)), np.ones((50, 1))], -1) * rng.uniform(2, 30, (50, 1))
    uv, z = cameras.project(cam, np.eye(4), xyz)
    np.testing.assert_allclose(uv, _colmap_img_from_cam(_colmap(model), xyz), atol=1e-9, rtol=0)  # measured 7e-15
    np.testing.assert_allclose(z, xyz[:, 2], rtol=1e-15)
    # project(unproject(p)) == p over the image, and unproject(project(X)) == X
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = _rotation(4), [10.0, -3.0, 120.0]
    pix = _pixel_positions()
    depth = np.linspace(5.0, 50.0, len(pix))
    pts = cameras.unproject(cam, c2w, pix[:, 0], pix[:, 1], depth)
    uv2, z2 = cameras.project(cam, c2w, pts)
    np.testing.assert_allclose(uv2, pix, atol=1e-9, rtol=0)  # measured <= 6e-14 px
    np.testing.assert_allclose(z2, depth, rtol=1e-12)


@pytest.mark.parametrize("model", ["SIMPLE_RADIAL", "RADIAL", "OPENCV"])
def test_ray_directions_match_colmap(model):
    _, cam = LENSES[model]
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = _rotation(5), [1.0, 2.0, 3.0]
    pixels = torch.tensor([[0, 0], [63, 0], [10, 20], [31, 24], [63, 47], [5, 40]])
    o, d, zs = cameras.rays(cam, c2w, pixels)
    xy = _colmap_cam_from_img(_colmap(model), pixels.numpy() + 0.5)  # pixel centres
    d_ref = np.concatenate([xy, np.ones((len(xy), 1))], -1)
    d_ref /= np.linalg.norm(d_ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(d.numpy(), d_ref @ c2w[:3, :3].T, atol=2e-7, rtol=0)  # float32 output
    np.testing.assert_allclose(zs.numpy(), d_ref[:, 2], atol=2e-7, rtol=0)
    np.testing.assert_allclose(o.numpy(), np.broadcast_to(c2w[:3, 3], (6, 3)), atol=1e-6)


def test_training_batches_use_the_lens_per_image():
    """A batch mixing a distorted and a pinhole image: each ray gets its own camera's lens."""
    _, distorted = LENSES["OPENCV"]
    pinhole = Camera(W, H, 45.0, 46.0, 30.0, 22.0)
    c2w = np.stack([np.eye(4), np.eye(4)])
    c2w[1, :3, :3] = _rotation(6)
    cams = cameras.CameraSet([distorted, pinhole], c2w)
    image = torch.tensor([0, 1, 0, 1])
    pixels = torch.tensor([[0, 0], [0, 0], [40, 30], [63, 47]])
    _, d, _ = cams.rays(image, pixels)
    xy0 = _colmap_cam_from_img(_colmap("OPENCV"), pixels[[0, 2]].numpy() + 0.5)
    u1, v1 = pixels[[1, 3], 0].numpy() + 0.5, pixels[[1, 3], 1].numpy() + 0.5
    xy1 = np.stack([(u1 - 30.0) / 45.0, (v1 - 22.0) / 46.0], -1)  # pinhole closed form
    for rows, xy, m in (([0, 2], xy0, c2w[0]), ([1, 3], xy1, c2w[1])):
        ref = np.concatenate([xy, np.ones((2, 1))], -1)
        ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True) @ m[:3, :3].T
        np.testing.assert_allclose(d[rows].numpy(), ref, atol=2e-7, rtol=0)


def test_pinhole_rays_closed_form_and_downscale():
    cam = Camera(width=40, height=30, fl_x=35.0, fl_y=36.0, cx=19.3, cy=15.2)
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = _rotation(7), [0.5, -1.0, 20.0]
    o, d, zs = cameras.rays(cam, c2w)
    j, i = np.mgrid[0:30, 0:40]
    ref = np.stack([(i + 0.5 - 19.3) / 35.0, (j + 0.5 - 15.2) / 36.0, np.ones_like(i, float)], -1).reshape(-1, 3)
    n = np.linalg.norm(ref, axis=-1)
    np.testing.assert_allclose(d.numpy(), (ref / n[:, None]) @ c2w[:3, :3].T, atol=1e-7, rtol=0)
    np.testing.assert_allclose(zs.numpy(), 1.0 / n, atol=1e-7, rtol=0)
    # at downscale 2 the 20x15 image's pixel (i, j) is the full image's position (2i + 1, 2j + 1)
    _, d2, _ = cameras.rays(cam, c2w, downscale=2.0)
    j2, i2 = np.mgrid[0:15, 0:20]
    ref2 = np.stack([(2 * i2 + 1 - 19.3) / 35.0, (2 * j2 + 1 - 15.2) / 36.0, np.ones_like(i2, float)],
                    -1).reshape(-1, 3)
    ref2 /= np.linalg.norm(ref2, axis=-1, keepdims=True)
    np.testing.assert_allclose(d2.numpy(), ref2 @ c2w[:3, :3].T, atol=1e-7, rtol=0)


def test_view_bounds_contain_the_distorted_image():
    for model in ("OPENCV", "RADIAL"):
        _, cam = LENSES[model]
        x_lo, x_hi, y_lo, y_hi = cameras.view_bounds(cam)
        u, v = np.meshgrid(np.linspace(0, W, 200), np.linspace(0, H, 150))
        xy = _colmap_cam_from_img(_colmap(model), np.stack([u.ravel(), v.ravel()], -1))
        eps = 1e-9
        assert xy[:, 0].min() >= x_lo - eps and xy[:, 0].max() <= x_hi + eps
        assert xy[:, 1].min() >= y_lo - eps and xy[:, 1].max() <= y_hi + eps
    pin = Camera(W, H, 50.0, 50.0, 30.0, 20.0)
    assert cameras.view_bounds(pin) == (-30.0 / 50.0, 34.0 / 50.0, -20.0 / 50.0, 28.0 / 50.0)


def test_opencv_opengl_conventions_hand_written():
    # An OpenCV camera looking straight down (nadir), image x east, image y south, at 100 m.
    c2w_cv = np.array([[1.0, 0, 0, 5], [0, -1, 0, 6], [0, 0, -1, 100], [0, 0, 0, 1]])
    # The same camera in OpenGL axes: x east, y (image up) north, z (backwards) up.
    c2w_gl = np.array([[1.0, 0, 0, 5], [0, 1, 0, 6], [0, 0, 1, 100], [0, 0, 0, 1]])
    np.testing.assert_array_equal(cameras.opencv_to_opengl(c2w_cv), c2w_gl)
    np.testing.assert_array_equal(cameras.opengl_to_opencv(c2w_gl), c2w_cv)
    # a ground point 100 m below is 100 m in front: OpenGL camera z = -100, x = 2 (east), y = 3 (north)
    p = cameras.world_to_opengl_view(c2w_cv) @ np.array([7.0, 9.0, 0.0, 1.0])
    np.testing.assert_allclose(p, [2.0, 3.0, -100.0, 1.0], atol=1e-12)


def test_fisheye_rays_are_refused_in_one_line():
    _, cam = LENSES["OPENCV_FISHEYE"]
    with pytest.raises(CitygenError, match="OPENCV_FISHEYE"):
        cameras.rays(cam, np.eye(4))
    with pytest.raises(CitygenError, match="trainer"):
        cameras.CameraSet([cam], np.eye(4)[None])
