"""True orthophoto, DSM and semantic rasters rendered straight down through the field.

Every cell of a north-up grid at the chosen ground sample distance (GSD) gets one
vertical ray (or ``supersample``² of them) shot down from above the scene.  There is no
perspective: a roof covers exactly its footprint, which is what makes the orthophoto *true*.

Grid convention (shared with ``survey_io.geotiff``): row 0 is the northern edge; pixel
(col 0, row 0) has its top-left corner at (x_min, y_max) of the requested rectangle, in the
tile's CRS (local frame + georef origin).  The DSM holds heights in the CRS's vertical
(local z + origin height) as float32 with nodata -9999; the ortho is RGBA uint8 (alpha 0 =
nothing rendered there); the semantic raster holds class ids (uint8, 255 = nodata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from survey_io import Georef
from survey_io.geotiff import north_up_transform, write_geotiff

from ..errors import CitygenError
from .source import DEFAULT_CHUNK, RayProgress, RaySource, check_source, render_in_chunks, source_device

DSM_NODATA = -9999.0
CLASS_NODATA = 255
#: Rays start this far above the scene's top, so the first sample is in free space.
TOP_CLEARANCE_M = 1.0


@dataclass(frozen=True)
class OrthoGrid:
    """A north-up grid in the local frame: cell (row r, col c) spans
    ``[x0 + c gsd, x0 + (c+1) gsd] x [y1 - (r+1) gsd, y1 - r gsd]``."""

    x0: float
    y1: float
    gsd: float
    width: int
    height: int

    @classmethod
    def covering(cls, rect: tuple[float, float, float, float], gsd: float) -> OrthoGrid:
        """The grid of ``gsd`` cells whose top-left corner is (x_min, y_max) of ``rect``
        (local x_min, y_min, x_max, y_max) and that covers it (partial last cells included)."""
        x0, y0, x1, y1 = (float(v) for v in rect)
        if not (gsd > 0 and math.isfinite(gsd)):
            raise CitygenError(None, f"ground sample distance must be positive, got {gsd}")
        if not (x1 > x0 and y1 > y0):
            raise CitygenError(None, f"raster bounds must have x_max > x_min and y_max > y_min, got {rect}")
        # round() first so that an exact multiple of the GSD does not gain a sliver column
        width = max(1, math.ceil(round((x1 - x0) / gsd, 6)))
        height = max(1, math.ceil(round((y1 - y0) / gsd, 6)))
        return cls(x0, y1, float(gsd), width, height)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def cell_centers(self, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Local (x, y) of the cell centres of ``rows``, each (R, W) float64."""
        r = np.arange(self.height, dtype=np.float64)[rows]
        c = np.arange(self.width, dtype=np.float64)
        cols, rows_ = np.meshgrid(c, r)
        return self.x0 + (cols + 0.5) * self.gsd, self.y1 - (rows_ + 0.5) * self.gsd

    def transform(self, georef: Georef):
        """The affine pixel -> CRS transform (rasterio ``Affine``)."""
        return north_up_transform((self.x0 + georef.origin[0], self.y1 + georef.origin[1]), self.gsd)


@dataclass
class OrthoMaps:
    """What :func:`render_ortho` saw, cell by cell.

    Attributes:
        grid, georef, classes: where the cells are, and the class names of ``semantics``.
        rgb: (H, W, 3) uint8 colour.
        height: (H, W) float32 local surface height (z), NaN where invalid.
        semantics: (H, W) uint8 class id, 255 where invalid.
        acc: (H, W) float32 mean opacity of the cell's rays.
        valid: (H, W) bool, cells whose rays hit something (acc >= min_acc).
    """

    grid: OrthoGrid
    georef: Georef
    classes: tuple[str, ...]
    rgb: np.ndarray
    height: np.ndarray
    semantics: np.ndarray
    acc: np.ndarray
    valid: np.ndarray

    def require_data(self, path: str | Path | None) -> None:
        """Refuse to deliver a raster in which no cell saw anything: a field whose weights are
        NaN, or bounds outside the scene, render nothing, and an all-nodata GeoTIFF written
        with exit status 0 looks like a result."""
        if not self.valid.any():
            raise CitygenError(path, f"the rendered {self.grid.width}x{self.grid.height} raster is all nodata "
                                     "(no cell reached the opacity threshold min_acc): nothing written; "
                                     "check the bounds and that the tile's fields render")

    def dsm(self) -> np.ndarray:
        """float32 heights in the CRS's vertical, :data:`DSM_NODATA` where invalid."""
        z = self.height.astype(np.float64) + self.georef.origin[2]
        return np.where(self.valid, z, DSM_NODATA).astype(np.float32)

    def rgba(self) -> np.ndarray:
        """(H, W, 4) uint8, alpha 255 on valid cells and 0 elsewhere (colour 0 there too)."""
        rgb = np.where(self.valid[..., None], self.rgb, 0).astype(np.uint8)
        return np.concatenate([rgb, (self.valid * 255).astype(np.uint8)[..., None]], axis=-1)


def tile_rect(source: RaySource) -> tuple[float, float, float, float]:
    """The local (x_min, y_min, x_max, y_max) of the source's bounds."""
    b = check_source(source)
    return float(b[0, 0]), float(b[0, 1]), float(b[1, 0]), float(b[1, 1])


