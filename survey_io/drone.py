"""A folder of drone JPEGs -> a :class:`Survey` with prior poses from GPS and gimbal metadata.

Which files: the ``*.jpg`` / ``*.jpeg`` files (any case) directly in the folder, or in its
``images/`` subfolder when the folder itself holds none.  Hidden files are skipped.  Two
files whose stems differ only by case or extension (``IMG_1.jpg``, ``IMG_1.JPG``,
``IMG_1.jpeg``) are refused: they collide on case-insensitive file systems and in every
per-image output keyed by stem (depth, semantics, COLMAP names).

Pose prior of each image (``pose_is_prior=True``, ``gps`` set):

* camera centre: the EXIF GPS position mapped into the local frame by the georef;
* rotation: DJI gimbal angles from XMP when present (see
  :func:`survey_io.exif.gimbal_to_c2w_rotation`; the compass yaw is turned into a grid
  heading by the projection's meridian convergence); otherwise nadir, with the top of
  the image along the flight direction (from the neighbouring GPS positions in capture
  order), or north when the camera does not move.

When no georef is given, one is made: the UTM zone of the mean position, origin at the
mean easting/northing, and origin height at the take-off point's altitude (median of
DJI ``AbsoluteAltitude - RelativeAltitude``) when the XMP carries both, else 0 (local z is
then the GPS altitude).

Intrinsics: one :class:`Camera` per (make, model, focal length); a pinhole with the
focal length in pixels from DJI's XMP calibration (with its optical centre) or from EXIF
(see :mod:`survey_io.exif`; principal point at the image centre), or ``1.2 * long side``
(COLMAP's default guess) when the file gives none.  Images of one camera must share one size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyproj

from .errors import SurveyError
from .exif import ImageMetadata, gimbal_to_c2w_rotation, read_image_metadata
from .georef import Georef
from .survey import Camera, Survey, SurveyImage

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")
#: Focal length guess (times the long side) when EXIF has none; COLMAP's default.
DEFAULT_FOCAL_FACTOR = 1.2
#: Farthest a camera's GPS position may lie from the survey's median position (metres).
MAX_GPS_SPREAD_M = 50_000.0
#: Below this horizontal displacement (metres) between neighbours, the flight direction is undefined.
_MIN_HEADING_BASELINE_M = 0.5


def list_drone_images(folder: str | Path) -> tuple[Path, list[Path]]:
    """The folder holding the JPEGs and the JPEG paths, sorted by name.

    Raises:
        SurveyError: the folder is missing, holds no JPEG, or holds colliding names.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SurveyError(folder, "not a folder")

    def jpegs(d: Path) -> list[Path]:
        return sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in JPEG_SUFFIXES
                       and not p.name.startswith(".")), key=lambda p: p.name)

    root, files = folder, jpegs(folder)
    if not files and (folder / "images").is_dir():
        root, files = folder / "images", jpegs(folder / "images")
    if not files:
        raise SurveyError(folder, "no JPEG images (*.jpg, *.jpeg) in the folder or its images/ subfolder")
    by_stem: dict[str, Path] = {}
    for p in files:
        other = by_stem.setdefault(p.stem.lower(), p)
        if other is not p:
            raise SurveyError(p, f"duplicate image name: {other.name!r} and {p.name!r} differ only by case or extension")
    return root, files


def _group_cameras(metas: list[ImageMetadata]) -> tuple[list[Camera], list[int]]:
    cameras: list[Camera] = []
    keys: list[tuple] = []
    sizes: list[tuple[int, int, Path]] = []
    index: list[int] = []
    for m in metas:
        key = (m.make, m.model, None if m.focal_mm is None else round(m.focal_mm, 3))
        if key in keys:
            k = keys.index(key)
            w, h, first = sizes[k]
            if (m.width, m.height) != (w, h):
                raise SurveyError(m.path, f"image is {m.width}x{m.height} but {first.name} of the same camera "
                                          f"({m.make} {m.model}) is {w}x{h}: mixed image sizes within one camera")
            index.append(k)
            continue
        focal = m.focal_px
        if focal is None:
            focal = DEFAULT_FOCAL_FACTOR * max(m.width, m.height)
            log.warning("%s: no focal length in EXIF, guessing %.0f px", m.path, focal)
        if not (math.isfinite(focal) and focal > 0):
            raise SurveyError(m.path, f"focal length {focal} px is not a positive finite number")
        cx, cy = m.width / 2.0, m.height / 2.0
        if m.focal_source == "dji_calibrated":
            cx, cy = m.dji.get("CalibratedOpticalCenterX", cx), m.dji.get("CalibratedOpticalCenterY", cy)
        keys.append(key)
        sizes.append((m.width, m.height, m.path))
        cameras.append(Camera(width=m.width, height=m.height, fl_x=focal, fl_y=focal, cx=cx, cy=cy,
                              camera_model="PINHOLE"))
        index.append(len(cameras) - 1)
    return cameras, index


def _auto_georef(metas: list[ImageMetadata]) -> Georef:
    lon = float(np.mean([m.lon for m in metas]))
    lat = float(np.mean([m.lat for m in metas]))
    probe = Georef.from_lonlat(lon, lat, 0.0)
    enh = probe.lonlat_to_local(np.array([[m.lon, m.lat, 0.0] for m in metas]))
    takeoff = [m.dji["AbsoluteAltitude"] - m.dji["RelativeAltitude"] for m in metas
               if "AbsoluteAltitude" in m.dji and "RelativeAltitude" in m.dji]
    height = float(np.median(takeoff)) if takeoff else 0.0
    e, n = enh[:, :2].mean(axis=0) + np.asarray(probe.origin[:2])
    return Georef(probe.crs, (float(e), float(n), height))


