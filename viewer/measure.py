"""Picking and measuring on a rendered frame: pixel + z-depth -> 3D point -> CRS / lon-lat.

A click lands in window pixels; the frame under it may be coarser (progressive rendering),
so lookups scale the click into the frame's own pixel grid.  Points are in the local ENU
frame; :class:`survey_io.Georef` takes them to the tile's CRS and to lon/lat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from citygen import cameras
from survey_io import Camera, Georef

from .colormap import EMPTY_ACC


def unproject(camera: Camera, c2w: np.ndarray, u: float, v: float, z: float) -> np.ndarray:
    """The local-frame point at z-depth ``z`` seen at continuous pixel position (u, v)
    (pixel (i, j) spans [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5))."""
    return cameras.unproject(camera, c2w, np.float64(u), np.float64(v), np.float64(z))


def project(camera: Camera, c2w: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local points (N, 3) -> continuous pixel positions (N, 2) and z-depths (N,)."""
    return cameras.project(camera, c2w, np.asarray(points, np.float64))


@dataclass
class Pick:
    """What lies under a click: the local point, its CRS and lon/lat/height (None without a
    georeference), its class."""

    local: np.ndarray
    crs: np.ndarray | None
    lonlat: np.ndarray | None
    depth: float
    class_id: int | None
    class_name: str | None

    def describe(self, crs_name: str = "CRS") -> str:
        cls = f"{self.class_name} | " if self.class_name else ""
        if self.crs is None:
            x, y, z = self.local
            return f"{cls}local x {x:.2f} y {y:.2f} z {z:.2f} m (no georeference)"
        e, n, h = self.crs
        lon, lat = self.lonlat[:2]
        return f"{cls}{crs_name} E {e:.2f} N {n:.2f} H {h:.2f} m | lon {lon:.7f} lat {lat:.7f}"


def pick(frame, camera: Camera, c2w: np.ndarray, x: float, y: float, georef: Georef | None,
         classes: tuple[str, ...] = ()) -> Pick | None:
    """The point under window position (x, y) of a ``frame`` (see :class:`viewer.app.Frame`)
    rendered with ``camera`` (window-sized intrinsics); None over empty space."""
    h, w = frame.depth.shape
    sx, sy = w / camera.width, h / camera.height
    i = int(np.clip(np.floor(x * sx), 0, w - 1))
    j = int(np.clip(np.floor(y * sy), 0, h - 1))
    z = float(frame.depth[j, i])
    if frame.acc[j, i] < EMPTY_ACC or not np.isfinite(z) or z <= 0:
        return None
    # the frame pixel's centre, back in window pixel units
    u, v = (i + 0.5) / sx, (j + 0.5) / sy
    local = unproject(camera, c2w, u, v, z)
    cid = None if frame.class_ids is None else int(frame.class_ids[j, i])
    name = classes[cid] if cid is not None and cid < len(classes) else None
    if georef is None:
        return Pick(local, None, None, z, cid, name)
    return Pick(local, georef.local_to_crs(local), georef.local_to_lonlat(local), z, cid, name)


def ground_sample_distance(camera: Camera, depth: float) -> float:
    """Metres per window pixel at z-depth ``depth`` (fronto-parallel surface)."""
    return depth / camera.fl_x


@dataclass
class Measurement:
    """Two-click distance measurement; a third click starts a new one."""

    points: list[np.ndarray] = field(default_factory=list)

    def add(self, point: np.ndarray) -> None:
        if len(self.points) >= 2:
            self.points = []
        self.points.append(np.asarray(point, np.float64))

    def clear(self) -> None:
        self.points = []

    @property
    def complete(self) -> bool:
        return len(self.points) == 2

    @property
    def distance(self) -> float | None:
        """Straight-line distance between the two points, metres."""
        return float(np.linalg.norm(self.points[1] - self.points[0])) if self.complete else None

    @property
    def height_difference(self) -> float | None:
        """Second point's height minus the first's, metres."""
        return float(self.points[1][2] - self.points[0][2]) if self.complete else None

    @property
    def horizontal_distance(self) -> float | None:
        return float(np.linalg.norm(self.points[1][:2] - self.points[0][:2])) if self.complete else None

    def describe(self) -> str:
        if not self.points:
            return ""
        if not self.complete:
            return "measure: click the second point"
        return (f"distance {self.distance:.2f} m | horizontal {self.horizontal_distance:.2f} m | "
                f"dz {self.height_difference:+.2f} m")
