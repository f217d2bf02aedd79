"""Coloured, classified point clouds: from the ortho/DSM grid or from rendered views; LAS/LAZ and PLY.

File conventions:

* **LAS / LAZ**: LAS 1.4, point format 7 (xyz, 16-bit RGB, classification).  Coordinates
  are in the tile's CRS (local + georef origin) with 1 mm scales and offsets at the whole
  metre below the cloud's minimum; the CRS goes in an OGC WKT VLR.  ``classification``
  holds ASPRS codes (:data:`ASPRS_CODES`: ground 2, vegetation 5 (high vegetation),
  building 6, water 9, road 11, any other class 1 = unclassified, unlabelled points 0 =
  never classified); ``user_data`` keeps citygen's own class id (255 = none), so no class is
  lost.  LAZ needs the ``lazrs`` package.
* **PLY** (binary little endian): ``double x, y, z`` in the CRS (exact for UTM-sized
  numbers), ``uchar red, green, blue``, ``uchar class`` (citygen class id, 255 = none).
  Header comments give the CRS and the class names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
import torch

from survey_io import Camera, Georef
from survey_io.atomic import atomic_path

from ..errors import CitygenError
from ..render.sampling import camera_rays
from .ply import write_ply
from .raster import CLASS_NODATA, OrthoMaps
from .source import DEFAULT_CHUNK, RayProgress, RaySource, check_source, render_in_chunks, source_device

#: citygen class name -> ASPRS LAS classification code (LAS 1.4 R15, table 17).
ASPRS_CODES: dict[str, int] = {"ground": 2, "low_vegetation": 3, "vegetation": 5, "high_vegetation": 5,
                               "building": 6, "water": 9, "rail": 10, "road": 11, "bridge": 17}
ASPRS_UNCLASSIFIED = 1
ASPRS_NEVER_CLASSIFIED = 0
#: LAS coordinate resolution, metres.
LAS_SCALE = 0.001


@dataclass
class PointCloud:
    """Points in the tile's local frame.

    Attributes:
        xyz: (N, 3) float64 local coordinates (CRS = xyz + georef.origin).
        rgb: (N, 3) uint8 colours.
        classes: (N,) uint8 class ids into ``class_names`` (255 = no class).
        georef, class_names: the CRS and the class names.
    """

    xyz: np.ndarray
    rgb: np.ndarray
    classes: np.ndarray
    georef: Georef
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.xyz)

    def crs_xyz(self) -> np.ndarray:
        return self.georef.local_to_crs(self.xyz)


def points_from_ortho(maps: OrthoMaps, stride: int = 1) -> PointCloud:
    """One point per valid ortho cell (every ``stride``-th row and column): the cell centre at
    the DSM height, with the ortho colour and the cell's class.  A 2.5D cloud: roofs and
    ground, no facades (use :func:`points_from_views` with oblique views for those)."""
    if stride < 1:
        raise CitygenError(None, f"point stride must be >= 1, got {stride}")
    xs, ys = maps.grid.cell_centers()
    sel = (slice(None, None, stride), slice(None, None, stride))
    ok = maps.valid[sel]
    xyz = np.stack([xs[sel][ok], ys[sel][ok], maps.height[sel][ok].astype(np.float64)], axis=1)
    return PointCloud(xyz=xyz, rgb=maps.rgb[sel][ok], classes=maps.semantics[sel][ok], georef=maps.georef,
                      class_names=maps.classes)


def points_from_views(source: RaySource, views: Sequence[tuple[Camera, np.ndarray]], stride: int = 4, *,
                      min_acc: float = 0.5, clip_to_bounds: bool = True, chunk: int = DEFAULT_CHUNK,
                      progress: bool = True) -> PointCloud:
    """Points where the rays of rendered views hit the surface (every ``stride``-th pixel of
    each view, both directions): ``origin + distance * direction`` for rays with opacity
    >= ``min_acc``.  Oblique views give facades too.  Points from overlapping views are
    all kept (no merging).

    Args:
        views: (camera, OpenCV c2w in the local frame) pairs.
        clip_to_bounds: drop points outside the source's bounds.
    """
    bounds = check_source(source)
    if stride < 1:
        raise CitygenError(None, f"point stride must be >= 1, got {stride}")
    device = source_device(source)
    n_classes = len(source.classes)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total = sum(len(range(0, cam.width, stride)) * len(range(0, cam.height, stride)) for cam, _ in views)
    with RayProgress("points", total=total, enabled=progress) as advance:
        for cam, c2w in views:
            u, v = np.meshgrid(np.arange(0, cam.width, stride), np.arange(0, cam.height, stride))
            pixels = torch.as_tensor(np.stack([u.ravel(), v.ravel()], 1), dtype=torch.float64)
            o, d, _ = camera_rays(cam, c2w, pixels, device=device)
            out = render_in_chunks(source, o, d, chunk=chunk, progress=advance)
            hit = out["acc"] >= min_acc
            xyz = o.cpu().double().numpy()[hit] + out["distance"][hit, None] * d.cpu().double().numpy()[hit]
            rgb = np.clip(np.rint(out["rgb"][hit] * 255), 0, 255).astype(np.uint8)
            cls = out["semantics"][hit].argmax(-1).astype(np.uint8) if n_classes and "semantics" in out \
                else np.full(int(hit.sum()), CLASS_NODATA, np.uint8)
            parts.append((xyz, rgb, cls))
    xyz = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 3))
    rgb = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 3), np.uint8)
    cls = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.uint8)
    if clip_to_bounds:
        inside = np.all((xyz >= bounds[0] - 1e-6) & (xyz <= bounds[1] + 1e-6), axis=1)
        xyz, rgb, cls = xyz[inside], rgb[inside], cls[inside]
    return PointCloud(xyz=xyz, rgb=rgb, classes=cls, georef=source.georef, class_names=tuple(source.classes))


def asprs_codes(class_names: Sequence[str]) -> np.ndarray:
    """(256,) uint8 lookup: citygen class id -> ASPRS code (255 -> 0, never classified)."""
    lut = np.full(256, ASPRS_NEVER_CLASSIFIED, np.uint8)
    for i, name in enumerate(class_names):
        lut[i] = ASPRS_CODES.get(name.lower(), ASPRS_UNCLASSIFIED)
    return lut


def laz_available() -> bool:
    """True when laspy has a LAZ backend (lazrs or laszip)."""
    return bool(laspy.LazBackend.detect_available())


class LasChunks:
    """The sink :func:`las_writer` yields: :meth:`write` appends a :class:`PointCloud` chunk."""

    def __init__(self, writer, path: Path, codes: np.ndarray):
        self._writer, self.path, self._codes, self.count = writer, path, codes, 0

    def write(self, cloud: PointCloud) -> None:
        if len(cloud) == 0:
            return
        header = self._writer.header
        xyz = cloud.crs_xyz()
        span = np.abs(xyz - header.offsets).max()
        if not np.isfinite(span) or span / LAS_SCALE >= 2**31 - 1:
            raise CitygenError(self.path, f"points lie {span:.0f} m from the LAS offset (at most 2,147 km at "
                                          "1 mm resolution)")
        record = laspy.ScaleAwarePointRecord.zeros(len(cloud), header=header)
        record.x, record.y, record.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        rgb16 = cloud.rgb.astype(np.uint16) * 257  # 8-bit -> the full 16-bit range LAS colours use
        record.red, record.green, record.blue = rgb16[:, 0], rgb16[:, 1], rgb16[:, 2]
        record.classification = self._codes[cloud.classes]
        record.user_data = cloud.classes
        self._writer.write_points(record)
        self.count += len(cloud)


@contextlib.contextmanager
def las_writer(path: str | Path, georef: Georef, class_names: Sequence[str],
               offsets: Sequence[float]) -> Iterator[LasChunks]:
    """A LAS 1.4 / LAZ file written chunk by chunk: memory holds one chunk, not the cloud.

    Yields a :class:`LasChunks` to write :class:`PointCloud` chunks into (same frame and
    classes); laspy keeps the header's count and bounds as they come.  The file appears
    atomically on a clean exit; with no point written, or on any failure, nothing is written.

    Args:
        path: ``.las`` or ``.laz`` (needs ``lazrs``).
        georef, class_names: the clouds' CRS and classes.
        offsets: CRS x, y, z of the LAS coordinate offset; every point must lie within
            2,147 km of it (int32 at 1 mm).  :func:`write_las` takes the whole metre below the
            cloud's minimum; a streamed export, the corner of its extent.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".las", ".laz"):
        raise CitygenError(path, "a LAS point cloud needs a .las or .laz suffix")
    if suffix == ".laz" and not laz_available():
        raise CitygenError(path, "writing LAZ needs a LAZ backend: pip install lazrs (or write .las)")
    header = laspy.LasHeader(point_format=7, version="1.4")
    header.scales = np.full(3, LAS_SCALE)
    header.offsets = np.asarray(offsets, np.float64)
    header.add_crs(georef.pyproj_crs)
    with atomic_path(path, suffix=suffix) as tmp:
        with laspy.open(str(tmp), mode="w", header=header, do_compress=suffix == ".laz") as writer:
            sink = LasChunks(writer, path, asprs_codes(class_names))
            yield sink
        if sink.count == 0:
            raise CitygenError(path, "no points to write")


