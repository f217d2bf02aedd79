"""``citygen export``: render a tile's deliverables into one folder, with a manifest.

Files written into ``out`` (each only when asked for; the rasters are Cloud Optimized GeoTIFFs,
and they and the grid point clouds are written window by window as the grid renders, so memory
does not grow with the extent)::

    ortho.tif            true orthophoto, RGBA uint8 (alpha 0 = nodata)
    dsm.tif              surface heights, float32, CRS vertical, nodata -9999
    semantics.tif        class ids, uint8, nodata 255
    points.las/.laz/.ply classified, coloured point cloud (see citygen.export.points)
    mesh.ply, mesh.obj   triangle mesh, local frame + origin in the header (see citygen.export.mesh)
    cameras/             transforms.json of the survey's cameras (see citygen.export.cameras)
    export.json          manifest: georef, grid, classes, ASPRS codes, files, counts, timings
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from survey_io.atomic import atomic_write_json
from survey_io.geotiff import COG_CACHE_MB, STAGE_BLOCK

from ..checks import format_bytes, largest_fitting, memory_budget, nice_up
from ..errors import CitygenError
from ..extras import require_open3d
from ..store.checkpoint import read_sidecar
from ..store.layout import block_checkpoint, discover, read_plan, read_tile_config, trained_survey
from ..tile import open_tile
from ..train.data import load_survey
from .cameras import export_cameras
from .mesh import TSDF_MAX_BLOCKS, heightfield_mesh, tsdf_mesh, write_mesh
from .ply import ply_vertex_writer
from .points import (
    PLY_POINT,
    asprs_codes,
    las_writer,
    laz_available,
    ply_comments,
    ply_points,
    points_from_ortho,
    points_from_views,
    write_las,
    write_points_ply,
)
from .raster import (
    DSM_NODATA,
    WINDOW_CELLS,
    OrthoGrid,
    OrthoMaps,
    OrthoWindows,
    all_nodata_error,
    raster_files,
    tile_rect,
    window_blocks,
)
from .source import DEFAULT_CHUNK, RaySource, check_source
from .survey_check import dsm_survey_check
from .views import aerial_views

#: Everything ``citygen export --what`` knows, in the order it is produced.
DELIVERABLES = ("ortho", "dsm", "semantics", "las", "laz", "ply", "mesh", "cameras")
_NEEDS_GRID = {"ortho", "dsm", "semantics"}


@dataclass
class ExportOptions:
    """What to export and how.

    Attributes:
        what: deliverables (:data:`DELIVERABLES`).
        gsd: raster cell size, metres (also the point spacing of grid point clouds and of
            the heightfield mesh).
        rect: local (x_min, y_min, x_max, y_max) to export; None = the tile's bounds.
        supersample: rays per cell side for the rasters.
        min_acc: opacity below which a ray saw nothing (nodata).
        points_from: ``grid`` (one point per ortho cell) or ``views`` (rendered aerial views).
        mesh_method: ``heightfield`` (2.5D, from the DSM; no dependencies) or ``tsdf`` (open3d).
        mesh_formats: mesh file types among ``ply``, ``obj``.
        voxel_size: TSDF voxel edge (default: the GSD).
        view_gsd: pixel footprint of the views for ``tsdf`` / ``views`` (default: the GSD).
        view_size: side of those (square) views, pixels.
        survey: the survey's transforms.json (for ``cameras``).
        camera_images: ``link``, ``copy`` or ``none`` (see citygen.export.cameras).
        chunk: rays per render call.
        progress: progress bars.
        window_cells: most raster cells rendered and held at once (rasters and grid point
            clouds are streamed window by window).
    """

    what: tuple[str, ...] = ("ortho", "dsm", "semantics", "las", "ply", "mesh")
    gsd: float = 0.5
    rect: tuple[float, float, float, float] | None = None
    supersample: int = 1
    min_acc: float = 0.5
    points_from: str = "grid"
    mesh_method: str = "heightfield"
    mesh_formats: tuple[str, ...] = ("ply", "obj")
    voxel_size: float | None = None
    view_gsd: float | None = None
    view_size: int = 256
    survey: Path | None = None
    camera_images: str = "link"
    chunk: int = DEFAULT_CHUNK
    progress: bool = True
    window_cells: int = WINDOW_CELLS

    def validate(self) -> None:
        unknown = [w for w in self.what if w not in DELIVERABLES]
        if unknown or not self.what:
            raise CitygenError(None, f"unknown export {unknown or '(none)'} (known: {', '.join(DELIVERABLES)})")
        if self.points_from not in ("grid", "views"):
            raise CitygenError(None, f"points_from must be grid or views, got {self.points_from!r}")
        if self.mesh_method not in ("heightfield", "tsdf"):
            raise CitygenError(None, f"mesh method must be heightfield or tsdf, got {self.mesh_method!r}")
        bad = [f for f in self.mesh_formats if f not in ("ply", "obj")]
        if bad or not self.mesh_formats:
            raise CitygenError(None, f"mesh formats must be among ply, obj, got {list(self.mesh_formats)}")
        if not (self.gsd > 0 and math.isfinite(self.gsd)):
            raise CitygenError(None, f"gsd must be a finite number > 0, got {self.gsd}")
        if self.window_cells < 1:
            raise CitygenError(None, f"window_cells must be >= 1, got {self.window_cells}")
        if self.view_size < 8 or self.supersample < 1:
            raise CitygenError(None, f"view_size must be >= 8 and supersample >= 1, got {self.view_size}, "
                                     f"{self.supersample}")
        if self.voxel_size is not None and not (self.voxel_size > 0 and math.isfinite(self.voxel_size)):
            raise CitygenError(None, f"voxel_size must be positive, got {self.voxel_size}")


# Peak memory of an export, per raster cell or rendered ray (bytes; counted from the arrays
# the code holds at once, rounded up).  The grid is rendered and written one window of at most
# WINDOW_CELLS cells at a time, so rasters and grid points count one window's cells, not the
# raster's.  Rasters: the window's maps (RGB 3 + height 4 + class 1 + opacity 4 + valid 1) and,
# while writing, the float64 DSM and cell-centre grids; plus GDAL's block cache while GeoTIFFs
# are written (COG_CACHE_MB).  Grid points: float64 xyz (with its masked copies), colour, class,
# and the LAS/PLY record arrays.  Heightfield mesh: whole maps of the raster (MAPS_BYTES_PER_CELL),
# the int64 vertex index, float64 vertices, the corner stacks and int32 faces (about
# two triangles per cell) and the writers' rows.  View points: origin, direction and hit
# arrays per rendered ray.  TSDF: open3d's voxel block grid, allocated whole up front:
# 16^3 voxels of float32 tsdf, weight and RGB per block, for the capacity tsdf_mesh asks.
RASTER_BYTES_PER_CELL = 48
MAPS_BYTES_PER_CELL = 13
GRID_POINTS_BYTES_PER_CELL = 128
HEIGHTFIELD_MESH_BYTES_PER_CELL = 256
VIEW_POINT_BYTES_PER_RAY = 128
VIEW_POINT_STRIDE = 4
TSDF_BYTES_PER_BLOCK = 16**3 * (1 + 1 + 3) * 4
#: Fewest block fields an export of a tile keeps loaded: a vertical ray meets at most four
#: blocks' rectangles (where four meet at a corner), so fewer would reload fields within a strip.
MIN_FIELD_CACHE = 4


def _needs_grid(options: ExportOptions) -> bool:
    what = set(options.what)
    return bool(what & _NEEDS_GRID) or (bool(what & {"las", "laz", "ply"}) and options.points_from == "grid") \
        or ("mesh" in what and options.mesh_method == "heightfield")


def export_memory(options: ExportOptions, rect: tuple[float, float, float, float],
                  bounds_xy: tuple[float, float, float, float] | None = None,
                  field_cache_bytes: float = 0.0) -> dict[str, float]:
    """Estimated peak bytes of each part of an export of ``rect`` (local), from the GSD and the
    extent alone (see the constants above); ``bounds_xy`` is the source's extent (TSDF volume;
    default ``rect``); ``field_cache_bytes`` the tile renderer's cached fields and one field's
    load (:func:`field_cache_size`).  Nothing is allocated."""
    what = set(options.what)
    w, h = rect[2] - rect[0], rect[3] - rect[1]
    cells = math.ceil(round(w / options.gsd, 6)) * math.ceil(round(h / options.gsd, 6))
    parts: dict[str, float] = {}
    window = min(cells, max(options.window_cells, STAGE_BLOCK**2))
    if _needs_grid(options):
        parts["rasters"] = RASTER_BYTES_PER_CELL * window
    if what & _NEEDS_GRID:
        parts["gdal_cache"] = COG_CACHE_MB * 1e6
    if what & {"las", "laz", "ply"} and options.points_from == "grid":
        parts["points"] = GRID_POINTS_BYTES_PER_CELL * window
    if "mesh" in what and options.mesh_method == "heightfield":
        parts["mesh"] = (MAPS_BYTES_PER_CELL + HEIGHTFIELD_MESH_BYTES_PER_CELL) * cells
    views_gsd = options.view_gsd or options.gsd
    if (what & {"las", "laz", "ply"} and options.points_from == "views") or \
            ("mesh" in what and options.mesh_method == "tsdf"):
        # aerial_views' grid: nadir + 4 obliques every half footprint
        spacing = max(options.view_size * views_gsd * 0.5, 1e-3)
        n_views = 5 * max(1, math.ceil(w / spacing)) * max(1, math.ceil(h / spacing))
        if what & {"las", "laz", "ply"} and options.points_from == "views":
            rays = math.ceil(options.view_size / VIEW_POINT_STRIDE) ** 2
            parts["points"] = VIEW_POINT_BYTES_PER_RAY * n_views * rays
    if "mesh" in what and options.mesh_method == "tsdf":
        bx = bounds_xy or rect
        side = 16 * (options.voxel_size or options.gsd)
        ex, ey = (bx[2] - bx[0]) / side + 2, (bx[3] - bx[1]) / side + 2
        parts["mesh"] = TSDF_BYTES_PER_BLOCK * min(max(1000, 8 * ex * ey), TSDF_MAX_BLOCKS)
    if field_cache_bytes > 0:
        parts["fields"] = float(field_cache_bytes)
    return parts


def field_cache_size(source: RaySource, options: ExportOptions, rect: tuple[float, float, float, float],
                     spare_bytes: float) -> tuple[int, float] | None:
    """(blocks to keep loaded, their bytes plus one field's load) for an export of ``rect`` from
    a tile renderer (None for other sources).

    The grid is rendered window by window, each window strip by strip over the blocks'
    columns (:func:`citygen.export.raster.render_order`); with as many fields cached as that
    order needs to load each of a window's blocks once (:func:`citygen.export.raster.window_blocks`:
    about two block rows of the window, not all its blocks), each is loaded once per window
    instead of once per row band.  ``spare_bytes`` (the budget less the export's other
    parts) caps that, never below :data:`MIN_FIELD_CACHE` (an export that cannot hold those is
    refused by the memory check)."""
    if not (hasattr(source, "set_cache_size") and hasattr(source, "block_rects")):
        return None
    per_field, load = int(getattr(source, "field_bytes", 0)), int(getattr(source, "field_load_bytes", 0))
    need = int(source.max_cached_blocks)
    if _needs_grid(options):
        grid = OrthoGrid.covering(rect, options.gsd)
        need = max((size for _, size in window_blocks(grid, source.block_rects, options.window_cells,
                                                      options.chunk // options.supersample**2)), default=1)
    fit = int((spare_bytes - load) // per_field) if per_field > 0 else need
    blocks = max(1, min(need, max(MIN_FIELD_CACHE, fit)))
    return blocks, float(blocks * per_field + load)



def check_export_memory(options: ExportOptions, rect: tuple[float, float, float, float], budget_bytes: float,
                        budget_source: str, bounds_xy: tuple[float, float, float, float] | None = None,
                        field_cache_bytes: float = 0.0) -> None:
    """Refuse an export whose :func:`export_memory` exceeds the budget, naming --gsd (or
    --voxel-size) and the smallest value that fits."""
    parts = export_memory(options, rect, bounds_xy, field_cache_bytes)
    total = sum(parts.values())
    if total <= budget_bytes:
        return
    tsdf_voxel = "mesh" in options.what and options.mesh_method == "tsdf" and options.voxel_size is not None
    if tsdf_voxel and max(parts, key=parts.get) == "mesh":
        name, value = "--voxel-size", options.voxel_size

        def need(inv: float) -> float:
            return sum(export_memory(replace(options, voxel_size=1.0 / inv), rect, bounds_xy,
                                     field_cache_bytes).values())
    else:
        name, value = "--gsd", options.gsd

        def need(inv: float) -> float:
            return sum(export_memory(replace(options, gsd=1.0 / inv), rect, bounds_xy, field_cache_bytes).values())

    side = max(rect[2] - rect[0], rect[3] - rect[1])
    floor = need(1.0 / side)
    if total - parts.get("fields", 0.0) <= budget_bytes:
        # the rest fits: a coarser grid would only trade cells for the fields a ray needs
        hint = f"the fields the tile renderer must hold need {format_bytes(parts['fields'])}: raise --memory-budget-gb"
    elif floor > budget_bytes:
        # what does not grow with the raster (one window, GDAL's cache) is over the budget
        hint = f"any {name} needs ~{format_bytes(floor)}: raise --memory-budget-gb"
    else:
        fit = largest_fitting(need, 1.0 / side, 1.0 / value, budget_bytes)
        hint = f"use {name} {nice_up(1.0 / fit)} or more" if fit is not None else "export a smaller --bounds"
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
    raise CitygenError(None, f"{name} {value:g} over {rect[2] - rect[0]:.0f} m x {rect[3] - rect[1]:.0f} m needs "
                             f"~{format_bytes(total)} ({detail}), more than the memory budget of "
                             f"{format_bytes(budget_bytes)} ({budget_source}): {hint}")


# Disk an export may fill, per raster cell (bytes, uncompressed: an upper bound, as compression
# depends on the scene).  A raster is staged, copied into its COG and its overviews (a third
# more) go through a temp file first, all on disk at once: 3x its samples (RGBA 4, float32 DSM 4,
# class 1).  Grid point clouds hold at most one point a cell: a LAS/LAZ record of point format 7
# (36 bytes; LAZ counted uncompressed), a PLY record (27 bytes) staged and then copied.
DISK_BYTES_PER_CELL = {"ortho": 3 * 4, "dsm": 3 * 4, "semantics": 3 * 1, "las": 36, "laz": 36, "ply": 2 * 27}


def export_disk(options: ExportOptions, rect: tuple[float, float, float, float]) -> float:
    """Upper bound of the bytes the grid deliverables of ``options`` write over ``rect`` (local)."""
    w, h = rect[2] - rect[0], rect[3] - rect[1]
    cells = math.ceil(round(w / options.gsd, 6)) * math.ceil(round(h / options.gsd, 6))
    grid_points = options.points_from == "grid"
    return cells * sum(n for k, n in DISK_BYTES_PER_CELL.items()
                       if k in options.what and (k in _NEEDS_GRID or grid_points))


def check_export_disk(options: ExportOptions, rect: tuple[float, float, float, float], out: str | Path) -> None:
    """Refuse an export whose grid files (:func:`export_disk`) cannot fit in the free space of
    ``out``'s file system, naming --gsd and the smallest value that fits."""
    base = Path(out).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    free = shutil.disk_usage(base).free
    need = export_disk(options, rect)
    if need <= free:
        return
    fit = largest_fitting(lambda inv: export_disk(replace(options, gsd=1.0 / inv), rect),
                          1.0 / max(rect[2] - rect[0], rect[3] - rect[1]), 1.0 / options.gsd, free)
    hint = f"use --gsd {nice_up(1.0 / fit)} or more" if fit is not None else "export a smaller --bounds"
    raise CitygenError(out, f"--gsd {options.gsd:g} over {rect[2] - rect[0]:.0f} m x {rect[3] - rect[1]:.0f} m may "
                            f"write up to ~{format_bytes(need)} (uncompressed), more than the {format_bytes(free)} "
                            f"free there: {hint}")


