"""Georeferencing: a projected CRS plus the float64 origin of the local frame.

The local frame is metric East-North-Up with +Z up: a point's local coordinates are
its (easting, northing, height) in the tile's projected CRS minus ``origin``.  Heights
are ellipsoidal (WGS84) unless the CRS carries a vertical datum of its own.  Keeping the
local frame a plain offset of the CRS (rather than a tangent plane) makes every export
exact: a GeoTIFF pixel or a LAS point goes back to the CRS by one float64 addition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyproj

from .errors import SurveyError


def utm_epsg_for(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat), with the Norway/Svalbard exceptions."""
    if not (-180.0 <= lon <= 180.0 and -80.0 <= lat <= 84.0):
        raise SurveyError(None, f"lon/lat ({lon}, {lat}) is outside the UTM domain")
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    elif 72.0 <= lat < 84.0 and lon >= 0.0:
        for lo, hi, z in ((0, 9, 31), (9, 21, 33), (21, 33, 35), (33, 42, 37)):
            if lo <= lon < hi:
                zone = z
    return (32600 if lat >= 0 else 32700) + zone


def _parse_crs(crs: str | int):
    try:
        parsed = pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as err:
        raise SurveyError(None, f"unknown CRS {str(crs)[:80]!r}: {err}") from None
    if not parsed.is_projected:
        raise SurveyError(None, f"CRS {parsed.to_string()[:80]!r} is not projected; the local frame needs metres")
    return parsed


@dataclass(frozen=True)
class Georef:
    """Where the local frame sits on Earth.

    Attributes:
        crs: a projected CRS as pyproj accepts it ("EPSG:32651", or WKT).
        origin: (easting, northing, height) of the local origin in ``crs``, metres, float64.
    """

    crs: str
    origin: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        if len(self.origin) != 3 or not np.all(np.isfinite(self.origin)):
            raise SurveyError(None, f"georef origin must be 3 finite numbers, got {self.origin}")
        _parse_crs(self.crs)  # fail early on an unknown CRS

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_lonlat(cls, lon: float, lat: float, height: float = 0.0, crs: str | int | None = None) -> Georef:
        """A georef whose origin is at (lon, lat, height); the UTM zone is picked when ``crs`` is None."""
        crs_str = f"EPSG:{utm_epsg_for(lon, lat)}" if crs is None else str(crs)
        if isinstance(crs, int):
            crs_str = f"EPSG:{crs}"
        probe = cls(crs_str, (0.0, 0.0, 0.0))
        e, n, h = probe._to_crs.transform(lon, lat, height)
        return cls(crs_str, (float(e), float(n), float(h)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Georef:
        try:
            return cls(str(d["crs"]), tuple(d["origin"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SurveyError(None, f"georef needs 'crs' and 'origin' (3 numbers): {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"crs": self.crs, "origin": list(self.origin)}

    # -- pyproj plumbing ----------------------------------------------------------------
    @cached_property
    def pyproj_crs(self):
        return _parse_crs(self.crs)

    @cached_property
    def epsg(self) -> int | None:
        return self.pyproj_crs.to_epsg()

    @cached_property
    def _to_crs(self):
        return pyproj.Transformer.from_crs("EPSG:4979", self.pyproj_crs, always_xy=True)

    @cached_property
    def _to_lonlat(self):
        return pyproj.Transformer.from_crs(self.pyproj_crs, "EPSG:4979", always_xy=True)

    # -- transforms (arrays of shape (..., 3), float64) ---------------------------------
    def local_to_crs(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, dtype=np.float64) + np.asarray(self.origin)

    def crs_to_local(self, enh: np.ndarray) -> np.ndarray:
        return np.asarray(enh, dtype=np.float64) - np.asarray(self.origin)

    def local_to_lonlat(self, xyz: np.ndarray) -> np.ndarray:
        """Local ENU metres -> (lon, lat, ellipsoidal height) in degrees and metres."""
        enh = self.local_to_crs(xyz)
        lon, lat, h = self._to_lonlat.transform(enh[..., 0], enh[..., 1], enh[..., 2])
        return np.stack(np.broadcast_arrays(lon, lat, h), axis=-1).astype(np.float64)

    def lonlat_to_local(self, lonlath: np.ndarray) -> np.ndarray:
        """(lon, lat, ellipsoidal height) -> local ENU metres."""
        llh = np.asarray(lonlath, dtype=np.float64)
        e, n, h = self._to_crs.transform(llh[..., 0], llh[..., 1], llh[..., 2])
        return self.crs_to_local(np.stack(np.broadcast_arrays(e, n, h), axis=-1))
