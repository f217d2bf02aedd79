"""Virtual cameras over a scene for exports that need views (TSDF meshes, view point clouds).

A small aerial "flight" over the bounds: at each point of a grid, one nadir view and four
45-degree obliques (looking north, east, south, west), so facades are seen from every side.
"""

from __future__ import annotations

import math

import numpy as np

from survey_io import Camera

from ..render.sampling import look_at


def aerial_views(bounds: np.ndarray, gsd: float, image_size: int = 256, fov_deg: float = 60.0,
                 overlap: float = 0.5, obliques: bool = True) -> list[tuple[Camera, np.ndarray]]:
    """Cameras flying over ``bounds`` ((2, 3) local min/max) whose nadir pixel covers about
    ``gsd`` metres on the highest surface.

    Args:
        gsd: target ground size of a nadir pixel at the top of the scene, metres.
        image_size: square image side, pixels.
        fov_deg: field of view.
        overlap: fraction of a nadir footprint shared by neighbouring grid positions.
        obliques: add the four 45-degree views at every grid position.
    """
    bounds = np.asarray(bounds, np.float64)
    f = image_size / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    cam = Camera(width=image_size, height=image_size, fl_x=f, fl_y=f, cx=image_size / 2, cy=image_size / 2)
    height = gsd * f                          # above the top surface: a pixel spans gsd there
    footprint = image_size * gsd
    spacing = max(footprint * (1.0 - overlap), 1e-3)
    z_eye = bounds[1, 2] + height

    def axis(lo, hi):
        n = max(1, math.ceil((hi - lo) / spacing))
        return lo + (np.arange(n) + 0.5) * (hi - lo) / n

    views = []
    ground = 0.5 * (bounds[0, 2] + bounds[1, 2])
    for y in axis(bounds[0, 1], bounds[1, 1]):
        for x in axis(bounds[0, 0], bounds[1, 0]):
            views.append((cam, look_at((x, y, z_eye), (x, y, ground))))
            if obliques:
                reach = z_eye - ground            # 45 degrees: as far out as up
                for dx, dy in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                    eye = (x - dx * reach / 2, y - dy * reach / 2, z_eye)
                    views.append((cam, look_at(eye, (x + dx * reach / 2, y + dy * reach / 2, ground))))
    return views
