"""Camera rays and ray-box intersection.

Rays come from a :class:`survey_io.Camera` and an OpenCV camera-to-world pose (x right,
y down, z forward).  Pixel ``(i, j)`` (column, row) has its centre at ``(i + 0.5, j + 0.5)``.
Directions are unit length; ``z_scale`` is the cosine between a ray and the optical axis,
so a distance ``t`` along the ray is a z-depth of ``t * z_scale`` (what depth maps store).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from survey_io import Camera

from ..errors import CitygenError

_RADIAL_MODELS = ("OPENCV", "SIMPLE_RADIAL", "RADIAL")


def pixel_grid(camera: Camera, device: torch.device | str = "cpu") -> Tensor:
    """(H*W, 2) pixel coordinates (column, row) of every pixel, row-major."""
    j, i = torch.meshgrid(torch.arange(camera.height, device=device), torch.arange(camera.width, device=device),
                          indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1)], dim=-1)


def undistort_normalized(camera: Camera, xd: Tensor, yd: Tensor, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Invert the OpenCV radial-tangential model on normalised image coordinates (fixed point)."""
    k1, k2, k3, p1, p2 = camera.k1, camera.k2, camera.k3, camera.p1, camera.p2
    x, y = xd.clone(), yd.clone()
    for _ in range(iters):
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x = (xd - dx) / radial
        y = (yd - dy) / radial
    return x, y


def camera_rays(camera: Camera, c2w: np.ndarray | Tensor, pixels: Tensor | None = None,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """World-space rays through pixel centres.

    Args:
        camera: intrinsics (pinhole, or OpenCV radial-tangential distortion).
        c2w: 4x4 (or 3x4) OpenCV camera-to-world in the local frame.
        pixels: (N, 2) integer or float pixel coordinates (column, row); None = every pixel, row-major.

    Returns:
        origins (N, 3), unit directions (N, 3), z_scale (N,) = direction . optical axis.
    """
    if camera.camera_model == "OPENCV_FISHEYE":
        raise CitygenError(None, "rays: OPENCV_FISHEYE cameras are not supported by the reference renderer; "
                                 "undistort the images first")
    if pixels is None:
        pixels = pixel_grid(camera, device)
    pixels = pixels.to(device=device, dtype=torch.float64)
    x = (pixels[:, 0] + 0.5 - camera.cx) / camera.fl_x
    y = (pixels[:, 1] + 0.5 - camera.cy) / camera.fl_y
    if camera.has_distortion and camera.camera_model in _RADIAL_MODELS + ("PINHOLE",):
        x, y = undistort_normalized(camera, x, y)
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    d_cam = d_cam / torch.linalg.norm(d_cam, dim=-1, keepdim=True)
    m = torch.as_tensor(np.asarray(c2w, dtype=np.float64) if not isinstance(c2w, Tensor) else c2w,
                        dtype=torch.float64, device=device)
    dirs = d_cam @ m[:3, :3].T
    origins = m[:3, 3].expand_as(dirs)
    return origins.float().contiguous(), dirs.float().contiguous(), d_cam[:, 2].float().contiguous()


def intersect_aabb(origins: Tensor, dirs: Tensor, aabb: Tensor, near: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays against an axis-aligned box.

    Args:
        origins, dirs: (N, 3) rays.
        aabb: (2, 3) min and max corners.
        near: rays start no closer than this distance.

    Returns:
        t_near (N,), t_far (N,), hit (N,) bool (the ray meets the box beyond ``near``).
    """
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far, t_far > t_near


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world (x right, y down, z forward) at ``eye`` looking at ``target``.

    Image-up follows ``up`` (+Z: the horizon stays level); looking straight along ``up`` the
    image's x axis points east, so nadir views have north at the top.
    """
    eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, np.cross(z, x), z, eye
    return m
