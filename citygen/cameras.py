"""The camera model: the one place where pixels become rays and points become pixels.

Every ray in citygen comes from here (renderers, training batches, partition footprints,
seam metrics, the viewer's bands and picks), so lens distortion, the pixel-centre
convention and the pose convention are applied the same way everywhere (as nerfstudio's
``cameras/cameras.py`` does for nerfstudio).  The module sits at the bottom of citygen: it
imports the intrinsics dataclass :class:`survey_io.Camera` and nothing of citygen but its
errors.

Conventions:

- Pixel ``(i, j)`` (column, row) spans ``[i, i+1) x [j, j+1)``; its centre is
  ``(i + 0.5, j + 0.5)`` (nerfstudio's and COLMAP's principal point convention, so
  intrinsics pass through unchanged).
- Camera-to-world poses are 4x4 OpenCV (x right, y down, z forward) inside the code;
  :func:`opencv_to_opengl` / :func:`opengl_to_opencv` convert for nerfstudio files and the
  viewer's GL side (x right, y up, z backward).
- Normalised image coordinates ``(x, y)`` are the undistorted ``X/Z, Y/Z`` of the camera
  frame.  Distortion models (nerfstudio field names): ``PINHOLE``, ``SIMPLE_PINHOLE``,
  ``OPENCV``/``SIMPLE_RADIAL``/``RADIAL`` (radial ``k1..k4`` as a polynomial in r^2, as
  nerfstudio reads ``transforms.json``, plus tangential ``p1, p2``; COLMAP's SIMPLE_RADIAL
  and RADIAL are its special cases) and ``OPENCV_FISHEYE`` (equidistant, ``k1..k4`` on the
  angle).  Undistortion is a fixed-point iteration, as in COLMAP and OpenCV.
- A ray's ``z_scale`` is the cosine between it and the optical axis: a distance ``t`` along
  the unit direction is a z-depth of ``t * z_scale`` (what depth maps store).

Functions take numpy arrays or torch tensors and answer in kind (float64 in, float64
out), except :func:`rays` and :class:`CameraSet`, which return float32 torch tensors for
the renderers.  A camera without distortion coefficients skips the lens model entirely, so
pinhole rays are exactly ``((u - cx) / fx, (v - cy) / fy, 1)`` normalised.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from survey_io import Camera
from survey_io.nerfstudio import CV_TO_GL

from .errors import CitygenError

#: OpenCV <-> OpenGL camera axes (flip y and z); its own inverse.  Owned by survey_io's
#: transforms.json reader, shared here so that there is one flip in the code base.
OPENCV_TO_OPENGL = CV_TO_GL
#: Fixed-point iterations of the undistortion.  Each one shrinks the error by about the
#: model's local slope (|2 k1 r^2| for radial): 20 reach 1e-12 on aerial lenses
#: (|k1| <= 0.3 within the image) and cost little next to the field.
UNDISTORT_ITERS = 20
FISHEYE = "OPENCV_FISHEYE"
#: models whose lens is the radial-tangential polynomial (the pinholes when coefficients are set)
RADIAL_TANGENTIAL = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "SIMPLE_RADIAL", "RADIAL")


# -- array helpers: the same code for numpy arrays and torch tensors -----------------------
def _is_torch(a) -> bool:
    return isinstance(a, Tensor)


def _stack(parts, a):
    return torch.stack(parts, dim=-1) if _is_torch(a) else np.stack(parts, axis=-1)


def _norm(a):
    return torch.linalg.norm(a, dim=-1, keepdim=True) if _is_torch(a) else np.linalg.norm(a, axis=-1, keepdims=True)


def _matrix(c2w, like):
    """``c2w`` as float64 of ``like``'s kind (torch on its device, or numpy)."""
    if _is_torch(like):
        return torch.as_tensor(np.asarray(c2w, np.float64) if not _is_torch(c2w) else c2w,
                               dtype=torch.float64, device=like.device)
    return np.asarray(c2w.detach().cpu() if _is_torch(c2w) else c2w, np.float64)


