"""Reference (pure torch) rendering: camera rays, occupancy grid, volume rendering."""

from ..fields.occupancy import OccupancyGrid
from .sampling import camera_rays, intersect_aabb, pixel_grid
from .volume import render_image, render_rays

__all__ = ["OccupancyGrid", "camera_rays", "intersect_aabb", "pixel_grid", "render_image", "render_rays"]
