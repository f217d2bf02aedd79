"""Rendering a tile for the viewer: whole views through ``render_view`` and row bands (for
progressive refinement) through ``render_rays``, both returned as host :class:`Frame`\\ s.

The renderer is a :class:`citygen.render.tile.TileRenderer` or anything with the same
``render_view`` / ``render_rays`` methods (tests use an analytic scene).
"""

from __future__ import annotations

import numpy as np
import torch

from citygen.cameras import world_rays
from survey_io import Camera

from .colormap import class_ids
from .display import Frame, _numpy


def band_rays(camera: Camera, c2w: np.ndarray, row0: int, row1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays through the pixel centres of rows [row0, row1) of ``camera``: origins (N, 3),
    unit directions (N, 3), and each ray's z-depth per metre of distance (N,)."""
    j, i = np.meshgrid(np.arange(row0, row1, dtype=np.float64), np.arange(camera.width, dtype=np.float64),
                       indexing="ij")
    return world_rays(camera, c2w, (i + 0.5).reshape(-1), (j + 0.5).reshape(-1))


class TileSource:
    """Renders views of a tile renderer into frames."""

    def __init__(self, renderer, appearance=None):
        self.renderer = renderer
        self.appearance = appearance
        self.device = getattr(renderer, "device", "cpu")

    @property
    def georef(self):
        return getattr(self.renderer, "georef", None)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(getattr(self.renderer, "classes", ()) or ())

    @property
    def plan(self):
        return getattr(self.renderer, "plan", None)

    @property
    def bounds(self) -> np.ndarray:
        return np.asarray(self.renderer.bounds, np.float64)

    def render_view(self, camera: Camera, c2w: np.ndarray) -> Frame:
        return Frame.from_render(self.renderer.render_view(camera, c2w, appearance=self.appearance))

    def render_band(self, camera: Camera, c2w: np.ndarray, row0: int, row1: int) -> Frame:
        """Rows [row0, row1) of the view (z-depth, like ``render_view``)."""
        origins, dirs, z_per_m = band_rays(camera, c2w, row0, row1)
        o = torch.as_tensor(origins, dtype=torch.float32, device=self.device)
        d = torch.as_tensor(dirs, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            out = self.renderer.render_rays(o, d, appearance=self.appearance)
        h, w = row1 - row0, camera.width
        rgb = _numpy(out["rgb"]).astype(np.float32).reshape(h, w, 3)
        depth = (_numpy(out["distance"]).astype(np.float64) * z_per_m).astype(np.float32).reshape(h, w)
        acc = _numpy(out["acc"]).astype(np.float32).reshape(h, w) if "acc" in out else np.ones((h, w), np.float32)
        sem = out.get("semantics")
        ids = class_ids(sem).reshape(h, w) if sem is not None else None
        return Frame(rgb, depth, acc, ids)