def _subcell_offsets(supersample: int) -> np.ndarray:
    """(S², 2) offsets within a cell, in cells, of a regular S x S pattern centred on the cell."""
    u = (np.arange(supersample) + 0.5) / supersample - 0.5
    ox, oy = np.meshgrid(u, u)
    return np.stack([ox.ravel(), oy.ravel()], axis=1)


def render_ortho(source: RaySource, gsd: float, rect: tuple[float, float, float, float] | None = None, *,
                 supersample: int = 1, min_acc: float = 0.5, chunk: int = DEFAULT_CHUNK,
                 progress: bool = True) -> OrthoMaps:
    """Render the true orthophoto, surface heights and classes of ``rect`` at ``gsd``.

    Args:
        source: the scene (a ``TileRenderer`` or anything with its ray API).
        gsd: ground sample distance, metres per cell.
        rect: local (x_min, y_min, x_max, y_max); default: the source's bounds.
        supersample: S: S x S rays per cell.  Colour and opacity are averaged, class
            probabilities summed, and the height is the highest valid hit (a DSM is the
            top of the surface, as in the synthetic city's ground truth).
        min_acc: cells whose mean opacity is below this are nodata (nothing there).
        chunk: rays per render call.
        progress: show a progress bar.
    """
    bounds = check_source(source)
    if supersample < 1:
        raise CitygenError(None, f"supersample must be >= 1, got {supersample}")
    grid = OrthoGrid.covering(rect if rect is not None else tile_rect(source), gsd)
    H, W = grid.shape
    offsets = _subcell_offsets(supersample) * gsd
    S = len(offsets)
    z_top = float(bounds[1, 2]) + TOP_CLEARANCE_M
    device = source_device(source)
    n_classes = len(source.classes)

    rgb = np.zeros((H, W, 3), np.uint8)
    height = np.full((H, W), np.nan, np.float32)
    semantics = np.full((H, W), CLASS_NODATA, np.uint8)
    acc = np.zeros((H, W), np.float32)
    rows_per_block = max(1, chunk // (W * S))
    with RayProgress("ortho + DSM", total=H * W * S, enabled=progress) as advance:
        for r0 in range(0, H, rows_per_block):
            rows = slice(r0, min(H, r0 + rows_per_block))
            xs, ys = grid.cell_centers(rows)                                       # (R, W)
            px = xs[..., None] + offsets[:, 0]                                    # (R, W, S)
            py = ys[..., None] - offsets[:, 1]
            origins = np.stack([px.ravel(), py.ravel(), np.full(px.size, z_top)], axis=1)
            o = torch.as_tensor(origins, dtype=torch.float32, device=device)
            d = torch.tensor([0.0, 0.0, -1.0], device=device).expand_as(o).contiguous()
            out = render_in_chunks(source, o, d, chunk=chunk, progress=advance,
                                   keys=("rgb", "distance", "acc", "semantics") if n_classes else
                                   ("rgb", "distance", "acc"))
            shape = px.shape
            a = out["acc"].reshape(shape)
            hit = a >= min_acc
            z = np.where(hit, z_top - out["distance"].reshape(shape), -np.inf).max(axis=-1)
            cell_acc = a.mean(axis=-1)
            cell_ok = (cell_acc >= min_acc) & np.isfinite(z)
            acc[rows] = cell_acc
            rgb[rows] = _to_u8(out["rgb"].reshape(*shape, 3).mean(axis=-2))
            height[rows] = np.where(cell_ok, z, np.nan)
            if "semantics" in out:
                logits = torch.from_numpy(out["semantics"].reshape(*shape, n_classes))
                probs = torch.softmax(logits, dim=-1).sum(dim=-2)
                semantics[rows] = np.where(cell_ok, probs.argmax(dim=-1).numpy(), CLASS_NODATA)
    valid = np.isfinite(height)
    return OrthoMaps(grid=grid, georef=source.georef, classes=tuple(source.classes), rgb=rgb, height=height,
                     semantics=semantics, acc=acc, valid=valid)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def write_ortho(maps: OrthoMaps, path: str | Path) -> Path:
    """Write the true orthophoto as an RGBA uint8 GeoTIFF (alpha 0 = nodata)."""
    maps.require_data(path)
    return write_geotiff(path, maps.rgba(), crs=maps.georef.crs, transform=maps.grid.transform(maps.georef))


def write_dsm(maps: OrthoMaps, path: str | Path) -> Path:
    """Write the DSM: float32 heights in the CRS's vertical, nodata -9999."""
    maps.require_data(path)
    return write_geotiff(path, maps.dsm(), crs=maps.georef.crs, transform=maps.grid.transform(maps.georef),
                         nodata=DSM_NODATA, dtype="float32")


def write_semantics(maps: OrthoMaps, path: str | Path) -> Path:
    """Write the semantic raster: uint8 class ids (``maps.classes``), nodata 255."""
    if not maps.classes:
        raise CitygenError(path, "the scene has no semantic classes to export")
    maps.require_data(path)
    return write_geotiff(path, maps.semantics, crs=maps.georef.crs, transform=maps.grid.transform(maps.georef),
                         nodata=CLASS_NODATA, dtype="uint8")