def export_scene(source: RaySource, out: str | Path, options: ExportOptions, *, memory_budget_bytes: float | None = None,
                 memory_budget_source: str = "") -> dict[str, Any]:
    """Render and write the deliverables of ``options`` into ``out``; return the manifest
    (also written to ``out/export.json``).  Refuses, before rendering or creating ``out``, an
    export whose estimated memory exceeds the budget (default: :func:`citygen.checks.memory_budget`'s)."""
    options.validate()
    out = Path(out)
    bounds = check_source(source)
    rect = options.rect or tile_rect(source)
    what = set(options.what)
    # missing inputs, optional packages and memory fail before any rendering
    if "cameras" in what and options.survey is None:
        raise CitygenError(None, "exporting cameras needs the survey (--data transforms.json)")
    if "laz" in what and not laz_available():
        raise CitygenError(out / "points.laz", "writing LAZ needs a LAZ backend: pip install lazrs (or export las)")
    if "mesh" in what and options.mesh_method == "tsdf":
        require_open3d("TSDF meshing", ", or use the heightfield mesh")
    if memory_budget_bytes is None:
        default = memory_budget(None)
        memory_budget_bytes, memory_budget_source = default.bytes, default.source
    bounds_xy = (float(bounds[0, 0]), float(bounds[0, 1]), float(bounds[1, 0]), float(bounds[1, 1]))
    cache = field_cache_size(source, options, rect,
                             memory_budget_bytes - sum(export_memory(options, rect, bounds_xy).values()))
    check_export_memory(options, rect, memory_budget_bytes, memory_budget_source, bounds_xy=bounds_xy,
                        field_cache_bytes=cache[1] if cache else 0.0)
    check_export_disk(options, rect, out)
    if cache is None:
        return _export_scene(source, out, options, rect, what)
    before = source.max_cached_blocks
    source.set_cache_size(cache[0])
    try:
        return _export_scene(source, out, options, rect, what, field_cache={
            "blocks": cache[0], "bytes": cache[1], "field_bytes": int(source.field_bytes),
            "loads_before": source.field_loads})
    finally:
        source.set_cache_size(before)


