"""The ground the view frusta are intersected with: a horizontal plane or a heightfield.

A :class:`GroundModel` answers two questions in the tile's local frame (metres, +Z up):
the ground height under a point, and where a ray first meets the ground.  Rays are
followed at most ``max_dist`` horizontal metres; a ray that has not met the ground by then
(or never will, above the horizon) ends at that distance, at ground height -- so an oblique
view's footprint reaches out to the clip distance, not to infinity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyproj
from PIL import Image

from survey_io import Georef, Survey, SurveyError
from survey_io.colmap import read_colmap_point_table, read_colmap_points
from survey_io.geotiff import read_geotiff
from survey_io.ingest import SPARSE_MODEL, heldout_point_mask

from ..cameras import unproject
from ..errors import CitygenError
from .config import PartitionConfig

#: the ground source of the last-resort guess (a flight height below the cameras): no ground is known.
GUESSED_GROUND_SOURCE = "median camera height - flight_height_m"
#: SfM points used for field boxes: at most this reprojection error (COLMAP's own default filter) ...
BOX_POINT_MAX_ERROR_PX = 4.0
#: ... and seen by at least this many views (two-view points are the noisiest; a model written
#: without tracks, track length 0, keeps its points).
BOX_POINT_MIN_TRACK = 3


@dataclass
class GroundModel:
    """A plane ``z = height`` or a north-up heightfield sampled on a regular grid.

    Attributes:
        height: the plane height (local metres); for a heightfield, the height used outside it.
        heights: (rows, cols) float64 heights or None for a plane; row 0 is the northern edge.
        x0, y0: local coordinates of the heightfield's north-west corner (pixel edges).
        dx, dy: pixel size in metres (both positive; rows run southwards).
        source: where the heights came from, for the plan's record.
    """

    height: float
    heights: np.ndarray | None = None
    x0: float = 0.0
    y0: float = 0.0
    dx: float = 1.0
    dy: float = 1.0
    source: str = "plane"

    # -- construction -------------------------------------------------------------------
    @classmethod
    def plane(cls, height: float, source: str = "plane") -> GroundModel:
        return cls(height=float(height), source=source)

    @classmethod
    def from_array(cls, heights: np.ndarray, x0: float, y0: float, dx: float, dy: float,
                   source: str = "heightfield") -> GroundModel:
        """A heightfield; NaN (nodata) cells are filled with the median of the valid ones."""
        h = np.array(heights, dtype=np.float64)
        if h.ndim != 2 or h.size == 0:
            raise CitygenError(source, f"heightfield must be a non-empty 2-D array, got shape {h.shape}")
        valid = np.isfinite(h)
        if not valid.any():
            raise CitygenError(source, "heightfield has no valid heights")
        fill = float(np.median(h[valid]))
        h[~valid] = fill
        return cls(height=fill, heights=h, x0=float(x0), y0=float(y0), dx=float(abs(dx)), dy=float(abs(dy)),
                   source=source)

    @classmethod
    def from_points(cls, points: np.ndarray, cell_m: float = 10.0, source: str = "sparse points") -> GroundModel:
        """A heightfield of the median height of ``points`` (N, 3) in each ``cell_m`` cell over
        their extent (the visible surface, roofs included); empty cells get the median of the others."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        if not len(pts):
            raise CitygenError(source, "no points to build a heightfield from")
        x0, y1 = float(pts[:, 0].min()), float(pts[:, 1].max())
        cols = int(np.floor((pts[:, 0].max() - x0) / cell_m)) + 1
        rows = int(np.floor((y1 - pts[:, 1].min()) / cell_m)) + 1
        c = np.minimum(((pts[:, 0] - x0) / cell_m).astype(np.int64), cols - 1)
        r = np.minimum(((y1 - pts[:, 1]) / cell_m).astype(np.int64), rows - 1)
        cell = r * cols + c
        order = np.lexsort((pts[:, 2], cell))
        cells, start, count = np.unique(cell[order], return_index=True, return_counts=True)
        h = np.full(rows * cols, np.nan)
        h[cells] = pts[order, 2][start + (count - 1) // 2]
        return cls.from_array(h.reshape(rows, cols), x0, y1, cell_m, cell_m, source=source)

    @classmethod
    def from_record(cls, record: dict, georef: Georef) -> GroundModel:
        """The model a plan's ground record (:meth:`describe`) stands for: the plane, the GeoTIFF
        it was read from when that file is still there, else the heightfield's fill height."""
        if record.get("kind") == "heightfield":
            path = Path(str(record.get("source", "")))
            if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
                return cls.from_geotiff(path, georef)
            return cls.plane(float(record.get("fill_height", 0.0)), source=f"fill height of {path}")
        return cls.plane(float(record.get("height", 0.0)), source=str(record.get("source", "plane")))

    @classmethod
    def from_geotiff(cls, path: str | Path, georef: Georef) -> GroundModel:
        """A DSM/DTM GeoTIFF (north-up, same CRS as ``georef``; heights in the CRS's vertical units)."""
        path = Path(path)
        data, transform, crs, nodata = _read_elevation(path)
        if crs is not None and georef.pyproj_crs != _pyproj(crs):
            raise CitygenError(path, f"GeoTIFF CRS {crs} differs from the survey's {georef.crs}; reproject it first")
        a, b, c, d, e, f = transform
        if b != 0 or d != 0 or e >= 0:
            raise CitygenError(path, "only north-up GeoTIFFs (no rotation) are supported as ground models")
        h = np.asarray(data, dtype=np.float64)
        if nodata is not None:
            h = np.where(h == nodata, np.nan, h)
        ox, oy, oz = georef.origin
        return cls.from_array(h - oz, c - ox, f - oy, a, -e, source=str(path))

    # -- queries ------------------------------------------------------------------------
    @property
    def is_plane(self) -> bool:
        return self.heights is None

    def height_at(self, xy: np.ndarray) -> np.ndarray:
        """Ground height under local points ``xy`` (..., 2), bilinear in the heightfield."""
        xy = np.asarray(xy, dtype=np.float64)
        if self.heights is None:
            return np.full(xy.shape[:-1], self.height)
        rows, cols = self.heights.shape
        # pixel-centre coordinates: column u, row v
        u = (xy[..., 0] - self.x0) / self.dx - 0.5
        v = (self.y0 - xy[..., 1]) / self.dy - 0.5
        inside = (u >= -0.5) & (u <= cols - 0.5) & (v >= -0.5) & (v <= rows - 0.5)
        u = np.clip(u, 0, cols - 1)
        v = np.clip(v, 0, rows - 1)
        u0 = np.minimum(np.floor(u).astype(np.int64), max(cols - 2, 0))
        v0 = np.minimum(np.floor(v).astype(np.int64), max(rows - 2, 0))
        u1 = np.minimum(u0 + 1, cols - 1)
        v1 = np.minimum(v0 + 1, rows - 1)
        fu, fv = u - u0, v - v0
        h = self.heights
        top = h[v0, u0] * (1 - fu) + h[v0, u1] * fu
        bot = h[v1, u0] * (1 - fu) + h[v1, u1] * fu
        return np.where(inside, top * (1 - fv) + bot * fv, self.height)

    def height_range(self, rect: tuple[float, float, float, float] | None = None) -> tuple[float, float]:
        """(min, max) ground height, over ``rect`` = (x0, y0, x1, y1) when given."""
        if self.heights is None:
            return self.height, self.height
        h = self.heights
        if rect is not None:
            rows, cols = h.shape
            c0 = int(np.clip(np.floor((rect[0] - self.x0) / self.dx), 0, cols))
            c1 = int(np.clip(np.ceil((rect[2] - self.x0) / self.dx), 0, cols))
            r0 = int(np.clip(np.floor((self.y0 - rect[3]) / self.dy), 0, rows))
            r1 = int(np.clip(np.ceil((self.y0 - rect[1]) / self.dy), 0, rows))
            h = h[r0:r1, c0:c1]
            if h.size == 0:
                return self.height, self.height
        return float(h.min()), float(h.max())

    def intersect(self, origins: np.ndarray, dirs: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
        """Where rays meet the ground, clipped at ``max_dist`` horizontal metres.

        Args:
            origins, dirs: (M, 3) ray origins and directions (any length) in the local frame.
            max_dist: horizontal clip distance.

        Returns:
            points (M, 3): the hit, or the clip point at ground height; hit (M,) bool: the ray
            meets the ground at all (possibly beyond the clip distance).  A ray that never does
            ends ``max_dist`` away horizontally (at the camera's foot if it points straight up).
        """
        o = np.asarray(origins, dtype=np.float64)
        d = np.asarray(dirs, dtype=np.float64)
        horiz = np.linalg.norm(d[:, :2], axis=1)
        # parameter t at which the ray has gone max_dist horizontally
        with np.errstate(divide="ignore", invalid="ignore"):
            t_clip = np.where(horiz > 0, max_dist / horiz, np.inf)
        if self.heights is None:
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (self.height - o[:, 2]) / d[:, 2]
            hit = (d[:, 2] != 0) & (t > 0)
        else:
            t, hit = self._march(o, d, t_clip)
        t_end = np.where(hit, np.minimum(t, t_clip), np.where(np.isfinite(t_clip), t_clip, 0.0))
        pts = o + d * t_end[:, None]
        pts[:, 2] = self.height_at(pts[:, :2])
        return pts, hit

    def _march(self, o: np.ndarray, d: np.ndarray, t_clip: np.ndarray,
               refine: int = 12) -> tuple[np.ndarray, np.ndarray]:
        """First crossing of the heightfield: march the slab between its min and max height
        (up to the clip distance) half a pixel at a time, then bisect.  Beyond the raster the
        ground is the plane ``height``.  Every downward ray hits, at the latest at the minimum."""
        lo = min(float(self.heights.min()), self.height)
        hi = max(float(self.heights.max()), self.height)
        t = np.full(len(o), np.inf)
        hit = d[:, 2] < 0
        if not hit.any():
            return t, hit
        od, dd, tc = o[hit], d[hit], t_clip[hit]
        t_top = np.maximum((od[:, 2] - hi) / -dd[:, 2], 0.0)
        t_bot = np.maximum((od[:, 2] - lo) / -dd[:, 2], 0.0)
        t_end = np.maximum(np.minimum(t_bot, tc), t_top)
        # march a fixed distance per step (half a pixel; coarser only for extreme slab lengths),
        # keeping only the rays still looking for the surface
        speed = np.linalg.norm(dd, axis=1)
        seg = (t_end - t_top) * speed
        step_len = max(0.5 * min(self.dx, self.dy), float(seg.max()) / 8192)
        dt = step_len / speed
        found = np.zeros(len(od), dtype=bool)
        t_below = t_bot.copy()     # first sample found below the surface
        t_above = t_top.copy()     # the sample before it
        active = np.flatnonzero(seg >= 0)
        k = 0
        while active.size:
            t_k = np.minimum(t_top[active] + k * dt[active], t_end[active])
            p = od[active] + dd[active] * t_k[:, None]
            below = p[:, 2] <= self.height_at(p[:, :2])
            hit_now = active[below]
            t_below[hit_now] = t_k[below]
            t_above[hit_now] = np.maximum(t_k[below] - dt[hit_now], t_top[hit_now])
            found[hit_now] = True
            done = below | (t_k >= t_end[active])
            active = active[~done]
            k += 1
        a, b = t_above[found], t_below[found]
        of, df = od[found], dd[found]
        for _ in range(refine):
            m = 0.5 * (a + b)
            p = of + df * m[:, None]
            below = p[:, 2] <= self.height_at(p[:, :2])
            b = np.where(below, m, b)
            a = np.where(below, a, m)
        t_down = t_bot.copy()      # not found within the clip distance: beyond it (clipped later)
        t_down[found] = b
        t[hit] = t_down
        return t, hit

    def describe(self) -> dict:
        """A JSON record of the model for plan.json."""
        if self.heights is None:
            return {"kind": "plane", "height": self.height, "source": self.source}
        lo, hi = self.height_range()
        return {"kind": "heightfield", "source": self.source, "shape": list(self.heights.shape),
                "pixel_size": [self.dx, self.dy], "min": lo, "max": hi, "fill_height": self.height}


def _pyproj(crs):
    return pyproj.CRS.from_user_input(crs)


def _read_elevation(path: Path):
    """(band 1, affine as (a, b, c, d, e, f), crs, nodata) of a GeoTIFF, via survey_io."""
    raster = read_geotiff(path)
    data = raster.array if raster.array.ndim == 2 else raster.array[..., 0]
    t = raster.transform
    return data, (t.a, t.b, t.c, t.d, t.e, t.f), raster.crs, raster.nodata


# -- the "auto" ground estimate ------------------------------------------------------------
def estimate_ground(survey: Survey, config: PartitionConfig, points: np.ndarray | None = None,
                    max_depth_images: int = 24) -> GroundModel:
    """A ground plane when nothing better is given, in this order:

    1. ``points`` (sparse SfM / lidar points, local frame): their median height -- the median
       visible surface, which is what footprints should be cut at;
    2. depth maps of the survey: the median height of their unprojected pixels (up to
       ``max_depth_images`` images spread over the survey, a sparse pixel grid of each);
    3. the median camera height minus ``config.flight_height_m`` (a guess, noted in the plan).
    """
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        if len(pts):
            return GroundModel.plane(float(np.median(pts[:, 2])), source="median of sparse points")
    with_depth = [im for im in survey.images if im.depth is not None]
    if with_depth:
        pick = np.linspace(0, len(with_depth) - 1, min(max_depth_images, len(with_depth))).round().astype(int)
        zs = [_depth_heights(survey, with_depth[i]) for i in sorted(set(pick.tolist()))]
        z = np.concatenate(zs)
        if z.size:
            return GroundModel.plane(float(np.median(z)), source="median of depth-map points")
    cam_z = np.median([im.c2w[2, 3] for im in survey.images])
    return GroundModel.plane(float(cam_z - config.flight_height_m),
                             source=f"{GUESSED_GROUND_SOURCE} ({config.flight_height_m} m)")


def ground_is_known(ground: dict) -> bool:
    """Whether a plan's ground record (:meth:`GroundModel.describe`) came from data (a DTM, SfM or
    depth points, a given height) rather than the flight-height guess."""
    return bool(ground) and not str(ground.get("source", "")).startswith(GUESSED_GROUND_SOURCE)


def load_sparse_points(folder: str | Path) -> np.ndarray:
    """(N, 3) points of a COLMAP model folder (cameras/images/points3D, .bin or .txt).

    Read through survey_io's checked COLMAP reader: pycolmap alone trusts a truncated
    ``points3D.bin`` and allocates whatever its garbage track lengths ask for.
    """
    xyz, _rgb = read_colmap_points(folder)
    return xyz


def load_box_points(survey_root: str | Path) -> np.ndarray | None:
    """(N, 3) SfM points of ``survey_root/sparse/0`` fit to bound a field's heights, or None
    without a model.

    Left out: the evaluation tenth (:func:`survey_io.ingest.heldout_point_mask`, the points
    ``citygen ingest`` copies to ``points3D_heldout.npz`` -- a box fitted to them would leak
    into the depth check), points with a reprojection error above ``BOX_POINT_MAX_ERROR_PX``
    and points seen by fewer than ``BOX_POINT_MIN_TRACK`` views (where the model records them).
    """
    folder = Path(survey_root) / SPARSE_MODEL
    if not folder.is_dir():
        return None
    table = read_colmap_point_table(folder)
    return table["xyz"][trusted_point_mask(table)]


def trusted_point_mask(table: dict[str, np.ndarray]) -> np.ndarray:
    """The points of a COLMAP point table (:func:`survey_io.colmap.read_colmap_point_table`) that
    training may use: not in the evaluation tenth, finite, reprojection error at most
    ``BOX_POINT_MAX_ERROR_PX`` and seen by at least ``BOX_POINT_MIN_TRACK`` views (where recorded).
    Field boxes (:func:`load_box_points`) and sparse depth supervision both use this rule."""
    err, track = table["error_px"], table["track_length"]
    keep = ~heldout_point_mask(table["id"]) & np.all(np.isfinite(table["xyz"]), axis=1)
    keep &= ~(err > BOX_POINT_MAX_ERROR_PX)  # -1: no error recorded
    keep &= ~((track > 0) & (track < BOX_POINT_MIN_TRACK))
    return keep


def load_depth(path: Path) -> np.ndarray:
    """A depth map in metres along the optical axis: .npy float, or 16-bit PNG in millimetres."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            depth = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                depth = np.asarray(img, dtype=np.float64) / 1000.0
    except FileNotFoundError:
        raise SurveyError(path, "depth map not found") from None
    except (OSError, ValueError) as err:
        raise SurveyError(path, f"unreadable depth map ({err})") from None
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise SurveyError(path, f"depth map must be 2-D, got shape {depth.shape}")
    return depth


def _depth_heights(survey: Survey, image, grid: int = 48) -> np.ndarray:
    depth = load_depth(image.depth)
    cam = survey.camera_of(image)
    h, w = depth.shape
    v, u = np.meshgrid(np.linspace(0, h - 1, min(grid, h)), np.linspace(0, w - 1, min(grid, w)), indexing="ij")
    vi, ui = v.round().astype(int), u.round().astype(int)
    d = depth[vi, ui]
    ok = np.isfinite(d) & (d > 0)
    # depth pixels may be at a different resolution than the camera: scale pixel coordinates
    su, sv = cam.width / w, cam.height / h
    world = unproject(cam, image.c2w, (ui[ok] + 0.5) * su, (vi[ok] + 0.5) * sv, d[ok])
    return world[:, 2]