def _meridian_convergence_deg(georef: Georef, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Meridian convergence (degrees) at each (lon, lat), as pyproj reports it.

    pyproj's value is minus the grid azimuth of true north (positive east of the central
    meridian in the northern hemisphere), so a compass heading becomes a grid heading by
    subtracting it.  Zero for CRSs pyproj cannot give factors for.
    """
    try:
        factors = pyproj.Proj(georef.pyproj_crs).get_factors(np.asarray(lon, float), np.asarray(lat, float))
        return np.asarray(factors.meridian_convergence, dtype=np.float64)
    except Exception:  # noqa: BLE001 - a CRS without factors: treat grid north as true north
        return np.zeros(np.shape(lon))


def _flight_headings(centres: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Grid heading (degrees, clockwise from north) of the flight at each image, NaN where undefined."""
    n = len(order)
    headings = np.full(len(centres), np.nan)
    for rank, i in enumerate(order):
        prev_i, next_i = order[max(rank - 1, 0)], order[min(rank + 1, n - 1)]
        d = centres[next_i, :2] - centres[prev_i, :2]
        if np.hypot(*d) >= _MIN_HEADING_BASELINE_M:
            headings[i] = math.degrees(math.atan2(d[0], d[1]))
    return headings


def capture_order(metas: list[ImageMetadata]) -> np.ndarray:
    """Indices of ``metas`` in capture order: DateTimeOriginal (one-second resolution), then the
    file name (drone cameras number frames sequentially)."""
    return np.array(sorted(range(len(metas)), key=lambda i: (metas[i].datetime, metas[i].path.name)), dtype=int)


def read_drone_folder(folder: str | Path, georef: Georef | None = None) -> Survey:
    """Read a folder of drone JPEGs into a :class:`Survey` of prior poses.

    See :func:`read_drone_folder_metadata` for the same survey with each image's metadata.
    """
    return read_drone_folder_metadata(folder, georef)[0]


def read_drone_folder_metadata(folder: str | Path, georef: Georef | None = None
                               ) -> tuple[Survey, list[ImageMetadata]]:
    """Read a folder of drone JPEGs into a :class:`Survey` of prior poses and the images' metadata.

    The metadata list is parallel to ``survey.images`` (EXIF focal length and its source, gimbal
    angles, DateTimeOriginal: what ingest needs for its focal prior and its GPS time-lag estimate).

    Args:
        folder: the folder with the JPEGs (or with an ``images/`` subfolder holding them).
        georef: the local frame; made from the GPS positions when None (see the module doc).

    Raises:
        SurveyError: naming the file, for an empty folder, an unreadable or truncated image,
            an image without GPS, mixed image sizes within one camera, colliding names,
            non-finite values.
    """
    root, files = list_drone_images(folder)
    metas = [read_image_metadata(p) for p in files]
    cameras, cam_index = _group_cameras(metas)
    if georef is None:
        georef = _auto_georef(metas)
    lonlatalt = np.array([[m.lon, m.lat, m.alt] for m in metas])
    centres = georef.lonlat_to_local(lonlatalt)
    for m, c in zip(metas, centres):
        if not np.all(np.isfinite(c)):
            raise SurveyError(m.path, f"GPS position ({m.lat}, {m.lon}, {m.alt}) does not map into {georef.crs}")
    # A survey is one flight area (a tile is ~100 km²): an image far from the others carries a
    # wrong N/S or E/W reference or a corrupt tag, and would stretch the plan over a continent.
    spread = np.linalg.norm(centres[:, :2] - np.median(centres[:, :2], axis=0), axis=1)
    worst = int(np.argmax(spread))
    if spread[worst] > MAX_GPS_SPREAD_M:
        raise SurveyError(metas[worst].path, f"GPS position ({metas[worst].lat:.6f}, {metas[worst].lon:.6f}) is "
                                             f"{spread[worst] / 1000:.0f} km from the survey's median position "
                                             f"(more than {MAX_GPS_SPREAD_M / 1000:.0f} km): wrong N/S or E/W reference?")

    # Capture order for flight headings: DateTimeOriginal has one-second resolution, the
    # file name breaks ties (drone cameras number frames sequentially).
    order = capture_order(metas)
    headings = _flight_headings(centres, order)
    convergence = _meridian_convergence_deg(georef, lonlatalt[:, 0], lonlatalt[:, 1])

    images: list[SurveyImage] = []
    for i, m in enumerate(metas):
        if m.has_gimbal:
            yaw = m.dji["GimbalYawDegree"] - float(convergence[i])
            R = gimbal_to_c2w_rotation(yaw, m.dji["GimbalPitchDegree"], m.dji.get("GimbalRollDegree", 0.0))
        else:
            heading = headings[i]
            if not np.isfinite(heading):  # hovering: borrow the nearest defined heading in capture order
                rank = int(np.flatnonzero(order == i)[0])
                defined = [(abs(r - rank), headings[j]) for r, j in enumerate(order) if np.isfinite(headings[j])]
                heading = min(defined)[1] if defined else 0.0
            R = gimbal_to_c2w_rotation(float(heading), -90.0, 0.0)
        c2w = np.eye(4)
        c2w[:3, :3] = R
        c2w[:3, 3] = centres[i]
        images.append(SurveyImage(name=m.path.name, camera=cam_index[i], c2w=c2w,
                                  gps=centres[i].copy(), pose_is_prior=True))
    return Survey(root=root, cameras=cameras, images=images, georef=georef).validate(folder), metas
