"""Deliverables of a tile, in its CRS: true orthophoto, DSM and semantic GeoTIFFs, LAS/LAZ and
PLY point clouds, meshes (2.5D heightfield, or TSDF fusion with open3d), and the cameras as
``transforms.json``.  Everything renders through a :class:`RaySource` (the tile renderer, or
any scene with its ray API)."""

from .cameras import export_cameras
from .compare import compare_to_ground_truth, dsm_error, ortho_psnr, semantic_agreement
from .mesh import TriangleMesh, heightfield_mesh, tsdf_mesh, write_mesh
from .points import ASPRS_CODES, PointCloud, points_from_ortho, points_from_views, write_las, write_points_ply
from .raster import DSM_NODATA, OrthoGrid, OrthoMaps, render_ortho, write_dsm, write_ortho, write_semantics
from .run import DELIVERABLES, ExportOptions, export_scene
from .source import RaySource
from .views import aerial_views

__all__ = [
    "ASPRS_CODES", "DELIVERABLES", "DSM_NODATA", "ExportOptions", "OrthoGrid", "OrthoMaps", "PointCloud",
    "RaySource", "TriangleMesh", "aerial_views", "compare_to_ground_truth", "dsm_error", "export_cameras",
    "export_scene", "heightfield_mesh", "ortho_psnr", "points_from_ortho", "points_from_views", "render_ortho",
    "semantic_agreement", "tsdf_mesh", "write_dsm", "write_las", "write_mesh", "write_ortho", "write_points_ply",
    "write_semantics",
]
