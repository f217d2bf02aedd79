"""``citygen export``: render a tile's deliverables into one folder, with a manifest.

Files written into ``out`` (each only when asked for)::

    ortho.tif            true orthophoto, RGBA uint8 (alpha 0 = nodata)
    dsm.tif              surface heights, float32, CRS vertical, nodata -9999
    semantics.tif        class ids, uint8, nodata 255
    points.las/.laz/.ply classified, coloured point cloud (see citygen.export.points)
    mesh.ply, mesh.obj   triangle mesh, local frame + origin in the header (see citygen.export.mesh)
    cameras/             transforms.json of the survey's cameras (see citygen.export.cameras)
    export.json          manifest: georef, grid, classes, ASPRS codes, files, counts, timings
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from survey_io.atomic import atomic_write_json

from ..errors import CitygenError
from .cameras import export_cameras
from .mesh import heightfield_mesh, require_open3d, tsdf_mesh, write_mesh
from .points import asprs_codes, laz_available, points_from_ortho, points_from_views, write_las, write_points_ply
from .raster import DSM_NODATA, render_ortho, tile_rect, write_dsm, write_ortho, write_semantics
from .source import DEFAULT_CHUNK, RaySource, check_source
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
        if not self.gsd > 0:
            raise CitygenError(None, f"gsd must be positive, got {self.gsd}")
        if self.view_size < 8 or self.supersample < 1:
            raise CitygenError(None, f"view_size must be >= 8 and supersample >= 1, got {self.view_size}, "
                                     f"{self.supersample}")
        if self.voxel_size is not None and not self.voxel_size > 0:
            raise CitygenError(None, f"voxel_size must be positive, got {self.voxel_size}")


def export_scene(source: RaySource, out: str | Path, options: ExportOptions) -> dict[str, Any]:
    """Render and write the deliverables of ``options`` into ``out``; return the manifest
    (also written to ``out/export.json``)."""
    options.validate()
    out = Path(out)
    bounds = check_source(source)
    rect = options.rect or tile_rect(source)
    georef = source.georef
    what = set(options.what)
    # missing inputs and optional packages fail before any rendering
    if "cameras" in what and options.survey is None:
        raise CitygenError(None, "exporting cameras needs the survey (--data transforms.json)")
    if "laz" in what and not laz_available():
        raise CitygenError(out / "points.laz", "writing LAZ needs a LAZ backend: pip install lazrs (or export las)")
    if "mesh" in what and options.mesh_method == "tsdf":
        require_open3d()
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 3)
        return result

    needs_grid = bool(what & _NEEDS_GRID) or (bool(what & {"las", "laz", "ply"}) and options.points_from == "grid") \
        or ("mesh" in what and options.mesh_method == "heightfield")
    maps = None
    if needs_grid:
        maps = timed("render_ortho", render_ortho, source, options.gsd, rect, supersample=options.supersample,
                     min_acc=options.min_acc, chunk=options.chunk, progress=options.progress)
        counts["raster_cells"] = int(maps.valid.size)
        counts["raster_valid_cells"] = int(maps.valid.sum())
        maps.require_data(out)  # before any file is written
    out.mkdir(parents=True, exist_ok=True)
    if "ortho" in what:
        files["ortho"] = str(write_ortho(maps, out / "ortho.tif"))
    if "dsm" in what:
        files["dsm"] = str(write_dsm(maps, out / "dsm.tif"))
    if "semantics" in what:
        files["semantics"] = str(write_semantics(maps, out / "semantics.tif"))

    views = None

    def get_views():
        nonlocal views
        if views is None:
            box = bounds.copy()
            box[0, :2], box[1, :2] = rect[:2], rect[2:]
            views = aerial_views(box, options.view_gsd or options.gsd, image_size=options.view_size)
        return views

    if what & {"las", "laz", "ply"}:
        if options.points_from == "grid":
            cloud = points_from_ortho(maps)
        else:
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
    if maps is not None:
        manifest["grid"] = {"width": maps.grid.width, "height": maps.grid.height,
                            "transform": list(maps.grid.transform(georef))[:6]}
    atomic_write_json(out / "export.json", manifest)
    return manifest


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
                device: str = "cpu") -> dict[str, Any]:
    """Open a trained tile and :func:`export_scene` it.

    Args:
        tile_dir: the tile folder (plan.json + block checkpoints).
        bounds_crs: ``"E0,N0,E1,N1"`` in the tile's CRS (default: the blocks' cores).
        device: cpu or cuda.
    """
    from ..render.tile import TileRenderer
    from ..tile import read_tile_config

    tile_dir = Path(tile_dir)
    options.validate()
    survey = options.survey
    if "cameras" in options.what and survey is None:
        record = read_tile_config(tile_dir) or {}
        if "data" not in record:
            raise CitygenError(tile_dir, "no survey recorded for this tile: pass --data transforms.json for cameras")
        survey = Path(record["data"])
    renderer = TileRenderer.open(tile_dir, device=device)
    rect = parse_bounds(bounds_crs, renderer.georef.origin) if bounds_crs else core_rect(renderer)
    manifest = export_scene(renderer, out, replace(options, survey=survey, rect=rect))
    if renderer.missing_blocks:
        manifest["missing_blocks"] = list(renderer.missing_blocks)
        atomic_write_json(Path(out) / "export.json", manifest)
    return manifest
