"""Triangle meshes of the scene: a 2.5D heightfield from the DSM (no dependencies) or a TSDF
fusion of rendered depth (open3d, the ``mesh`` extra); written as PLY or OBJ.

Mesh files are in the tile's **local frame** by default (float32 is exact to a millimetre
there, while UTM-sized numbers are not: most mesh tools load vertices as float32); the header
says so and gives the CRS and the origin to add (``comment crs ...`` / ``comment origin E N H``
in PLY, ``# crs`` / ``# origin`` in OBJ).  ``crs_coordinates=True`` writes CRS coordinates
instead (double in PLY).  PLY vertices carry ``uchar red, green, blue`` and, when known,
``uchar class`` (citygen class id); OBJ vertices carry colours as ``v x y z r g b`` (0..1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from survey_io import Camera, Georef
from survey_io.atomic import atomic_path

from ..errors import CitygenError
from ..extras import require_open3d
from ..render.sampling import camera_rays
from .ply import write_ply
from .raster import OrthoMaps
from .source import DEFAULT_CHUNK, RayProgress, RaySource, check_source, render_in_chunks, source_device


@dataclass
class TriangleMesh:
    """A vertex-coloured triangle mesh in the tile's local frame.

    Attributes:
        vertices: (V, 3) float64 local coordinates.
        faces: (F, 3) int32 vertex indices, counter-clockwise seen from outside.
        colors: (V, 3) uint8.
        classes: (V,) uint8 class ids (255 = none), or None.
        georef: the CRS and local origin.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    georef: Georef
    classes: np.ndarray | None = None

    def cropped(self, lo, hi) -> TriangleMesh:
        """The triangles whose three vertices lie in the box [lo, hi] (local, 3 or 2 values:
        xy only), without the vertices no triangle uses any more."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        k = len(lo)
        inside = np.all((self.vertices[:, :k] >= lo) & (self.vertices[:, :k] <= hi), axis=1)
        faces = self.faces[np.all(inside[self.faces], axis=1)]
        used = np.unique(faces)
        remap = np.full(len(self.vertices), -1, np.int64)
        remap[used] = np.arange(len(used))
        return TriangleMesh(vertices=self.vertices[used], faces=remap[faces].astype(np.int32),
                            colors=self.colors[used], georef=self.georef,
                            classes=None if self.classes is None else self.classes[used])

    def face_normals(self) -> np.ndarray:
        """(F, 3) unit normals (by the right-hand rule on the vertex order)."""
        a, b, c = (self.vertices[self.faces[:, k]] for k in range(3))
        n = np.cross(b - a, c - a)
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------
# 2.5D heightfield


def heightfield_mesh(maps: OrthoMaps, stride: int = 1) -> TriangleMesh:
    """Triangulate the DSM: one vertex per valid cell centre (at its height, with the ortho
    colour and class), two triangles per 2x2 block of valid cells (one when three are valid).

    For a 2.5D city (every vertical line meets the surface once) this is the surface itself,
    sampled at the GSD; walls become one-cell-wide steep strips between roof and ground.
    """
    if stride < 1:
        raise CitygenError(None, f"mesh stride must be >= 1, got {stride}")
    sel = (slice(None, None, stride), slice(None, None, stride))
    valid = maps.valid[sel]
    xs, ys = maps.grid.cell_centers()
    H, W = valid.shape
    index = np.full((H, W), -1, np.int64)
    index[valid] = np.arange(int(valid.sum()))
    vertices = np.stack([xs[sel][valid], ys[sel][valid], maps.height[sel][valid].astype(np.float64)], axis=1)

    # Quad corners: a = (r, c) north-west, b = (r, c+1) north-east, c = (r+1, c) south-west,
    # d = (r+1, c+1) south-east.  Rows run south, so (c, d, b) and (c, b, a) are
    # counter-clockwise from above (normals up).
    a, b, c, d = index[:-1, :-1], index[:-1, 1:], index[1:, :-1], index[1:, 1:]
    va, vb, vc, vd = a >= 0, b >= 0, c >= 0, d >= 0
    tris = [
        np.stack([c, d, b], -1)[vb & vc & vd],            # lower-right triangle (a may be missing)
        np.stack([c, b, a], -1)[va & vb & vc & vd],       # upper-left triangle of a full quad
        np.stack([c, d, a], -1)[va & ~vb & vc & vd],      # b missing
        np.stack([a, d, b], -1)[va & vb & ~vc & vd],      # c missing
        np.stack([c, b, a], -1)[va & vb & vc & ~vd],      # d missing
    ]
    faces = np.concatenate([t.reshape(-1, 3) for t in tris]).astype(np.int32)
    return TriangleMesh(vertices=vertices, faces=faces, colors=maps.rgb[sel][valid],
                        classes=maps.semantics[sel][valid], georef=maps.georef)


# ------------------------------------------------------------------------------------------
# TSDF fusion (open3d)


#: most voxel blocks the TSDF grid allocates (citygen.export.run counts its memory from this).
TSDF_MAX_BLOCKS = 4_000_000


def _drop_depth_edges(depth: np.ndarray, jump: float) -> np.ndarray:
    """Zero the pixels next to a depth jump larger than ``jump``.

    A pixel on a roof edge projects voxels of the wall below onto the ground far behind it,
    which writes free space into the building; without those pixels no view claims the
    inside of a wall is empty (other views still see both sides of the edge).
    """
    pad = np.pad(depth, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    jumps = [np.abs(centre - pad[1 + dy:pad.shape[0] - 1 + dy, 1 + dx:pad.shape[1] - 1 + dx])
             for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    return np.where(np.max(jumps, axis=0) > jump, 0.0, depth)


def tsdf_mesh(source: RaySource, views: Sequence[tuple[Camera, np.ndarray]], voxel_size: float, *,
              sdf_trunc: float | None = None, min_acc: float = 0.5, crop_to_bounds: bool = True,
              chunk: int = DEFAULT_CHUNK, progress: bool = True) -> TriangleMesh:
    """Fuse the rendered depth and colour of ``views`` into a TSDF (open3d's scalable volume)
    and extract its surface by marching cubes.

    Views are rendered as distortion-free pinhole cameras with their intrinsics; pixels with
    opacity below ``min_acc`` carry no depth.

    Args:
        views: (camera, OpenCV c2w in the local frame) pairs, e.g. :func:`aerial_views`.
        voxel_size: TSDF voxel edge, metres.
        sdf_trunc: truncation distance (default 4 voxels).
        crop_to_bounds: drop triangles outside the source's bounds.
    """
    o3d = require_open3d("TSDF meshing", ", or use the heightfield mesh")

    import open3d.core as o3c


    bounds = check_source(source)
    if not voxel_size > 0:
        raise CitygenError(None, f"voxel size must be positive, got {voxel_size}")
    trunc_voxels = (sdf_trunc / voxel_size) if sdf_trunc else 4.0
    # Sparse grid of 16^3-voxel blocks allocated where the depth maps put a surface (open3d's
    # tensor VoxelBlockGrid; its legacy ScalableTSDFVolume loses surfaces far from the camera).
    block_side = 16 * voxel_size
    extent = (bounds[1] - bounds[0]) / block_side + 2
    capacity = int(min(max(1000, 8 * extent[0] * extent[1]), TSDF_MAX_BLOCKS))
    grid = o3d.t.geometry.VoxelBlockGrid(
        attr_names=("tsdf", "weight", "color"), attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
        attr_channels=((1), (1), (3)), voxel_size=float(voxel_size), block_resolution=16,
        block_count=capacity, device=o3c.Device("CPU:0"))
    device = source_device(source)
    far = float(np.linalg.norm(bounds[1] - bounds[0])) * 4.0
    with RayProgress("TSDF views", total=sum(c.width * c.height for c, _ in views), enabled=progress) as advance:
        for cam, c2w in views:
            pinhole = replace(cam, camera_model="PINHOLE", k1=0.0, k2=0.0, k3=0.0, k4=0.0, p1=0.0, p2=0.0)
            o, d, z_scale = camera_rays(pinhole, c2w, device=device)
            out = render_in_chunks(source, o, d, chunk=chunk, keys=("rgb", "distance", "acc"), progress=advance)
            H, W = cam.height, cam.width
            depth = np.where(out["acc"] >= min_acc, out["distance"] * z_scale.cpu().numpy(), 0.0).reshape(H, W)
            depth = _drop_depth_edges(depth, trunc_voxels * voxel_size)
            depth = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(depth, np.float32)))
            color = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(out["rgb"].reshape(H, W, 3), np.float32)))
            # open3d puts pixel centres at integer coordinates, citygen at +0.5
            K = o3c.Tensor(np.array([[cam.fl_x, 0, cam.cx - 0.5], [0, cam.fl_y, cam.cy - 0.5], [0, 0, 1]]),
                           o3c.float64)
            w2c = o3c.Tensor(np.linalg.inv(np.asarray(c2w, np.float64)), o3c.float64)
            blocks = grid.compute_unique_block_coordinates(depth, K, w2c, 1.0, far, trunc_voxel_multiplier=trunc_voxels)
            grid.integrate(blocks, depth, color, K, w2c, 1.0, far, trunc_voxel_multiplier=trunc_voxels)
    m = grid.extract_triangle_mesh(weight_threshold=0.5).to_legacy()
    vertices = np.asarray(m.vertices, np.float64)
    faces = np.asarray(m.triangles, np.int32)
    colors = np.clip(np.rint(np.asarray(m.vertex_colors) * 255), 0, 255).astype(np.uint8)
    if len(faces) == 0:
        raise CitygenError(None, "TSDF fusion produced no surface (no view saw the scene?)")
    mesh = TriangleMesh(vertices=vertices, faces=faces, colors=colors, georef=source.georef)
    return mesh.cropped(bounds[0] - voxel_size, bounds[1] + voxel_size) if crop_to_bounds else mesh


# ------------------------------------------------------------------------------------------
# Writers


def _header_lines(mesh: TriangleMesh, crs_coordinates: bool) -> list[str]:
    crs = f"EPSG:{mesh.georef.epsg}" if mesh.georef.epsg is not None else " ".join(mesh.georef.crs.split())
    e, n, h = mesh.georef.origin
    if crs_coordinates:
        return [f"crs {crs}", "coordinates are in the crs, metres"]
    return [f"crs {crs}", f"origin {e:.6f} {n:.6f} {h:.6f}",
            "coordinates are local metres: crs = vertex + origin"]


def write_mesh(mesh: TriangleMesh, path: str | Path, crs_coordinates: bool = False) -> Path:
    """Write ``mesh`` as binary PLY (``.ply``) or OBJ (``.obj``), atomically (see the module doc)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".ply", ".obj"):
        raise CitygenError(path, "a mesh needs a .ply or .obj suffix")
    if len(mesh.faces) == 0:
        raise CitygenError(path, "the mesh has no triangles")
    xyz = mesh.georef.local_to_crs(mesh.vertices) if crs_coordinates else mesh.vertices
    if suffix == ".ply":
        ftype = "<f8" if crs_coordinates else "<f4"
        fields = [("x", ftype), ("y", ftype), ("z", ftype), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
        if mesh.classes is not None:
            fields.append(("class", "u1"))
        v = np.empty(len(xyz), dtype=fields)
        v["x"], v["y"], v["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        v["red"], v["green"], v["blue"] = mesh.colors[:, 0], mesh.colors[:, 1], mesh.colors[:, 2]
        if mesh.classes is not None:
            v["class"] = mesh.classes
        return write_ply(path, v, mesh.faces, comments=tuple(_header_lines(mesh, crs_coordinates)))
    with atomic_path(path, suffix=".obj") as tmp, open(tmp, "w", encoding="ascii") as f:
        f.write("".join(f"# {line}\n" for line in ["citygen mesh", *_header_lines(mesh, crs_coordinates)]))
        fmt = "v %.3f %.3f %.3f %.4f %.4f %.4f" if crs_coordinates else "v %.4f %.4f %.4f %.4f %.4f %.4f"
        _write_rows(f, fmt, np.hstack([xyz, mesh.colors / 255.0]))
        _write_rows(f, "f %d %d %d", mesh.faces.astype(np.int64) + 1)
    return path


def _write_rows(f, row_format: str, rows: np.ndarray, chunk: int = 1 << 16) -> None:
    """Text rows, one ``%``-format call per chunk (about 3x faster than ``np.savetxt``)."""
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        f.write(((row_format + "\n") * len(part)) % tuple(part.ravel().tolist()))
