"""An exported DSM checked against the survey itself, for real surveys without ground truth.

Two figures (issue 15):

- **held-out points**: the SfM points ``citygen ingest`` held out of training
  (``points3D_heldout.npz``, a tenth of the model) against the DSM cell under each: median
  absolute error, RMSE, and the share within 2 GSD (the DSM's cell size; also within 2 image GSD,
  the images' median nadir pixel footprint).  A point over a nodata
  cell counts as a miss in the share (the DSM failed there) and is counted apart.
- **coverage**: the share of the cells that two or more survey cameras see (each cell centre at
  its DSM height, or at the median DSM height where the DSM has no data, projected into every
  camera: in the image and in front of it) that hold a DSM height.  Occlusion is ignored, which is
  what a nadir flight over open ground sees.  Needs only the cameras: a survey without SfM points
  (the synthetic one of ``citygen demo``) gets it too, and a sentence instead of the point figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import rowcol

from survey_io import Survey
from survey_io.geotiff import read_geotiff

from ..cameras import project
from ..errors import CitygenError
from ..metrics import NO_HELDOUT_POINTS, load_heldout_points, summarize_point_errors

#: cameras that must see a cell for it to count as ground the survey covers.
MIN_VIEWS = 2
#: cells projected per chunk (bounds the memory of the coverage count).
CHUNK = 1 << 18


def _local_dsm(dsm_path: str | Path, survey: Survey):
    """The DSM raster, its heights in the survey's local frame, and where it holds data."""
    dsm = read_geotiff(dsm_path)
    if dsm.array.ndim != 2:
        raise CitygenError(dsm_path, "a DSM must have one band")
    z = dsm.array.astype(np.float64)
    valid = np.isfinite(z) & ((z != dsm.nodata) if dsm.nodata is not None else True)
    return dsm, z - float(survey.georef.origin[2]), valid  # heights in the CRS -> the local frame


def _point_errors(dsm, z: np.ndarray, valid: np.ndarray, survey: Survey, xyz: np.ndarray):
    """DSM minus point height under each point (local frame), and which points fall in the raster
    / on a cell with data."""
    ox, oy = float(survey.georef.origin[0]), float(survey.georef.origin[1])
    h, w = z.shape
    row, col = (np.asarray(a, np.int64) for a in rowcol(dsm.transform, xyz[:, 0] + ox, xyz[:, 1] + oy))
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    on_data = np.zeros(len(xyz), bool)
    on_data[inside] = valid[row[inside], col[inside]]
    return z[row[on_data], col[on_data]] - xyz[on_data, 2], inside, on_data


def dsm_point_errors(dsm_path: str | Path, survey: Survey) -> dict[str, np.ndarray] | None:
    """Per held-out point: its local ``xyz`` and the DSM's error there (``error``: DSM minus point
    height, NaN off the raster or on nodata); None when the survey has no held-out points.  The
    figures of :func:`dsm_survey_check`, point by point (for maps of them)."""
    points = load_heldout_points(survey)
    if points is None:
        return None
    dsm, z, valid = _local_dsm(dsm_path, survey)
    xyz = np.asarray(points["xyz"], np.float64)
    err, _, on_data = _point_errors(dsm, z, valid, survey, xyz)
    full = np.full(len(xyz), np.nan)
    full[on_data] = err
    return {"xyz": xyz, "error": full}


def dsm_survey_check(dsm_path: str | Path, survey: Survey) -> dict[str, Any]:
    """The DSM at ``dsm_path`` (written by export, in the survey's CRS) against ``survey``'s
    held-out SfM points and camera coverage; see the module docstring."""
    dsm, z, valid = _local_dsm(dsm_path, survey)
    gsd = abs(float(dsm.gsd))
    ox, oy = float(survey.georef.origin[0]), float(survey.georef.origin[1])
    report: dict[str, Any] = {"gsd_m": gsd, "dsm": str(dsm_path), "image_gsd_m": None}

    points = load_heldout_points(survey)
    if points is not None and len(points["xyz"]):
        xyz = points["xyz"]
        err, inside, on_data = _point_errors(dsm, z, valid, survey, xyz)
        stats = summarize_point_errors(err, np.full(len(err), gsd)) or {}
        n_inside = int(inside.sum())
        # the images' own GSD: the median nadir pixel footprint (camera height over the points / focal)
        image_gsd = float(np.median([(im.c2w[2, 3] - np.median(xyz[:, 2])) / survey.camera_of(im).fl_x
                                     for im in survey.images]))
        report["image_gsd_m"] = image_gsd
        stats.update(points_total=int(len(xyz)), points_in_raster=n_inside,
                     points_on_nodata=int(n_inside - on_data.sum()),
                     share_within_2gsd=float(np.sum(np.abs(err) <= 2 * gsd) / max(n_inside, 1)),
                     share_within_2_image_gsd=float(np.sum(np.abs(err) <= 2 * image_gsd) / max(n_inside, 1)))
        report["heldout_points"] = stats
    else:
        report["heldout_points"] = NO_HELDOUT_POINTS

    # coverage: cell centres in the local frame at their DSM height (median height where empty)
    fill = float(np.median(z[valid])) if valid.any() else 0.0
    x, y = dsm.cell_centers()
    pts = np.stack([x.ravel() - ox, y.ravel() - oy, np.where(valid, z, fill).ravel()], axis=-1)
    views = np.zeros(len(pts), np.int32)
    for im in survey.images:
        cam = survey.camera_of(im)
        for s in range(0, len(pts), CHUNK):
            uv, depth = project(cam, im.c2w, pts[s:s + CHUNK])
            with np.errstate(invalid="ignore"):
                seen = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
            views[s:s + CHUNK] += seen
    seen2 = views >= MIN_VIEWS
    report["coverage"] = {"cells_seen_by_2_cameras": int(seen2.sum()),
                          "covered": int((seen2 & valid.ravel()).sum()),
                          "share": float((seen2 & valid.ravel()).sum() / max(int(seen2.sum()), 1)),
                          "cameras": len(survey.images)}
    return report


__all__ = ["MIN_VIEWS", "dsm_point_errors", "dsm_survey_check"]