def _export_scene(source: RaySource, out: Path, options: ExportOptions, rect, what: set[str],
                  field_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    bounds, georef = check_source(source), source.georef
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 3)
        return result

    grid_points = bool(what & {"las", "laz", "ply"}) and options.points_from == "grid"
    if "semantics" in what and not source.classes:
        raise CitygenError(out / "semantics.tif", "the scene has no semantic classes to export")
    maps = grid = None
    with _folder_or_nothing(out):
        if _needs_grid(options):
            maps, grid = timed("grid", _grid_pass, source, out, options, rect, bounds, files, counts, grid_points)
        views = None

        def get_views():
            nonlocal views
            if views is None:
                box = bounds.copy()
                box[0, :2], box[1, :2] = rect[:2], rect[2:]
                views = aerial_views(box, options.view_gsd or options.gsd, image_size=options.view_size)
            return views

        if what & {"las", "laz", "ply"} and not grid_points:
            cloud = timed("render_points", points_from_views, source, get_views(), min_acc=options.min_acc,
                          chunk=options.chunk, progress=options.progress)
            inside = np.all((cloud.xyz[:, :2] >= rect[:2]) & (cloud.xyz[:, :2] <= rect[2:]), axis=1)
            cloud = replace(cloud, xyz=cloud.xyz[inside], rgb=cloud.rgb[inside], classes=cloud.classes[inside])
            counts["points"] = len(cloud)
            for kind, name in (("las", "points.las"), ("laz", "points.laz")):
                if kind in what:
                    files[kind] = str(timed(f"write_{kind}", write_las, cloud, out / name))
            if "ply" in what:
                files["ply"] = str(timed("write_ply", write_points_ply, cloud, out / "points.ply"))
        if "mesh" in what:
            if options.mesh_method == "heightfield":
                mesh = heightfield_mesh(maps)
            else:
                mesh = timed("tsdf", tsdf_mesh, source, get_views(), options.voxel_size or options.gsd,
                             min_acc=options.min_acc, chunk=options.chunk, progress=options.progress)
                mesh = mesh.cropped(rect[:2], rect[2:])
            counts["mesh_vertices"], counts["mesh_faces"] = len(mesh.vertices), len(mesh.faces)
            for fmt in options.mesh_formats:
                files[f"mesh_{fmt}"] = str(timed(f"write_mesh_{fmt}", write_mesh, mesh, out / f"mesh.{fmt}"))
        if "cameras" in what:
            files["cameras"] = str(export_cameras(options.survey, out / "cameras", georef=georef,
                                                  images=options.camera_images, rect=options.rect))
        if views is not None:
            counts["views"] = len(views)

        manifest: dict[str, Any] = {
            "kind": "citygen.export", "version": 1, "georef": georef.to_dict(),
            "rect_local": list(rect), "rect_crs": [rect[0] + georef.origin[0], rect[1] + georef.origin[1],
                                                   rect[2] + georef.origin[0], rect[3] + georef.origin[1]],
            "gsd": options.gsd, "supersample": options.supersample, "min_acc": options.min_acc,
            "classes": {str(i): n for i, n in enumerate(source.classes)},
            "asprs_classification": {n: int(asprs_codes(source.classes)[i]) for i, n in enumerate(source.classes)},
            "dsm_nodata": DSM_NODATA, "points_from": options.points_from, "mesh_method": options.mesh_method,
            "files": {k: Path(v).name if Path(v).parent == out else str(Path(v).relative_to(out))
                      for k, v in files.items()},
            "counts": counts, "timings_s": timings,
        }
        if field_cache is not None:
            # fields loaded (cache misses) by this export: the block-ordered grid loads each
            # field about once per window that needs it
            loads = source.field_loads - field_cache["loads_before"]
            manifest["field_cache"] = {k: v for k, v in field_cache.items() if k != "loads_before"} | {"loads": loads}
        if grid is not None:
            manifest["grid"] = {"width": grid.width, "height": grid.height, "transform": list(grid.transform(georef))[:6]}
        atomic_write_json(out / "export.json", manifest)
        return manifest


