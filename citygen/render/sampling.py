"""Camera rays and ray-box intersection.

Rays come from :mod:`citygen.cameras` (the one camera model: pixel centres at ``+0.5``,
OpenCV poses, lens distortion); ``camera_rays`` and ``pixel_grid`` keep their names here for
the renderers.  Directions are unit length; ``z_scale`` is the cosine between a ray and the
optical axis, so a distance ``t`` along the ray is a z-depth of ``t * z_scale``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from survey_io import Camera

from ..cameras import UNDISTORT_ITERS, pixel_grid, rays, undistort

__all__ = ["camera_rays", "intersect_aabb", "look_at", "pixel_grid", "undistort_normalized"]


def undistort_normalized(camera: Camera, xd: Tensor, yd: Tensor, iters: int = UNDISTORT_ITERS) -> tuple[Tensor, Tensor]:
    """Invert the camera's lens model on normalised image coordinates (``citygen.cameras.undistort``)."""
    return undistort(camera, xd, yd, iters)


def camera_rays(camera: Camera, c2w: np.ndarray | Tensor, pixels: Tensor | None = None,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """World-space rays through pixel centres: :func:`citygen.cameras.rays` (the one ray generator).

    Returns origins (N, 3), unit directions (N, 3), z_scale (N,) = direction . optical axis.
    """
    return rays(camera, c2w, pixels, device=device)


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
