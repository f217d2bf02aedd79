"""Reference renderer: camera rays, ray-box intersection, closed-form volume rendering,
occupancy skipping, early termination, segment-exact gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from citygen.errors import CitygenError
from citygen.render import OccupancyGrid, camera_rays, intersect_aabb, render_rays
from citygen.render.sampling import undistort_normalized
from survey_io import Camera


class AnalyticField(nn.Module):
    """A field with the CityField rendering interface and closed-form contents.

    ``density(x)``: ``sigma`` inside any of ``boxes`` (list of (lo, hi)), 0 elsewhere;
    colour: the box's colour; semantics: one-hot logits of the box index.
    """

    def __init__(self, aabb, boxes, sigma=1.0, colors=None):
        super().__init__()
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32))
        self.boxes = [(torch.tensor(lo), torch.tensor(hi)) for lo, hi in boxes]
        self.sigma = sigma
        self.colors = torch.tensor(colors or [[1.0, 0.5, 0.25]] * len(boxes))
        self.n_classes = len(boxes) + 1
        self.background_semantics = nn.Parameter(torch.zeros(self.n_classes))
        self.scale = nn.Parameter(torch.ones(()))  # something to differentiate

    def _which(self, x):
        which = torch.full(x.shape[:1], -1, dtype=torch.long)
        for i, (lo, hi) in enumerate(self.boxes):
            which[((x >= lo) & (x <= hi)).all(-1)] = i
        return which

    def density(self, x):
        return torch.where(self._which(x) >= 0, self.sigma * self.scale, 0.0 * self.scale), None

    def forward(self, x, dirs, appearance, ray_index=None, with_semantics=True):
        which = self._which(x)
        inside = which >= 0
        rgb = torch.where(inside[:, None], self.colors[which.clamp_min(0)], torch.zeros(1, 3)) * self.scale
        out = {"sigma": torch.where(inside, self.sigma * self.scale, 0.0 * self.scale), "rgb": rgb}
        if with_semantics:
            out["semantics"] = nn.functional.one_hot(which + 1, self.n_classes).float()
        return out

    def background(self, dirs):
        return torch.zeros_like(dirs)


def random_rotation(seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_pixel_ray_passes_through_the_point_it_sees():
    cam = Camera(width=64, height=48, fl_x=70.0, fl_y=72.0, cx=31.2, cy=24.9)
    c2w = np.eye(4)
    c2w[:3, :3] = random_rotation(1)
    c2w[:3, 3] = [3.0, -2.0, 40.0]
    i, j, z = 17, 30, 7.5
    # the point seen at the centre of pixel (17, 30) at z-depth 7.5
    p_cam = np.array([(i + 0.5 - cam.cx) / cam.fl_x * z, (j + 0.5 - cam.cy) / cam.fl_y * z, z])
    p_world = c2w[:3, :3] @ p_cam + c2w[:3, 3]
    o, d, zs = camera_rays(cam, c2w, torch.tensor([[i, j]]))
    t = float((torch.tensor(p_world, dtype=torch.float32) - o[0]) @ d[0])
    closest = o[0] + t * d[0]
    assert torch.allclose(closest, torch.tensor(p_world, dtype=torch.float32), atol=1e-4)
    assert math.isclose(t * float(zs[0]), z, rel_tol=1e-5)
    assert math.isclose(float(d[0].norm()), 1.0, rel_tol=1e-6)
    # full-image ray order is row-major: pixel (17, 30) is ray 30 * W + 17
    _, d_all, _ = camera_rays(cam, c2w)
    torch.testing.assert_close(d_all[30 * 64 + 17], d[0])


def test_undistortion_inverts_the_opencv_model():
    cam = Camera(width=10, height=10, fl_x=10, fl_y=10, cx=5, cy=5, camera_model="OPENCV",
                 k1=-0.12, k2=0.03, p1=0.001, p2=-0.002)
    x = torch.tensor([0.1, -0.3, 0.25], dtype=torch.float64)
    y = torch.tensor([0.2, 0.1, -0.35], dtype=torch.float64)
    r2 = x * x + y * y
    radial = 1 + cam.k1 * r2 + cam.k2 * r2 * r2
    xd = x * radial + 2 * cam.p1 * x * y + cam.p2 * (r2 + 2 * x * x)
    yd = y * radial + cam.p1 * (r2 + 2 * y * y) + 2 * cam.p2 * x * y
    xu, yu = undistort_normalized(cam, xd, yd, iters=30)
    torch.testing.assert_close(xu, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(yu, y, atol=1e-9, rtol=0)


def test_fisheye_is_refused():
    cam = Camera(width=4, height=4, fl_x=4, fl_y=4, cx=2, cy=2, camera_model="OPENCV_FISHEYE", k1=0.1)
    with pytest.raises(CitygenError):
        camera_rays(cam, np.eye(4))


def test_ray_box_intersection_closed_form():
    aabb = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 6.0]])
    o = torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, 10.0], [1.0, 1.0, 1.0], [-1.0, 10.0, 1.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    tn, tf, hit = intersect_aabb(o, d, aabb)
    torch.testing.assert_close(tn[:3], torch.tensor([1.0, 4.0, 0.0]))
    torch.testing.assert_close(tf[:3], torch.tensor([3.0, 10.0, 3.0]))
    assert hit.tolist() == [True, True, True, False]


def vertical_rays(n=4, height=20.0):
    o = torch.tensor([[2.0 + 0.5 * i, 3.0, height] for i in range(n)])
    return o, torch.tensor([[0.0, 0.0, -1.0]]).expand(n, 3).contiguous()


def test_constant_density_slab_accumulation():
    # Density 0.3 fills the whole box (z 0..5): a vertical ray crosses L = 5 m of it.
    sigma, length = 0.3, 5.0
    f = AnalyticField([[0, 0, 0], [10, 10, length]], [((0, 0, 0), (10, 10, length))], sigma=sigma)
    o, d = vertical_rays()
    out = render_rays(f, o, d, torch.zeros(1), step_size=0.05, segment=16, min_transmittance=0.0)
    expected = 1 - math.exp(-sigma * length)
    torch.testing.assert_close(out["acc"], torch.full((4,), expected), atol=1e-5, rtol=0)
    # colour is the box colour times the opacity (black background)
    torch.testing.assert_close(out["rgb"], torch.tensor([1.0, 0.5, 0.25]).expand(4, 3) * expected, atol=1e-5, rtol=0)
    # expected depth of a homogeneous slab entered at distance 15: 15 + (1/s - L e^{-sL}/(1 - e^{-sL}))
    mean_t = 1 / sigma - length * math.exp(-sigma * length) / (1 - math.exp(-sigma * length))
    torch.testing.assert_close(out["depth"], torch.full((4,), 15.0 + mean_t), atol=2e-2, rtol=0)


def test_depth_of_an_opaque_wall_is_its_z_distance():
    # An opaque wall at x >= 6 seen by a camera at x = 0 looking along +x, and obliquely.
    f = AnalyticField([[0, -10, -10], [10, 10, 10]], [((6, -10, -10), (10, 10, 10))], sigma=1e4)
    step = 0.02
    o = torch.zeros(2, 3)
    d = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0]]), dim=-1)
    z_scale = d[:, 0]  # camera looking along +x: cos(angle to the axis)
    out = render_rays(f, o, d, torch.zeros(1), step_size=step, z_scale=z_scale)
    torch.testing.assert_close(out["acc"], torch.ones(2), atol=1e-4, rtol=0)
    assert torch.all((out["depth"] - 6.0).abs() <= step)
    # early termination: marching stops within the segment that reaches the wall, far
    # short of the box's far side (10 m away)
    steps_to_wall = torch.ceil(6.0 / (z_scale * step))
    assert float(out["n_samples"]) <= float((steps_to_wall + 64).sum())
    assert float(out["n_samples"]) < float((10.0 / (z_scale * step)).sum()) * 0.8


def test_segments_are_exact_in_value_and_gradient():
    f = AnalyticField([[0, 0, 0], [10, 10, 6]], [((0, 0, 1), (10, 10, 2)), ((0, 0, 3), (10, 10, 4.5))],
                      sigma=0.7, colors=[[0.2, 0.9, 0.1], [0.9, 0.1, 0.4]])
    o, d = vertical_rays()
    results = []
    for segment in (3, 1000):
        f.scale.grad = None
        out = render_rays(f, o, d, torch.zeros(1), step_size=0.1, segment=segment, min_transmittance=0.0)
        (out["rgb"].sum() + out["depth"].sum()).backward()
        results.append((out["rgb"].detach(), out["depth"].detach(), f.scale.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_occupancy_skipping_gives_the_same_image():
    # Two boxes in a mostly empty 16^3 m volume; boxes are aligned to the 16^3 grid's cells so
    # that every occupied cell is fully inside a box (no sampling luck involved).
    aabb = [[0, 0, 0], [16, 16, 16]]
    boxes = [((2, 2, 0), (6, 8, 5)), ((10, 9, 0), (14, 13, 9))]
    f = AnalyticField(aabb, boxes, sigma=2.0, colors=[[0.9, 0.2, 0.2], [0.1, 0.3, 0.9]])
    grid = OccupancyGrid(f.aabb, 16)
    grid.update(lambda x: f.density(x)[0], step_size=0.1, n_samples=None, generator=torch.Generator().manual_seed(0))
    assert 0.0 < grid.occupied_fraction() < 0.2
    cam = Camera(width=24, height=18, fl_x=20.0, fl_y=20.0, cx=12.0, cy=9.0)
    c2w = np.eye(4)
    c2w[:3, :3] = np.array([[1.0, 0.0, 0.0], [0.0, -0.8, 0.6], [0.0, -0.6, -0.8]])  # looking north and down
    c2w[:3, 3] = [8.0, -6.0, 30.0]
    o, d, zs = camera_rays(cam, c2w)
    with torch.no_grad():
        full = render_rays(f, o, d, torch.zeros(1), step_size=0.1, z_scale=zs)
        fast = render_rays(f, o, d, torch.zeros(1), step_size=0.1, z_scale=zs, occupancy=grid)
    assert float(full["acc"].max()) > 0.99 and float(full["acc"].min()) < 0.01  # boxes and empty space in view
    torch.testing.assert_close(fast["rgb"], full["rgb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast["acc"], full["acc"], atol=1e-5, rtol=0)
    assert float(fast["n_samples"]) < 0.5 * float(full["n_samples"])


def test_occupancy_grid_ema_and_threshold():
    grid = OccupancyGrid(torch.tensor([[0.0, 0, 0], [1, 1, 1]]), 4)
    assert grid.occupied.all()  # starts fully occupied
    grid.update(lambda x: torch.where(x[:, 0] < 0.25, 10.0, 0.0), step_size=0.01, alpha_threshold=0.01, decay=0.5)
    assert grid.occupied_fraction() == pytest.approx(0.25)
    # The content moves to x > 0.75: the old cells decay 10 -> 5 -> 2.5 -> 1.25 -> 0.625 and
    # drop below the threshold (0.01 / 0.01 = 1 per metre) after the 4th refresh.
    moved = lambda x: torch.where(x[:, 0] > 0.75, 10.0, 0.0)
    for k in range(4):
        assert grid.occupied[: 16].all()  # cells with x index 0 still occupied
        grid.update(moved, step_size=0.01, alpha_threshold=0.01, decay=0.5)
    assert not grid.occupied[:16].any() and grid.occupied[48:].all()
    assert grid.occupied_fraction() == pytest.approx(0.25)