# -- pose conventions -----------------------------------------------------------------------
def opencv_to_opengl(c2w):
    """OpenCV camera-to-world (x right, y down, z forward) -> OpenGL (x right, y up, z back)."""
    return np.asarray(c2w, np.float64) @ OPENCV_TO_OPENGL


def opengl_to_opencv(c2w):
    """OpenGL camera-to-world -> OpenCV (the flip is its own inverse)."""
    return np.asarray(c2w, np.float64) @ OPENCV_TO_OPENGL


def world_to_opengl_view(c2w) -> np.ndarray:
    """World -> OpenGL camera matrix (a GL view matrix) from an OpenCV camera-to-world."""
    return OPENCV_TO_OPENGL @ np.linalg.inv(np.asarray(c2w, np.float64))


# -- lens models on normalised coordinates --------------------------------------------------
def _coeffs(camera):
    return camera.k1, camera.k2, camera.k3, camera.k4, camera.p1, camera.p2


def has_lens(camera: Camera) -> bool:
    """Whether the lens model changes anything (any distortion coefficient, or a fisheye)."""
    return camera.camera_model == FISHEYE or camera.has_distortion


def _distort_radial(k, x, y):
    k1, k2, k3, k4, p1, p2 = k
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
    dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return x * radial + dx, y * radial + dy


def _undistort_radial(k, xd, yd, iters):
    k1, k2, k3, k4, p1, p2 = k
    x, y = xd + 0.0, yd + 0.0  # a copy of either kind
    for _ in range(iters):
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x = (xd - dx) / radial
        y = (yd - dy) / radial
    return x, y


def _atan(a):
    return torch.atan(a) if _is_torch(a) else np.arctan(a)


def _tan(a):
    return torch.tan(a) if _is_torch(a) else np.tan(a)


def _sqrt(a):
    return torch.sqrt(a) if _is_torch(a) else np.sqrt(a)


def _fisheye_poly(k, theta):
    k1, k2, k3, k4 = k[:4]
    t2 = theta * theta
    return 1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))


def _distort_fisheye(k, x, y):
    r = _sqrt(x * x + y * y)
    theta = _atan(r)
    # theta_d / r -> 1 as r -> 0 (the centre pixel stays put)
    safe = r > 1e-12
    r_safe = r * safe + (1 - 1 * safe)
    scale = (theta * _fisheye_poly(k, theta) / r_safe) * safe + (1 - 1 * safe)
    return x * scale, y * scale


def _undistort_fisheye(k, xd, yd, iters):
    rd = _sqrt(xd * xd + yd * yd)
    theta = rd + 0.0
    for _ in range(iters):  # theta_d = theta * poly(theta), solved for theta by fixed point
        theta = rd / _fisheye_poly(k, theta)
    safe = rd > 1e-12
    rd_safe = rd * safe + (1 - 1 * safe)
    scale = (_tan(theta) / rd_safe) * safe + (1 - 1 * safe)
    return xd * scale, yd * scale


def distort(camera: Camera, x, y):
    """Undistorted normalised coordinates -> distorted normalised coordinates."""
    if not has_lens(camera):
        return x, y
    if camera.camera_model == FISHEYE:
        return _distort_fisheye(_coeffs(camera), x, y)
    return _distort_radial(_coeffs(camera), x, y)


def undistort(camera: Camera, xd, yd, iters: int = UNDISTORT_ITERS):
    """Distorted normalised coordinates -> undistorted ones (fixed-point inverse of :func:`distort`)."""
    if not has_lens(camera):
        return xd, yd
    if camera.camera_model == FISHEYE:
        return _undistort_fisheye(_coeffs(camera), xd, yd, iters)
    return _undistort_radial(_coeffs(camera), xd, yd, iters)


# -- pixels <-> camera frame ----------------------------------------------------------------
def pixel_to_normalized(camera: Camera, u, v):
    """Continuous pixel positions (u, v) (pixel centres at +0.5) -> undistorted (x, y)."""
    x = (u - camera.cx) / camera.fl_x
    y = (v - camera.cy) / camera.fl_y
    return undistort(camera, x, y)


