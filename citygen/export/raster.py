"""True orthophoto, DSM and semantic rasters rendered straight down through the field.

Every cell of a north-up grid at the chosen ground sample distance (GSD) gets one
vertical ray (or ``supersample``² of them) shot down from above the scene.  There is no
perspective: a roof covers exactly its footprint, which is what makes the orthophoto *true*.

Grid convention (shared with ``survey_io.geotiff``): row 0 is the northern edge; pixel
(col 0, row 0) has its top-left corner at (x_min, y_max) of the requested rectangle, in the
tile's CRS (local frame + georef origin).  The DSM holds heights in the CRS's vertical
(local z + origin height) as float32 with nodata -9999; the ortho is RGBA uint8 (alpha 0 =
nothing rendered there); the semantic raster holds class ids (uint8, 255 = nodata).

Rasters of any size are rendered in windows of at most :data:`WINDOW_CELLS` cells
(:class:`OrthoWindows`) and written window by window as Cloud Optimized GeoTIFFs
(the sinks of :func:`raster_files`), so memory does not grow with the raster; :func:`render_ortho` assembles
the windows into whole arrays for the callers that need them (meshes, small rasters, tests).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from survey_io import Georef
from survey_io.geotiff import STAGE_BLOCK, cog_writer, north_up_transform

from ..errors import CitygenError
from .source import DEFAULT_CHUNK, RayProgress, RaySource, check_source, render_in_chunks, source_device

DSM_NODATA = -9999.0
CLASS_NODATA = 255
#: Rays start this far above the scene's top, so the first sample is in free space.
TOP_CLEARANCE_M = 1.0
#: Most cells rendered and held at once by a windowed export (the window's maps take about
#: 13 bytes a cell, the file conversions and its points a few times more: citygen.export.run).
WINDOW_CELLS = 1 << 20


@dataclass(frozen=True)
class OrthoGrid:
    """A north-up grid in the local frame: cell (row r, col c) spans
    ``[x0 + c' gsd, x0 + (c'+1) gsd] x [y1 - (r'+1) gsd, y1 - r' gsd]`` with
    ``r' = row_off + r``, ``c' = col_off + c``.

    A whole raster has ``row_off = col_off = 0``; a window of it (:meth:`window`) keeps the
    raster's corner (x0, y1) and says where it starts, so its cell centres are computed by the
    same expression, bit for bit, as the whole raster's."""

    x0: float
    y1: float
    gsd: float
    width: int
    height: int
    row_off: int = 0
    col_off: int = 0

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
        r = np.arange(self.row_off, self.row_off + self.height, dtype=np.float64)[rows]
        c = np.arange(self.col_off, self.col_off + self.width, dtype=np.float64)
        cols, rows_ = np.meshgrid(c, r)
        return self.x0 + (cols + 0.5) * self.gsd, self.y1 - (rows_ + 0.5) * self.gsd

    def transform(self, georef: Georef):
        """The affine pixel -> CRS transform (rasterio ``Affine``) of this grid's cell (0, 0)."""
        return north_up_transform((self.x0 + self.col_off * self.gsd + georef.origin[0],
                                   self.y1 - self.row_off * self.gsd + georef.origin[1]), self.gsd)

    def window(self, row_off: int, col_off: int, height: int, width: int) -> OrthoGrid:
        """The cells ``[row_off, row_off + height) x [col_off, col_off + width)`` of this grid."""
        if not (0 <= row_off and 0 <= col_off and height >= 1 and width >= 1 and row_off + height <= self.height
                and col_off + width <= self.width):
            raise ValueError(f"window {height}x{width} at ({row_off}, {col_off}) is outside the "
                             f"{self.height}x{self.width} grid")
        return replace(self, width=width, height=height, row_off=self.row_off + row_off,
                       col_off=self.col_off + col_off)

    def windows(self, max_cells: int = WINDOW_CELLS, align: int = STAGE_BLOCK) -> Iterator[OrthoGrid]:
        """Windows of at most ``max_cells`` cells (but at least ``align`` x ``align``) covering the
        grid row band by row band, west to east; their sides are multiples of ``align`` (except
        at the grid's edges), so each fills whole tiles of a GeoTIFF tiled by ``align``."""
        cols = min(self.width, max(align, (max_cells // align) // align * align))
        rows = min(self.height, max(align, (max_cells // cols) // align * align))
        for r0 in range(0, self.height, rows):
            for c0 in range(0, self.width, cols):
                yield self.window(r0, c0, min(rows, self.height - r0), min(cols, self.width - c0))


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
            raise all_nodata_error(self.grid, path)

    @classmethod
    def empty(cls, grid: OrthoGrid, georef: Georef, classes: tuple[str, ...]) -> OrthoMaps:
        """Maps of ``grid`` with nothing seen yet (to :meth:`paste` windows into)."""
        H, W = grid.shape
        return cls(grid=grid, georef=georef, classes=classes, rgb=np.zeros((H, W, 3), np.uint8),
                   height=np.full((H, W), np.nan, np.float32), semantics=np.full((H, W), CLASS_NODATA, np.uint8),
                   acc=np.zeros((H, W), np.float32), valid=np.zeros((H, W), bool))

    def paste(self, part: OrthoMaps) -> None:
        """Copy the maps of ``part``, a window of this grid (see :meth:`OrthoGrid.window`), into place."""
        r0, c0 = part.grid.row_off - self.grid.row_off, part.grid.col_off - self.grid.col_off
        at = (slice(r0, r0 + part.grid.height), slice(c0, c0 + part.grid.width))
        for name in ("rgb", "height", "semantics", "acc", "valid"):
            getattr(self, name)[at] = getattr(part, name)

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


class OrthoWindows:
    """The ortho, heights and classes of ``rect`` at ``gsd``, rendered window by window.

    Iterating yields one :class:`OrthoMaps` per window of :attr:`grid` (its ``grid`` is the
    window: ``row_off``/``col_off`` place it), at most ``max_cells`` cells each, so memory
    stays bounded whatever the raster's size.  Arguments are checked here, before any
    rendering.

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
        max_cells: cells per window.
    """

    def __init__(self, source: RaySource, gsd: float, rect: tuple[float, float, float, float] | None = None, *,
                 supersample: int = 1, min_acc: float = 0.5, chunk: int = DEFAULT_CHUNK, progress: bool = True,
                 max_cells: int = WINDOW_CELLS):
        bounds = check_source(source)
        if supersample < 1:
            raise CitygenError(None, f"supersample must be >= 1, got {supersample}")
        if chunk < 1 or max_cells < 1:
            raise CitygenError(None, f"chunk and max_cells must be >= 1, got {chunk}, {max_cells}")
        self.source, self.supersample, self.min_acc, self.chunk = source, supersample, min_acc, chunk
        self.progress, self.max_cells = progress, max_cells
        self.grid = OrthoGrid.covering(rect if rect is not None else tile_rect(source), gsd)
        self.z_top = float(bounds[1, 2]) + TOP_CLEARANCE_M

    def __iter__(self) -> Iterator[OrthoMaps]:
        H, W = self.grid.shape
        with RayProgress("ortho + DSM", total=H * W * self.supersample**2, enabled=self.progress) as advance:
            for window in self.grid.windows(self.max_cells):
                yield self._render(window, advance)

    def _render(self, grid: OrthoGrid, advance) -> OrthoMaps:
        source, min_acc, chunk, z_top = self.source, self.min_acc, self.chunk, self.z_top
        H, W = grid.shape
        offsets = _subcell_offsets(self.supersample) * grid.gsd
        S = len(offsets)
        device = source_device(source)
        n_classes = len(source.classes)
        rgb = np.zeros((H, W, 3), np.uint8)
        height = np.full((H, W), np.nan, np.float32)
        semantics = np.full((H, W), CLASS_NODATA, np.uint8)
        acc = np.zeros((H, W), np.float32)
        for rows, cols in render_order(grid, getattr(source, "block_rects", None), chunk // S):
            xs, ys = grid.cell_centers(rows)                                   # (R, W)
            xs, ys = xs[:, cols], ys[:, cols]
            px = xs[..., None] + offsets[:, 0]                                # (R, w, S)
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
            acc[rows, cols] = cell_acc
            rgb[rows, cols] = _to_u8(out["rgb"].reshape(*shape, 3).mean(axis=-2))
            height[rows, cols] = np.where(cell_ok, z, np.nan)
            if "semantics" in out:
                logits = torch.from_numpy(out["semantics"].reshape(*shape, n_classes))
                probs = torch.softmax(logits, dim=-1).sum(dim=-2)
                semantics[rows, cols] = np.where(cell_ok, probs.argmax(dim=-1).numpy(), CLASS_NODATA)
        return OrthoMaps(grid=grid, georef=source.georef, classes=tuple(source.classes), rgb=rgb, height=height,
                         semantics=semantics, acc=acc, valid=np.isfinite(height))


def column_strips(grid: OrthoGrid, rects: np.ndarray | None) -> list[tuple[int, int]]:
    """The window's columns cut wherever a block's rectangle (``rects`` (B, 4) x0, y0, x1, y1,
    the source's ``block_rects``) begins or ends: (c0, c1) ranges in the window's columns, west
    to east, so that every cell of a strip has its vertical ray in the same columns of blocks.
    Rendered strip by strip, a window loads each block's field while the strips over it
    render, not once per row band of the whole window (whose rays span every block column).
    One strip, the whole width, without ``rects``."""
    if rects is None or len(rects) == 0:
        return [(0, grid.width)]
    centres = grid.x0 + (np.arange(grid.col_off, grid.col_off + grid.width, dtype=np.float64) + 0.5) * grid.gsd
    edges = np.asarray(rects, dtype=np.float64)[:, [0, 2]].ravel()
    # a ray at x is in [x0, x1] (inclusive): a strip starts at the first centre >= x0 and
    # after the last centre <= x1
    cuts = np.concatenate([np.searchsorted(centres, edges[0::2], side="left"),
                           np.searchsorted(centres, edges[1::2], side="right"), [0, grid.width]])
    cuts = np.unique(np.clip(cuts, 0, grid.width))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def render_order(grid: OrthoGrid, rects: np.ndarray | None, cells: int) -> Iterator[tuple[slice, slice]]:
    """The (rows, cols) parts of a window in the order they are rendered: :func:`column_strips`
    west to east, each in row bands of at most ``cells`` cells (at least one row), every other
    strip bottom-up (serpentine: the blocks where one strip ends are still cached where the next
    begins)."""
    for k, (c0, c1) in enumerate(column_strips(grid, rects)):
        rows_per_band = max(1, cells // (c1 - c0))
        bands = list(range(0, grid.height, rows_per_band))
        for r0 in (bands if k % 2 == 0 else bands[::-1]):
            yield slice(r0, min(grid.height, r0 + rows_per_band)), slice(c0, c1)


def _blocks_meeting(grid: OrthoGrid, rows: slice, cols: slice, rects: np.ndarray) -> list[int]:
    """Indices of the rectangles that meet the cells ``rows`` x ``cols`` of ``grid`` (the open
    extent of whole cells: supersampled rays stay strictly inside theirs)."""
    x0, x1 = grid.x0 + (grid.col_off + cols.start) * grid.gsd, grid.x0 + (grid.col_off + cols.stop) * grid.gsd
    y0, y1 = grid.y1 - (grid.row_off + rows.stop) * grid.gsd, grid.y1 - (grid.row_off + rows.start) * grid.gsd
    return np.nonzero((rects[:, 0] < x1) & (rects[:, 2] > x0) & (rects[:, 1] < y1) & (rects[:, 3] > y0))[0].tolist()


def window_blocks(grid: OrthoGrid, rects: np.ndarray | None, max_cells: int = WINDOW_CELLS,
                  cells: int = 1 << 16) -> list[tuple[int, int]]:
    """Per window of ``grid`` (:meth:`OrthoGrid.windows`): (blocks whose rectangles, ``rects``
    (B, 4), meet its cells; the fewest cached fields with which rendering it in
    :func:`render_order` (parts of ``cells`` cells) loads each of those once).

    The second is found by replaying the order against an LRU cache of growing size, a part's
    blocks counted as used together; serpentine strips need about two block rows of the window,
    not all its blocks."""
    if rects is None or len(rects) == 0:
        return []
    r = np.asarray(rects, dtype=np.float64)
    result = []
    for w in grid.windows(max_cells):
        uses = [_blocks_meeting(w, rows, cols, r) for rows, cols in render_order(w, r, cells)]
        distinct = len(set().union(*uses))
        size = max((len(u) for u in uses), default=1)
        while size < distinct and _lru_loads(uses, size) > distinct:
            size += 1
        result.append((distinct, max(size, 1)))
    return result


def _lru_loads(uses: list[list[int]], size: int) -> int:
    cache: dict[int, None] = {}
    loads = 0
    for part in uses:
        for b in part:
            if b in cache:
                cache.pop(b)
            else:
                loads += 1
            cache[b] = None
            while len(cache) > size:
                cache.pop(next(iter(cache)))
    return loads


def render_ortho(source: RaySource, gsd: float, rect: tuple[float, float, float, float] | None = None, *,
                 supersample: int = 1, min_acc: float = 0.5, chunk: int = DEFAULT_CHUNK,
                 progress: bool = True, max_cells: int = WINDOW_CELLS) -> OrthoMaps:
    """Render the true orthophoto, surface heights and classes of ``rect`` at ``gsd`` into
    whole (H, W) arrays (the arguments are :class:`OrthoWindows`'); for large rasters, iterate
    :class:`OrthoWindows` and write with the sinks of :func:`raster_files` instead."""
    windows = OrthoWindows(source, gsd, rect, supersample=supersample, min_acc=min_acc, chunk=chunk,
                           progress=progress, max_cells=max_cells)
    whole = OrthoMaps.empty(windows.grid, source.georef, tuple(source.classes))
    for part in windows:
        whole.paste(part)
    return whole


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


#: What each raster file holds: bands, sample type, nodata, and how its overviews average
#: (class ids take the most frequent class, never a blend).
RASTER_FILES = {
    "ortho": dict(bands=4, dtype="uint8", nodata=None, alpha=True, resampling="average"),
    "dsm": dict(bands=1, dtype="float32", nodata=DSM_NODATA, alpha=False, resampling="average"),
    "semantics": dict(bands=1, dtype="uint8", nodata=CLASS_NODATA, alpha=False, resampling="mode"),
}


class RasterWindows:
    """The sink :func:`raster_files` yields: :meth:`write` takes each window's maps."""

    def __init__(self, grid: OrthoGrid, writers: dict):
        self.grid, self._writers, self.valid_cells = grid, writers, 0

    def write(self, maps: OrthoMaps) -> None:
        """Write a window (``maps.grid`` is a window of this grid)."""
        r0, c0 = maps.grid.row_off - self.grid.row_off, maps.grid.col_off - self.grid.col_off
        self.valid_cells += int(maps.valid.sum())
        for kind, writer in self._writers.items():
            data = maps.rgba() if kind == "ortho" else maps.dsm() if kind == "dsm" else maps.semantics
            writer.write(data, r0, c0)


@contextlib.contextmanager
def raster_files(paths: dict[str, str | Path], grid: OrthoGrid, georef: Georef,
                 classes: tuple[str, ...]) -> Iterator[RasterWindows]:
    """Ortho / DSM / semantic Cloud Optimized GeoTIFFs of ``grid``, written window by window.

    Yields a :class:`RasterWindows`: write each window's :class:`OrthoMaps` into it as it is
    rendered.  On a clean exit every file is converted to a COG and published; if no window
    had a valid cell (see :meth:`OrthoMaps.require_data`), or anything fails, nothing is written.

    Args:
        paths: kind (``ortho``, ``dsm``, ``semantics``: :data:`RASTER_FILES`) -> output file.
        grid, georef, classes: the whole raster's grid, its CRS, the class names.
    """
    unknown = [k for k in paths if k not in RASTER_FILES]
    if unknown:
        raise ValueError(f"unknown raster kinds {unknown} (known: {', '.join(RASTER_FILES)})")
    if "semantics" in paths and not classes:
        raise CitygenError(paths["semantics"], "the scene has no semantic classes to export")
    with contextlib.ExitStack() as stack:
        writers = {kind: stack.enter_context(cog_writer(path, width=grid.width, height=grid.height, crs=georef.crs,
                                                        transform=grid.transform(georef), **RASTER_FILES[kind]))
                   for kind, path in paths.items()}
        sink = RasterWindows(grid, writers)
        yield sink
        if sink.valid_cells == 0:
            raise all_nodata_error(grid, next(iter(paths.values()), None))


def all_nodata_error(grid: OrthoGrid, path: str | Path | None) -> CitygenError:
    return CitygenError(path, f"the rendered {grid.width}x{grid.height} raster is all nodata "
                             "(no cell reached the opacity threshold min_acc): nothing written; "
                             "check the bounds and that the tile's fields render")


def _write_one(kind: str, maps: OrthoMaps, path: str | Path) -> Path:
    maps.require_data(path)
    with raster_files({kind: path}, maps.grid, maps.georef, maps.classes) as sink:
        sink.write(maps)
    return Path(path)


def write_ortho(maps: OrthoMaps, path: str | Path) -> Path:
    """Write the true orthophoto as an RGBA uint8 Cloud Optimized GeoTIFF (alpha 0 = nodata)."""
    return _write_one("ortho", maps, path)


def write_dsm(maps: OrthoMaps, path: str | Path) -> Path:
    """Write the DSM as a Cloud Optimized GeoTIFF: float32 heights in the CRS's vertical, nodata -9999."""
    return _write_one("dsm", maps, path)


def write_semantics(maps: OrthoMaps, path: str | Path) -> Path:
    """Write the semantic raster as a Cloud Optimized GeoTIFF: uint8 class ids (``maps.classes``), nodata 255."""
    return _write_one("semantics", maps, path)
