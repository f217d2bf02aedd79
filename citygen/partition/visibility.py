"""Which ground each image sees: view frusta intersected with the ground, and 2-D tests.

An image's footprint is found by casting a grid of pixel rays -- ``(nx+1) x (ny+1)`` rays
from pixel edge to pixel edge, so the four image corners are among them -- and meeting
them with the :class:`GroundModel`.  Two things come out per image:

* the border polygon: the rays along the image border in order, on the ground.  On a
  plane, with every ray hitting within the clip distance, it is exactly the frustum's
  footprint (a central projection maps the image's straight edges to straight lines);
* the ground quads between neighbouring rays, with their areas and centres.  The area of
  footprint falling inside a rectangle is estimated as the summed area of the quads whose
  centres lie in it (exact in the limit of a fine ray grid; good to a quad on the edges).

Ray directions come from the camera model (``citygen.cameras``), lens included, so a
distorted image's border rays follow its curved edges.
All functions are vectorised over images (and image/rectangle pairs) with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from survey_io import Camera, Survey

from ..cameras import pixel_directions
from .ground import GroundModel


@dataclass
class Footprints:
    """Ground footprints of ``N`` images (local frame).

    Attributes:
        names: image names, in survey order.
        positions: (N, 3) camera centres.
        polygons: (N, K, 2) footprint border polygons, K = 2 (nx + ny).
        quad_centres: (N, Q, 2) centres of the ground quads between neighbouring rays, Q = nx ny.
        quad_areas: (N, Q) their areas, m^2.
        valid: (N,) the image sees the ground at all (some ray points below the horizon).
    """

    names: list[str]
    positions: np.ndarray
    polygons: np.ndarray
    quad_centres: np.ndarray
    quad_areas: np.ndarray
    valid: np.ndarray

    @property
    def bboxes(self) -> np.ndarray:
        """(N, 4) x_min, y_min, x_max, y_max of each polygon."""
        return np.concatenate([self.polygons.min(axis=1), self.polygons.max(axis=1)], axis=1)

    @property
    def areas(self) -> np.ndarray:
        """(N,) footprint areas (sum of the quads)."""
        return self.quad_areas.sum(axis=1)


def pixel_grid(camera: Camera, nx: int, ny: int) -> np.ndarray:
    """(ny+1, nx+1, 2) pixel coordinates (u, v) from edge to edge of the image."""
    u = np.linspace(0.0, camera.width, nx + 1)
    v = np.linspace(0.0, camera.height, ny + 1)
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu, vv], axis=-1)


def camera_rays(camera: Camera, nx: int, ny: int) -> np.ndarray:
    """(ny+1, nx+1, 3) ray directions in the camera frame (OpenCV: x right, y down, z forward)."""
    uv = pixel_grid(camera, nx, ny)
    return pixel_directions(camera, uv[..., 0], uv[..., 1])


def border_indices(nx: int, ny: int) -> np.ndarray:
    """Flat indices into a (ny+1, nx+1) grid walking its border once, corner to corner."""
    idx = np.arange((ny + 1) * (nx + 1)).reshape(ny + 1, nx + 1)
    return np.concatenate([idx[0, :-1], idx[:-1, -1], idx[-1, :0:-1], idx[:0:-1, 0]])


def compute_footprints(survey: Survey, ground: GroundModel, grid: tuple[int, int] = (8, 6),
                       max_dist: float = 1500.0, images=None, chunk: int = 4096) -> Footprints:
    """Footprints of ``images`` (default: all of the survey's) on ``ground``.

    Args:
        grid: (nx, ny) cells of the pixel ray grid.
        max_dist: horizontal clip distance of the rays, metres.
        chunk: images per vectorised batch (bounds memory: chunk x (nx+1)(ny+1) rays).
    """
    images = survey.images if images is None else images
    nx, ny = grid
    n = len(images)
    n_rays = (nx + 1) * (ny + 1)
    border = border_indices(nx, ny)
    pts_all = np.empty((n, ny + 1, nx + 1, 2))
    valid = np.zeros(n, dtype=bool)
    c2w = np.stack([im.c2w for im in images]) if n else np.zeros((0, 4, 4))
    cam_ids = np.array([im.camera for im in images], dtype=np.int64)
    for cam_id in np.unique(cam_ids):
        rays_cam = camera_rays(survey.cameras[cam_id], nx, ny).reshape(-1, 3)
        sel = np.flatnonzero(cam_ids == cam_id)
        for start in range(0, len(sel), chunk):
            idx = sel[start:start + chunk]
            R = c2w[idx, :3, :3]
            dirs = np.einsum("nij,rj->nri", R, rays_cam)
            origins = np.broadcast_to(c2w[idx, None, :3, 3], dirs.shape)
            pts, hit = ground.intersect(origins.reshape(-1, 3), dirs.reshape(-1, 3), max_dist)
            pts_all[idx] = pts[:, :2].reshape(len(idx), ny + 1, nx + 1, 2)
            valid[idx] = hit.reshape(len(idx), n_rays).any(axis=1)
    p00 = pts_all[:, :-1, :-1]
    p01 = pts_all[:, :-1, 1:]
    p11 = pts_all[:, 1:, 1:]
    p10 = pts_all[:, 1:, :-1]
    quads = np.stack([p00, p01, p11, p10], axis=-2).reshape(n, nx * ny, 4, 2)
    return Footprints(
        names=[im.name for im in images],
        positions=c2w[:, :3, 3].copy(),
        polygons=pts_all.reshape(n, n_rays, 2)[:, border],
        quad_centres=quads.mean(axis=-2),
        quad_areas=np.abs(polygon_areas(quads)),
        valid=valid,
    )


# -- 2-D geometry (vectorised) -------------------------------------------------------------
def polygon_areas(polys: np.ndarray) -> np.ndarray:
    """Signed shoelace areas of polygons (..., K, 2); counter-clockwise is positive."""
    x, y = polys[..., 0], polys[..., 1]
    return 0.5 * np.sum(x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y, axis=-1)


def points_in_polygons(points: np.ndarray, polys: np.ndarray) -> np.ndarray:
    """Crossing-number test: (M, C, 2) points against (M, K, 2) polygons -> (M, C) bool."""
    x0 = polys[:, None, :, 0]
    y0 = polys[:, None, :, 1]
    x1 = np.roll(polys[..., 0], -1, axis=-1)[:, None, :]
    y1 = np.roll(polys[..., 1], -1, axis=-1)[:, None, :]
    px = points[:, :, None, 0]
    py = points[:, :, None, 1]
    straddles = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    crossings = straddles & (px < x_cross)
    return (crossings.sum(axis=-1) % 2) == 1


def polygons_meet_rects(polys: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Whether polygon ``i`` and axis-aligned rectangle ``i`` share area: (M, K, 2), (M, 4) -> (M,).

    They meet when an edge of the polygon passes through the rectangle (Liang-Barsky clipping
    of each edge; covers polygon vertices inside it) or the rectangle lies wholly inside the
    polygon (then its centre does).
    """
    p0 = polys
    d = np.roll(polys, -1, axis=1) - p0
    lo = rects[:, None, :2]
    hi = rects[:, None, 2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        ta = (lo - p0) / d
        tb = (hi - p0) / d
    inside_slab = (p0 >= lo) & (p0 <= hi)
    flat = d == 0
    t_in = np.where(flat, np.where(inside_slab, -np.inf, np.inf), np.minimum(ta, tb))
    t_out = np.where(flat, np.where(inside_slab, np.inf, -np.inf), np.maximum(ta, tb))
    enter = np.maximum(np.max(t_in, axis=-1), 0.0)
    leave = np.minimum(np.min(t_out, axis=-1), 1.0)
    edge_hits = (enter <= leave).any(axis=1)
    centres = 0.5 * (rects[:, None, :2] + rects[:, None, 2:])
    return edge_hits | points_in_polygons(centres, polys)[:, 0]


def area_in_rects(centres: np.ndarray, areas: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Footprint area inside rectangles: (M, Q, 2) quad centres, (M, Q) areas, (M, 4) -> (M,)."""
    inside = ((centres[..., 0] >= rects[:, None, 0]) & (centres[..., 0] < rects[:, None, 2])
              & (centres[..., 1] >= rects[:, None, 1]) & (centres[..., 1] < rects[:, None, 3]))
    return np.sum(areas * inside, axis=1)
