"""Drone flight layouts: a nadir lawnmower grid plus oblique passes, with exact pinhole cameras.

Conventions (shared with :mod:`.exif`):

* Positions are in the local ENU frame (metres); ``altitude_m`` is the camera height above
  the take-off point, which is the local origin (ground height 0 there).
* Gimbal angles as DJI writes them: ``pitch`` -90 looks straight down (nadir), 0 looks at the
  horizon; ``yaw`` is the heading of the camera (the direction the top of a nadir image
  points, the horizontal direction of the optical axis otherwise), degrees clockwise from
  north; ``roll`` is 0 for every synthetic image.  Inside this module yaw is measured from
  *grid* north (the local +Y axis); :mod:`.exif` converts it to true north for the files.
* The pose is ``c2w`` (4x4, OpenCV: x right, y down, z forward), with
  ``z = (sin(yaw) cos(pitch), cos(yaw) cos(pitch), sin(pitch))``, ``x = (cos(yaw), -sin(yaw), 0)``
  and ``y = z x x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..georef import Georef
from ..survey import Camera, Survey, SurveyImage

#: 35 mm film frame width: FocalLengthIn35mmFilm = focal length scaled to a 36 mm wide frame.
FILM_WIDTH_MM = 36.0


def camera_for(width: int, height: int, focal_35mm: float) -> Camera:
    """Exact pinhole camera whose horizontal field of view is that of ``focal_35mm`` on a 36 mm
    wide frame; principal point at the image centre; square pixels."""
    f = width * focal_35mm / FILM_WIDTH_MM
    return Camera(width=width, height=height, fl_x=f, fl_y=f, cx=width / 2.0, cy=height / 2.0)


def gimbal_to_c2w(position, yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Camera-to-world (OpenCV, local ENU) of a camera at ``position`` with the gimbal angles
    (yaw from grid north, clockwise; pitch -90 = nadir; roll 0)."""
    psi, th = math.radians(yaw_deg), math.radians(pitch_deg)
    z = np.array([math.sin(psi) * math.cos(th), math.cos(psi) * math.cos(th), math.sin(th)])
    x = np.array([math.cos(psi), -math.sin(psi), 0.0])
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, np.asarray(position, np.float64)
    return c2w


def c2w_to_gimbal(c2w: np.ndarray) -> tuple[float, float, float]:
    """(yaw from grid north, pitch, roll) in degrees of a pose made by :func:`gimbal_to_c2w`."""
    x, z = np.asarray(c2w)[:3, 0], np.asarray(c2w)[:3, 2]
    yaw = math.degrees(math.atan2(-x[1], x[0]))
    pitch = math.degrees(math.asin(float(np.clip(z[2], -1.0, 1.0))))
    roll = math.degrees(math.asin(float(np.clip(x[2], -1.0, 1.0))))
    return yaw, pitch, roll


@dataclass(frozen=True)
class FlightPose:
    """One planned shot: pose, gimbal angles (yaw from grid north) and pass ("nadir" / "oblique")."""

    c2w: np.ndarray
    yaw_deg: float
    pitch_deg: float
    kind: str


def _tick_count(span: float, spacing: float, cover_edges: bool) -> int:
    """How many positions :func:`_ticks` puts on ``span``."""
    if cover_edges:
        return math.ceil(span / spacing - 1e-9) + 1
    return max(1, math.ceil(span / spacing - 1e-9))


def _ticks(lo: float, hi: float, spacing: float, cover_edges: bool) -> np.ndarray:
    """Evenly spaced positions in [lo, hi] no further apart than ``spacing``."""
    span = hi - lo
    n = _tick_count(span, spacing, cover_edges)
    if cover_edges:
        return np.linspace(lo, hi, n) if n > 1 else np.array([(lo + hi) / 2])
    return lo + (np.arange(n) + 0.5) * span / n


def _spacings(altitude_m: float, camera: Camera, front_overlap: float, side_overlap: float) -> tuple[float, float]:
    """(along-track, across-track) shot spacing on flat ground at height 0."""
    along = altitude_m * camera.height / camera.fl_y * (1 - front_overlap)
    across = altitude_m * camera.width / camera.fl_x * (1 - side_overlap)
    return along, across


def count_poses(area: tuple[float, float, float, float], altitude_m: float, camera: Camera, *,
                front_overlap: float, side_overlap: float, oblique_headings=(0.0, 90.0, 180.0, 270.0),
                oblique_off_nadir_deg: float = 35.0, oblique_spacing_factor: float = 3.0) -> int:
    """How many shots :func:`plan_poses` makes with these arguments, without making them (a
    planner sizes a flight before building it; the count can be astronomically large)."""
    x0, y0, x1, y1 = area
    along, across = _spacings(altitude_m, camera, front_overlap, side_overlap)
    n = _tick_count(x1 - x0, across, True) * _tick_count(y1 - y0, along, True)
    if oblique_headings and oblique_off_nadir_deg > 0:
        n += len(oblique_headings) * _tick_count(x1 - x0, across * oblique_spacing_factor, False) \
            * _tick_count(y1 - y0, along * oblique_spacing_factor, False)
    return n