def write_las(cloud: PointCloud, path: str | Path) -> Path:
    """Write ``cloud`` as LAS 1.4 (``.las``) or LAZ (``.laz``, needs ``lazrs``), atomically."""
    if len(cloud) == 0:
        raise CitygenError(path, "no points to write")
    with las_writer(path, cloud.georef, cloud.class_names, offsets=np.floor(cloud.crs_xyz().min(axis=0))) as sink:
        sink.write(cloud)
    return Path(path)


#: The vertex record of point-cloud PLY files.
PLY_POINT = np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
                      ("class", "u1")])


def ply_points(cloud: PointCloud) -> np.ndarray:
    """``cloud`` as :data:`PLY_POINT` records (x, y, z in the CRS)."""
    xyz = cloud.crs_xyz()
    v = np.empty(len(cloud), dtype=PLY_POINT)
    v["x"], v["y"], v["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    v["red"], v["green"], v["blue"] = cloud.rgb[:, 0], cloud.rgb[:, 1], cloud.rgb[:, 2]
    v["class"] = cloud.classes
    return v


def ply_comments(georef: Georef, class_names: Sequence[str]) -> tuple[str, ...]:
    names = ",".join(f"{i}={n}" for i, n in enumerate(class_names))
    return (f"crs {_crs_one_line(georef)}", "coordinates x,y,z in the crs, metres", f"class ids (255 = none): {names}")


def write_points_ply(cloud: PointCloud, path: str | Path) -> Path:
    """Write ``cloud`` as a binary PLY: double x,y,z in the CRS, uchar red/green/blue/class."""
    return write_ply(path, ply_points(cloud), comments=ply_comments(cloud.georef, cloud.class_names))


def _crs_one_line(georef: Georef) -> str:
    return f"EPSG:{georef.epsg}" if georef.epsg is not None else " ".join(georef.crs.split())
