"""The flight a dry run plans for: a :class:`FlightLayout` (area, altitude, camera, overlaps,
oblique tilt) turned into poses by the synthetic city's flight planner,
``survey_io.synthetic.flight.synthetic_flight`` (a nadir lawnmower grid plus four oblique
passes whose views centre on the area), without rendering any image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from survey_io import Survey
from survey_io.synthetic.flight import synthetic_flight

from ..errors import CitygenError


@dataclass
class FlightLayout:
    """A survey flight over a square of ``area_km2`` centred on the local origin."""

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
    #: position noise (metres), seeded.
    jitter_m: float = 1.0

    def __post_init__(self) -> None:
        if not all(v > 0 and math.isfinite(v) for v in (self.area_km2, self.altitude_m, self.focal_px)):
            raise CitygenError(None, "flight layout: area, altitude and focal length must be positive")
        if not (0 <= self.forward_overlap < 1 and 0 <= self.side_overlap < 1):
            raise CitygenError(None, "flight layout: overlaps must be in [0, 1)")
        if not 0 <= self.oblique_tilt_deg < 80:
            raise CitygenError(None, "flight layout: oblique tilt must be in [0, 80) degrees")

    @property
    def side_m(self) -> float:
        return math.sqrt(self.area_km2) * 1000.0


def _flight_kwargs(layout: FlightLayout, seed: int) -> dict:
    w, h = layout.image_size
    tilt = layout.oblique_tilt_deg
    return dict(area_km2=layout.area_km2, altitude_m=layout.altitude_m, width=w, height=h,
                focal_35mm=layout.focal_px * 36.0 / w, front_overlap=layout.forward_overlap,
                side_overlap=layout.side_overlap, oblique_headings=(0.0, 90.0, 180.0, 270.0) if tilt > 0 else (),
                oblique_off_nadir_deg=tilt, oblique_spacing_factor=layout.oblique_spacing_factor, seed=seed,
                jitter_m=layout.jitter_m, test_every=0)


def synthetic_survey(layout: FlightLayout, seed: int = 0) -> tuple[Survey, str]:
    """The poses of the layout's flight (image files do not exist) and the generator's name."""
    return synthetic_flight(**_flight_kwargs(layout, seed)), "survey_io.synthetic.flight.synthetic_flight"


def synthetic_survey_size(layout: FlightLayout) -> int:
    """How many images :func:`synthetic_survey` would make (arithmetic only)."""
    return int(synthetic_flight(**_flight_kwargs(layout, 0), count_only=True))