def normalized_to_pixel(camera: Camera, x, y):
    """Undistorted normalised coordinates -> continuous pixel positions (u, v)."""
    xd, yd = distort(camera, x, y)
    return camera.fl_x * xd + camera.cx, camera.fl_y * yd + camera.cy


def pixel_directions(camera: Camera, u, v):
    """(..., 3) camera-frame directions ``(x, y, 1)`` (not unit) through pixel positions (u, v)."""
    x, y = pixel_to_normalized(camera, u, v)
    one = torch.ones_like(x) if _is_torch(x) else np.ones_like(x)
    return _stack([x, y, one], x)


def pixel_centres(pixels):
    """(N, 2) integer pixel indices (column, row) -> continuous centres (u, v), float64."""
    if _is_torch(pixels):
        p = pixels.to(torch.float64)
    else:
        p = np.asarray(pixels, np.float64)
    return p[..., 0] + 0.5, p[..., 1] + 0.5


def unproject(camera: Camera, c2w, u, v, z):
    """World points (..., 3) at z-depth ``z`` seen at pixel positions (u, v)."""
    x, y = pixel_to_normalized(camera, u, v)
    pts = _stack([x * z, y * z, z + 0.0 * x], x)
    m = _matrix(c2w, pts)
    return pts @ m[:3, :3].T + m[:3, 3]


def project(camera: Camera, c2w, points):
    """World points (N, 3) -> continuous pixel positions (N, 2) and z-depths (N,).

    Points at or behind the camera plane give non-finite or mirrored positions; callers test ``z``."""
    m = _matrix(c2w, points)
    p = (points - m[:3, 3]) @ m[:3, :3]  # rigid pose: R^T (X - t)
    z = p[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = normalized_to_pixel(camera, p[..., 0] / z, p[..., 1] / z)
    return _stack([u, v], u), z


def view_bounds(camera: Camera, samples: int = 64) -> tuple[float, float, float, float]:
    """Undistorted slopes (x_lo, x_hi, y_lo, y_hi) that bound the image: x/z and y/z of every
    point of the image lie inside (the edge values for a pinhole; otherwise the bounding box
    of a densely sampled undistorted border, widened by the sample spacing)."""
    if not has_lens(camera):
        x_lo, x_hi = -camera.cx / camera.fl_x, (camera.width - camera.cx) / camera.fl_x
        y_lo, y_hi = -camera.cy / camera.fl_y, (camera.height - camera.cy) / camera.fl_y
        return x_lo, x_hi, y_lo, y_hi
    t = np.linspace(0.0, 1.0, samples + 1)
    W, H = float(camera.width), float(camera.height)
    u = np.concatenate([t * W, np.full_like(t, W), t * W, np.zeros_like(t)])
    v = np.concatenate([np.zeros_like(t), t * H, np.full_like(t, H), t * H])
    x, y = pixel_to_normalized(camera, u, v)
    # an edge's extreme may fall between two samples; its bulge past them is far below the
    # distance between neighbouring samples, so widening by that keeps the bounds conservative
    pad = float(np.max(np.hypot(np.diff(x), np.diff(y))))
    return float(x.min()) - pad, float(x.max()) + pad, float(y.min()) - pad, float(y.max()) + pad


# -- rays ------------------------------------------------------------------------------------
def _check_rays(camera: Camera, user: str = "the reference renderer") -> None:
    # The lens model handles fisheyes (distort/undistort/project), but rays past 90 degrees
    # from the axis have no z-depth and the renderers' z_scale assumes z > 0; keep the
    # refusal the renderers and trainer have always given until that is designed.
    if camera.camera_model == FISHEYE:
        raise CitygenError(None, f"rays: OPENCV_FISHEYE cameras are not supported by {user}; "
                                 "undistort the images first")


def world_rays(camera: Camera, c2w, u, v):
    """World rays through pixel positions (u, v), float64 of the input's kind.

    Returns origins (N, 3), unit directions (N, 3), z_scale (N,) = direction . optical axis."""
    _check_rays(camera)
    d_cam = pixel_directions(camera, u, v)
    d_cam = d_cam / _norm(d_cam)
    m = _matrix(c2w, d_cam)
    dirs = d_cam @ m[:3, :3].T
    if _is_torch(dirs):
        origins = m[:3, 3].expand_as(dirs)
    else:
        origins = np.broadcast_to(m[:3, 3], dirs.shape).copy()
    return origins, dirs, d_cam[..., 2]


def pixel_grid(camera: Camera, device: torch.device | str = "cpu") -> Tensor:
    """(H*W, 2) pixel indices (column, row) of every pixel, row-major."""
    j, i = torch.meshgrid(torch.arange(camera.height, device=device), torch.arange(camera.width, device=device),
                          indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1)], dim=-1)