@contextlib.contextmanager
def _folder_or_nothing(out: Path):
    """Make ``out``; if what follows fails, remove it again when it was made here and is still
    empty (the writers drop their own temp files), so a refused export leaves nothing."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _grid_pass(source: RaySource, out: Path, options: ExportOptions, rect, bounds: np.ndarray, files: dict,
               counts: dict, grid_points: bool) -> tuple[OrthoMaps | None, OrthoGrid]:
    """Render the grid window by window and stream each window into every file that comes from
    it (rasters, grid point clouds); keep whole maps only for the heightfield mesh.  The files
    appear (each atomically) once the whole grid has rendered; a failure while rendering, or a
    grid with no valid cell, leaves none."""
    what, georef = set(options.what), source.georef
    windows = OrthoWindows(source, options.gsd, rect, supersample=options.supersample, min_acc=options.min_acc,
                           chunk=options.chunk, progress=options.progress, max_cells=options.window_cells)
    grid = windows.grid
    whole = None
    if "mesh" in what and options.mesh_method == "heightfield":
        whole = OrthoMaps.empty(grid, georef, tuple(source.classes))
    raster_paths = {kind: out / f"{kind}.tif" for kind in ("ortho", "dsm", "semantics") if kind in what}
    # LAS offsets: the whole metre below the extent's corner (points are streamed, so their
    # minimum is not known when the header is written)
    las_offsets = np.floor([rect[0] + georef.origin[0], rect[1] + georef.origin[1], bounds[0, 2] + georef.origin[2]])
    valid = n_points = 0
    with contextlib.ExitStack() as stack:
        rasters = stack.enter_context(raster_files(raster_paths, grid, georef, tuple(source.classes)))
        clouds = [stack.enter_context(las_writer(out / f"points.{kind}", georef, source.classes, las_offsets))
                  for kind in ("las", "laz") if grid_points and kind in what]
        ply = stack.enter_context(ply_vertex_writer(out / "points.ply", PLY_POINT, ply_comments(georef, source.classes))) \
            if grid_points and "ply" in what else None
        for part in windows:
            valid += int(part.valid.sum())
            rasters.write(part)
            if whole is not None:
                whole.paste(part)
            if grid_points:
                cloud = points_from_ortho(part)
                n_points += len(cloud)
                for sink in clouds:
                    sink.write(cloud)
                if ply is not None:
                    ply.write(ply_points(cloud))
        if valid == 0:
            raise all_nodata_error(grid, out)  # before any file appears
    files.update({kind: str(path) for kind, path in raster_paths.items()})
    for kind in ("las", "laz", "ply"):
        if grid_points and kind in what:
            files[kind] = str(out / f"points.{kind}")
    counts["raster_cells"] = grid.width * grid.height
    counts["raster_valid_cells"] = valid
    if grid_points:
        counts["points"] = n_points
    return whole, grid


def parse_what(text: str) -> tuple[str, ...]:
    """``"ortho,dsm, las"`` -> ("ortho", "dsm", "las"); ``all`` = every deliverable but LAZ."""
    items = tuple(w.strip().lower() for w in text.split(",") if w.strip())
    if items == ("all",):
        return tuple(w for w in DELIVERABLES if w != "laz")
    return items


def parse_bounds(text: str, origin: tuple[float, float, float]) -> tuple[float, float, float, float]:
    """``"E0,N0,E1,N1"`` in the CRS -> a local rect."""
    try:
        e0, n0, e1, n1 = (float(v) for v in text.split(","))
    except ValueError:
        raise CitygenError(None, f"--bounds must be 4 comma-separated numbers E0,N0,E1,N1 (CRS), got {text!r}") from None
    if not (e1 > e0 and n1 > n0) or not np.all(np.isfinite([e0, n0, e1, n1])):
        raise CitygenError(None, f"--bounds needs E1 > E0 and N1 > N0, got {text!r}")
    return e0 - origin[0], n0 - origin[1], e1 - origin[0], n1 - origin[1]


def core_rect(source: RaySource) -> tuple[float, float, float, float]:
    """The area a tile is responsible for: the union of its blocks' cores (when the source
    has a plan, as ``TileRenderer`` does), clipped to its bounds; else its bounds."""
    x0, y0, x1, y1 = tile_rect(source)
    blocks = getattr(getattr(source, "plan", None), "blocks", None)
    ids = set(getattr(source, "block_ids", ()))
    cores = np.array([b.core for b in blocks if not ids or b.id in ids], np.float64) if blocks else np.zeros((0, 4))
    if len(cores) == 0:
        return x0, y0, x1, y1
    rect = (max(x0, cores[:, 0].min()), max(y0, cores[:, 1].min()), min(x1, cores[:, 2].max()),
            min(y1, cores[:, 3].max()))
    return rect if rect[2] > rect[0] and rect[3] > rect[1] else (x0, y0, x1, y1)


def export_tile(tile_dir: str | Path, out: str | Path, options: ExportOptions, *, bounds_crs: str | None = None,
                device: str = "cpu", memory_budget_bytes: float | None = None,
                memory_budget_source: str = "") -> dict[str, Any]:
    """Open a trained tile and :func:`export_scene` it.

    Args:
        tile_dir: the tile folder (plan.json + block checkpoints).
        bounds_crs: ``"E0,N0,E1,N1"`` in the tile's CRS (default: ``options.rect``, local, when set;
            else the blocks' cores).
        device: cpu or cuda.
        memory_budget_bytes: refuse exports estimated to need more (default: see
            :func:`citygen.checks.memory_budget`).
    """
    tile_dir = Path(tile_dir)
    options.validate()
    if memory_budget_bytes is None:
        default = memory_budget(None)
        memory_budget_bytes, memory_budget_source = default.bytes, default.source
    plan = read_plan(tile_dir)
    if plan is not None:
        # refuse an export that cannot fit before loading any block: the plan's cores (or
        # --bounds) bound the area; export_scene checks again with the exact extent
        cores = np.array([b.core for b in plan.blocks], np.float64)
        rect = parse_bounds(bounds_crs, plan.georef.origin) if bounds_crs else options.rect or \
            (cores[:, 0].min(), cores[:, 1].min(), cores[:, 2].max(), cores[:, 3].max())
        check_export_memory(options, rect, memory_budget_bytes, memory_budget_source)
        check_export_disk(options, rect, out)
    survey = options.survey
    if "cameras" in options.what and survey is None:
        record = read_tile_config(tile_dir) or {}
        if "data" not in record:
            raise CitygenError(tile_dir, "no survey recorded for this tile: pass --data transforms.json for cameras")
        survey = Path(record["data"])
    renderer = open_tile(tile_dir, device=device)
    # --bounds (CRS) first, then a local rect the caller set in the options, else the blocks' cores
    rect = parse_bounds(bounds_crs, renderer.georef.origin) if bounds_crs else options.rect or core_rect(renderer)
    manifest = export_scene(renderer, out, replace(options, survey=survey, rect=rect),
                            memory_budget_bytes=memory_budget_bytes, memory_budget_source=memory_budget_source)
    if renderer.missing_blocks:
        manifest["missing_blocks"] = list(renderer.missing_blocks)
    data = survey or trained_survey(tile_dir) or _checkpoint_survey(tile_dir)
    if "dsm" in options.what and data is not None:
        # real surveys have no ground-truth DSM: check it against the survey's held-out SfM points
        # and the ground its cameras see (citygen.export.survey_check)
        manifest["survey_check"] = dsm_survey_check(Path(out) / "dsm.tif", load_survey(data))
    if renderer.missing_blocks or "survey_check" in manifest:
        atomic_write_json(Path(out) / "export.json", manifest)
    return manifest


def _checkpoint_survey(tile_dir: Path) -> Path | None:
    """The survey a single run (``citygen train OUT``) was trained on, from its checkpoint sidecar."""
    for run_dir in discover(tile_dir).trained.values():
        try:
            root = read_sidecar(block_checkpoint(run_dir)).get("survey_root")
        except CitygenError:
            continue
        if root and (Path(root) / "transforms.json").is_file():
            return Path(root) / "transforms.json"
    return None
