"""Ground height under a point, for height selections, raising and ground fill.

:class:`GroundHeight` is the interface: ``height(xy) -> z`` on torch tensors in the local
frame.  Three sources, in the order a tile prefers them: a DTM raster (GeoTIFF, through
:class:`citygen.partition.ground.GroundModel`), an estimate from the field itself (the
surface of its ground/road classes, holes under buildings filled from their surroundings),
and a horizontal plane as the fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import CitygenError
from ..partition.ground import GroundModel
from .raster import Raster2D, inpaint


class GroundHeight(Protocol):
    """Ground height (local metres) under local positions ``xy`` (..., 2)."""

    def height(self, xy: Tensor) -> Tensor: ...


class PlaneGround:
    """The plane ``z = height_m``."""

    def __init__(self, height_m: float):
        self.height_m = float(height_m)

    def height(self, xy: Tensor) -> Tensor:
        return torch.full(xy.shape[:-1], self.height_m, dtype=xy.dtype, device=xy.device)

    def __repr__(self) -> str:
        return f"PlaneGround({self.height_m})"


class RasterGround:
    """Heights on a regular north-up or south-up grid (a :class:`Raster2D`), bilinear; the
    nearest edge value outside it."""

    def __init__(self, raster: Raster2D):
        self.raster = raster

    def height(self, xy: Tensor) -> Tensor:
        return self.raster.bilinear(xy)[..., 0]

    @classmethod
    def from_geotiff(cls, path: str | Path, georef) -> RasterGround:
        """A DTM GeoTIFF in the tile's CRS (heights in the CRS's vertical units)."""
        model = GroundModel.from_geotiff(path, georef)
        return cls.from_ground_model(model)

    @classmethod
    def from_ground_model(cls, model) -> RasterGround | PlaneGround:
        if model.heights is None:
            return PlaneGround(model.height)
        h = np.asarray(model.heights, dtype=np.float32)[::-1].copy()  # row 0 = southern edge
        rows = h.shape[0]
        origin = (model.x0, model.y0 - rows * model.dy)
        return cls(Raster2D(torch.from_numpy(h)[..., None], origin, (model.dx, model.dy)))


@torch.no_grad()
def estimate_ground(sample, aabb: Tensor, cell: float | None = None, max_cells: int = 192,
                    ground_classes=(0, 1), samples_per_column: int = 96) -> GroundHeight:
    """The surface height of the ground/road classes, estimated from a field.

    Args:
        sample: ``sample(x (N, 3)) -> (sigma (N,), labels (N,))`` of the field.
        aabb: (2, 3) box to look in.
        cell: raster cell size in metres (default: the box's longest side / ``max_cells``).
        ground_classes: class ids that count as ground.

    Each column is marched top-down; the expected depth of its ground-class opacity gives
    the height.  Columns that see no ground (under buildings) are filled from their
    neighbours (:func:`inpaint`).  A field with no visible ground at all gives a plane at
    the bottom of the box.
    """
    lo, hi = aabb[0].float().cpu(), aabb[1].float().cpu()
    ext = (hi - lo)[:2]
    cell = float(cell or max(float(ext.max()) / max_cells, 1e-3))
    nx, ny = max(int(torch.ceil(ext[0] / cell)), 1), max(int(torch.ceil(ext[1] / cell)), 1)
    raster = Raster2D(torch.zeros(ny, nx, 1), (float(lo[0]), float(lo[1])), (cell, cell))
    xy = raster.cell_centres().reshape(-1, 2)
    z = torch.linspace(float(hi[2]), float(lo[2]), samples_per_column)
    dz = float(hi[2] - lo[2]) / samples_per_column
    heights = torch.zeros(xy.shape[0])
    weight = torch.zeros(xy.shape[0])
    log_t = torch.zeros(xy.shape[0])
    for zk in z:
        x = torch.cat([xy, torch.full((xy.shape[0], 1), float(zk))], dim=1).to(aabb.device)
        sigma, labels = sample(x)
        sigma, labels = sigma.float().cpu(), labels.cpu()
        alpha = 1.0 - torch.exp(-sigma * dz)
        w = torch.exp(log_t) * alpha
        is_ground = torch.zeros_like(labels, dtype=torch.bool)
        for c in ground_classes:
            is_ground |= labels == c
        heights += w * is_ground * (float(zk) + 0.5 * dz)
        weight += w * is_ground
        log_t -= sigma * dz
    known = weight > 0.5
    if not bool(known.any()):
        return PlaneGround(float(lo[2]))
    h = torch.where(known, heights / weight.clamp_min(1e-6), torch.zeros(()))
    filled = inpaint(h.reshape(ny, nx, 1), known.reshape(ny, nx))
    return RasterGround(Raster2D(filled, raster.origin, raster.cell))


def ground_from_spec(spec: dict | None, tile_dir: Path | None, georef, estimate=None) -> GroundHeight:
    """The ground named by an edit stack's ``"ground"`` entry.

    ``{"kind": "plane", "height": z}``, ``{"kind": "raster", "path": "dtm.tif"}`` (relative to
    the tile folder), or ``{"kind": "field"}`` / absent: estimated from the field via
    ``estimate()`` (a callable), or a DTM named ``dtm.tif`` in the tile folder when present.
    """
    spec = spec or {"kind": "field"}
    kind = spec.get("kind", "field")
    if kind == "plane":
        return PlaneGround(float(spec["height"]))
    if kind == "raster":
        if tile_dir is None or georef is None:
            raise CitygenError(None, "a raster ground needs the tile folder and its georef")
        return RasterGround.from_geotiff(Path(tile_dir) / spec["path"], georef)
    if tile_dir is not None and georef is not None and (Path(tile_dir) / "dtm.tif").is_file():
        return RasterGround.from_geotiff(Path(tile_dir) / "dtm.tif", georef)
    if estimate is None:
        raise CitygenError(None, "no ground model: give a plane height, a DTM, or a field to estimate it from")
    return estimate()


__all__ = ["GroundHeight", "PlaneGround", "RasterGround", "estimate_ground", "ground_from_spec"]
