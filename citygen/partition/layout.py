"""A synthetic survey flight layout (poses and intrinsics only, no images) for dry runs.

A nadir lawnmower grid over a square area plus four oblique passes (looking north, east,
south, west), as photogrammetric city surveys fly them.  Oblique cameras are shifted back
by ``altitude * tan(tilt)`` so the centres of their views fall on the area: they stand over
one place and look at another, which is what visibility-based assignment is for.

:func:`synthetic_survey` prefers the project's generator,
``survey_io.synthetic.flight.synthetic_flight``, given the same :class:`FlightLayout`
(yaw jitter is this module's only extra); this one is the fallback and the tests' fixed layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from survey_io import Camera, Georef, Survey, SurveyImage

from ..errors import CitygenError


@dataclass
class FlightLayout:
    """A survey flight over a square of ``area_km2`` starting at the local origin."""

    area_km2: float = 100.0
    #: flying height above the ground plane z = 0, metres.
    altitude_m: float = 250.0
    #: image size in pixels and focal length in pixels (20 MP, 8.8 mm on a 1" sensor by default).
    image_size: tuple[int, int] = (5472, 3648)
    focal_px: float = 3648.0
    forward_overlap: float = 0.8
    side_overlap: float = 0.7
    #: oblique camera tilt from nadir, degrees; 0 = nadir only.
    oblique_tilt_deg: float = 45.0
    #: obliques are flown at this multiple of the nadir spacing.
    oblique_spacing_factor: float = 2.0
    #: position noise (metres) and yaw noise (degrees, builtin generator only), seeded.
    jitter_m: float = 1.0
    jitter_deg: float = 1.0

    def __post_init__(self) -> None:
        if not self.area_km2 > 0 or not self.altitude_m > 0 or not self.focal_px > 0:
            raise CitygenError(None, "flight layout: area, altitude and focal length must be positive")
        if not (0 <= self.forward_overlap < 1 and 0 <= self.side_overlap < 1):
            raise CitygenError(None, "flight layout: overlaps must be in [0, 1)")
        if not 0 <= self.oblique_tilt_deg < 80:
            raise CitygenError(None, "flight layout: oblique tilt must be in [0, 80) degrees")

    @property
    def side_m(self) -> float:
        return math.sqrt(self.area_km2) * 1000.0

    @property
    def nadir_footprint_m(self) -> tuple[float, float]:
        """Ground size (across x, across y) of a nadir image: pixels * altitude / focal."""
        w, h = self.image_size
        return w * self.altitude_m / self.focal_px, h * self.altitude_m / self.focal_px


def look_rotation(forward: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world rotation looking along ``forward`` with image-up towards +Z
    (for a straight-down view: image right = east, image down = south)."""
    f = np.asarray(forward, dtype=np.float64)
    f = f / np.linalg.norm(f)
    right = np.cross(f, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-9:
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    return np.stack([right, down, f], axis=1)


def lawnmower_flight(layout: FlightLayout, georef: Georef | None = None, seed: int = 0) -> Survey:
    """The layout's poses as a :class:`Survey` (image files do not exist; ``root`` is symbolic)."""
    rng = np.random.default_rng(seed)
    georef = georef or Georef("EPSG:32633", (500000.0, 5000000.0, 0.0))
    w, h = layout.image_size
    camera = Camera(width=w, height=h, fl_x=layout.focal_px, fl_y=layout.focal_px, cx=w / 2, cy=h / 2)
    fx, fy = layout.nadir_footprint_m
    # nadir: image x along east (the flight direction), image y across track
    step_along = fx * (1 - layout.forward_overlap)
    step_across = fy * (1 - layout.side_overlap)
    side = layout.side_m
    passes = [("nadir", np.array([0.0, 0.0, -1.0]), 1.0)]
    if layout.oblique_tilt_deg > 0:
        t = math.radians(layout.oblique_tilt_deg)
        for name, az in (("oblique_n", (0, 1)), ("oblique_e", (1, 0)), ("oblique_s", (0, -1)), ("oblique_w", (-1, 0))):
            passes.append((name, np.array([math.sin(t) * az[0], math.sin(t) * az[1], -math.cos(t)]),
                           layout.oblique_spacing_factor))
    images: list[SurveyImage] = []
    for name, forward, factor in passes:
        sa, sc = step_along * factor, step_across * factor
        xs = np.arange(sa / 2, side, sa)
        ys = np.arange(sc / 2, side, sc)
        # the view's centre ray hits the ground forward*altitude/|fz| from the camera's foot
        shift = forward[:2] * layout.altitude_m / -forward[2]
        rot = look_rotation(forward)
        for r, y in enumerate(ys):
            for c, x in enumerate(xs if r % 2 == 0 else xs[::-1]):
                yaw = math.radians(rng.normal(0, layout.jitter_deg))
                rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
                c2w = np.eye(4)
                c2w[:3, :3] = rz @ rot
                c2w[:3, 3] = [x - shift[0], y - shift[1], layout.altitude_m]
                c2w[:3, 3] += rng.normal(0, layout.jitter_m, 3)
                images.append(SurveyImage(name=f"{name}/r{r:04d}_c{c:04d}.jpg", camera=0, c2w=c2w, pose_is_prior=True))
    return Survey(root=Path("synthetic-flight"), cameras=[camera], images=images, georef=georef)


def synthetic_survey(layout: FlightLayout, seed: int = 0, generator: str = "auto") -> tuple[Survey, str]:
    """The poses of a synthetic flight and which generator made them.

    ``generator``: "auto" uses the project's ``survey_io.synthetic.flight.synthetic_flight``
    (area and altitude from ``layout``) when it exists, else :func:`lawnmower_flight`;
    "builtin" always uses :func:`lawnmower_flight` with every field of ``layout``.
    """
    if generator not in ("auto", "builtin"):
        raise CitygenError(None, f"unknown flight generator {generator!r} (known: auto, builtin)")
    if generator == "builtin":
        return lawnmower_flight(layout, seed=seed), "citygen.partition.layout.lawnmower_flight"
    try:
        from survey_io.synthetic.flight import synthetic_flight  # type: ignore[import-not-found]
    except ImportError:
        return lawnmower_flight(layout, seed=seed), "citygen.partition.layout.lawnmower_flight"
    w, h = layout.image_size
    tilt = layout.oblique_tilt_deg
    survey = synthetic_flight(
        layout.area_km2, layout.altitude_m, width=w, height=h, focal_35mm=layout.focal_px * 36.0 / w,
        front_overlap=layout.forward_overlap, side_overlap=layout.side_overlap,
        oblique_headings=(0.0, 90.0, 180.0, 270.0) if tilt > 0 else (), oblique_off_nadir_deg=tilt,
        oblique_spacing_factor=layout.oblique_spacing_factor, seed=seed, jitter_m=layout.jitter_m, test_every=0)
    return survey, "survey_io.synthetic.flight.synthetic_flight"