def plan_poses(area: tuple[float, float, float, float], altitude_m: float, camera: Camera, *,
               front_overlap: float, side_overlap: float, oblique_headings=(0.0, 90.0, 180.0, 270.0),
               oblique_off_nadir_deg: float = 35.0, oblique_spacing_factor: float = 3.0,
               rng: np.random.Generator | None = None, jitter_m: float = 0.0) -> list[FlightPose]:
    """Nadir lawnmower grid over ``area`` = (x0, y0, x1, y1) (local ENU), then oblique passes.

    Nadir lines run north-south (heading 0 / 180, serpentine); the image's long side is
    across-track.  Spacing follows the overlaps on flat ground at height 0.  Oblique shots
    look at targets on a grid ``oblique_spacing_factor`` times coarser, from a camera set back
    by ``altitude * tan(off_nadir)`` opposite to the heading, at the same altitude.
    """
    if not (0 <= front_overlap < 1 and 0 <= side_overlap < 1):
        raise ValueError("overlaps must be in [0, 1)")
    x0, y0, x1, y1 = area
    along, across = _spacings(altitude_m, camera, front_overlap, side_overlap)
    poses: list[FlightPose] = []

    def jitter():
        if rng is None or jitter_m <= 0:
            return np.zeros(3)
        return rng.normal(0.0, jitter_m, 3)

    for li, x in enumerate(_ticks(x0, x1, across, True)):
        ys = _ticks(y0, y1, along, True)
        heading = 0.0 if li % 2 == 0 else 180.0
        for y in (ys if li % 2 == 0 else ys[::-1]):
            pos = np.array([x, y, altitude_m]) + jitter()
            poses.append(FlightPose(gimbal_to_c2w(pos, heading, -90.0), heading, -90.0, "nadir"))
    if oblique_headings and oblique_off_nadir_deg > 0:
        setback = altitude_m * math.tan(math.radians(oblique_off_nadir_deg))
        pitch = -(90.0 - oblique_off_nadir_deg)
        for heading in oblique_headings:
            h = math.radians(heading)
            fwd = np.array([math.sin(h), math.cos(h), 0.0])
            for tx in _ticks(x0, x1, across * oblique_spacing_factor, False):
                for ty in _ticks(y0, y1, along * oblique_spacing_factor, False):
                    pos = np.array([tx, ty, 0.0]) - setback * fwd + np.array([0.0, 0.0, altitude_m]) + jitter()
                    yaw = (heading + 180.0) % 360.0 - 180.0
                    poses.append(FlightPose(gimbal_to_c2w(pos, yaw, pitch), yaw, pitch, "oblique"))
    return poses


def test_split(names: list[str], test_every: int) -> list[str]:
    """Held-out views: every ``test_every``-th image, starting at index ``test_every // 2``."""
    if test_every <= 0:
        return []
    return [n for i, n in enumerate(names) if i % test_every == test_every // 2]


def synthetic_flight(area_km2: float, altitude_m: float = 120.0, *, width: int = 4000, height: int = 3000,
                     focal_35mm: float = 24.0, front_overlap: float = 0.8, side_overlap: float = 0.7,
                     oblique_headings=(0.0, 90.0, 180.0, 270.0), oblique_off_nadir_deg: float = 35.0,
                     oblique_spacing_factor: float = 3.0, lon: float = 121.47, lat: float = 31.23,
                     ground_height_m: float = 14.0, seed: int = 0, jitter_m: float = 0.0,
                     test_every: int = 8, root: str | Path = "synthetic-flight", count_only: bool = False):
    """A planned survey over a square of ``area_km2`` centred on (lon, lat), without rendering.

    Returns a :class:`Survey` with exact poses and one camera; image files do not exist
    (``root`` may be any path).  ``seed`` only matters with ``jitter_m`` > 0 (Gaussian position
    noise, metres).  Used to plan partitions of large tiles (100 km² and more).  With
    ``count_only`` only the number of images is returned (nothing is built).
    """
    if not area_km2 > 0:
        raise ValueError(f"area_km2 must be positive, got {area_km2}")
    half = math.sqrt(area_km2) * 1000.0 / 2.0
    cam = camera_for(width, height, focal_35mm)
    if count_only:
        return count_poses((-half, -half, half, half), altitude_m, cam, front_overlap=front_overlap,
                           side_overlap=side_overlap, oblique_headings=oblique_headings,
                           oblique_off_nadir_deg=oblique_off_nadir_deg, oblique_spacing_factor=oblique_spacing_factor)
    poses = plan_poses((-half, -half, half, half), altitude_m, cam, front_overlap=front_overlap,
                       side_overlap=side_overlap, oblique_headings=oblique_headings,
                       oblique_off_nadir_deg=oblique_off_nadir_deg, oblique_spacing_factor=oblique_spacing_factor,
                       rng=np.random.default_rng(seed), jitter_m=jitter_m)
    georef = survey_georef(lon, lat, ground_height_m)
    images = [SurveyImage(name=f"images/{i:06d}.jpg", camera=0, c2w=p.c2w) for i, p in enumerate(poses)]
    return Survey(root=Path(root), cameras=[cam], images=images, georef=georef,
                  test_names=test_split([im.name for im in images], test_every))


def survey_georef(lon: float, lat: float, ground_height_m: float) -> Georef:
    """UTM georef whose origin is (lon, lat, ground height), rounded to whole metres (easting,
    northing) and millimetres (height) so that raster grids align with round CRS coordinates."""
    g = Georef.from_lonlat(lon, lat, ground_height_m)
    e, n, _ = g.origin
    return Georef(g.crs, (float(round(e)), float(round(n)), round(float(ground_height_m), 3)))