def rays(camera: Camera, c2w: np.ndarray | Tensor, pixels: Tensor | None = None,
         device: torch.device | str = "cpu", downscale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """World-space rays through pixel centres, float32 torch (the renderers' input).

    Args:
        camera: intrinsics and lens.
        c2w: 4x4 (or 3x4) OpenCV camera-to-world in the local frame.
        pixels: (N, 2) integer or float pixel indices (column, row) of the (downscaled) image;
            None = every pixel, row-major.
        downscale: render the image ``downscale`` times smaller (``camera.scaled(1 / downscale)``).

    Returns:
        origins (N, 3), unit directions (N, 3), z_scale (N,) = direction . optical axis.
    """
    _check_rays(camera)
    if downscale != 1.0:
        camera = camera.scaled(1.0 / downscale)
    if pixels is None:
        pixels = pixel_grid(camera, device)
    u, v = pixel_centres(pixels.to(device=device))
    o, d, z = world_rays(camera, c2w, u, v)
    return o.float().contiguous(), d.float().contiguous(), z.float().contiguous()


class CameraSet:
    """The intrinsics and poses of many images as tensors, for rays of scattered pixels
    (training batches: every ray may come from a different image).

    Args:
        cameras: one :class:`survey_io.Camera` per image.
        c2w: (N, 4, 4) OpenCV camera-to-world per image.
        user: who asks, for the message refusing a camera that has no rays (a fisheye).
    """

    def __init__(self, cameras: list[Camera], c2w, device: torch.device | str = "cpu", user: str = "the trainer"):
        for cam in cameras:
            _check_rays(cam, user)
        self.device = torch.device(device)
        rows = [[c.fl_x, c.fl_y, c.cx, c.cy, c.width, c.height, *_coeffs(c)] for c in cameras]
        self.params = torch.tensor(rows, dtype=torch.float64, device=self.device).reshape(-1, 12)
        self.c2w = torch.as_tensor(np.asarray(c2w, np.float64), dtype=torch.float64, device=self.device)
        self.distorted = any(has_lens(c) for c in cameras)

    @property
    def widths(self) -> Tensor:
        return self.params[:, 4].long()

    def rays(self, image: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rays of pixel indices ``pixels`` (R, 2) (column, row) of images ``image`` (R,),
        float32: origins (R, 3), unit directions (R, 3), z_scale (R,)."""
        p = self.params[image]
        u, v = pixel_centres(pixels)
        x = (u - p[:, 2]) / p[:, 0]
        y = (v - p[:, 3]) / p[:, 1]
        if self.distorted:  # per-ray coefficients; a pinhole's zeros leave x, y unchanged
            x, y = _undistort_radial(tuple(p[:, 6 + k] for k in range(6)), x, y, UNDISTORT_ITERS)
        d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
        d_cam = d_cam / torch.linalg.norm(d_cam, dim=-1, keepdim=True)
        m = self.c2w[image]
        dirs = torch.einsum("rij,rj->ri", m[:, :3, :3], d_cam)
        return m[:, :3, 3].float(), dirs.float(), d_cam[:, 2].float()


__all__ = ["OPENCV_TO_OPENGL", "UNDISTORT_ITERS", "CameraSet", "distort", "has_lens", "normalized_to_pixel",
           "opencv_to_opengl", "opengl_to_opencv", "pixel_centres", "pixel_directions", "pixel_grid",
           "pixel_to_normalized", "project", "rays", "undistort", "unproject", "view_bounds", "world_rays",
           "world_to_opengl_view"]
