"""Exported rasters against ground truth (the synthetic city's ``dsm.tif`` / ``ortho.tif``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rasterio.warp import Resampling, reproject

from survey_io.geotiff import GeoRaster, read_geotiff

from ..errors import CitygenError


def _onto(src: GeoRaster, ref: GeoRaster, band_nodata: float | None, resampling: str) -> np.ndarray:
    """``src`` resampled onto ``ref``'s grid (float64, NaN where ``src`` has no data)."""
    arr = src.array if src.array.ndim == 3 else src.array[..., None]
    h, w = ref.array.shape[:2]
    out = np.full((arr.shape[-1], h, w), np.nan, np.float64)
    for b in range(arr.shape[-1]):
        reproject(arr[..., b].astype(np.float64), out[b], src_transform=src.transform, src_crs=src.crs,
                  dst_transform=ref.transform, dst_crs=ref.crs, src_nodata=band_nodata, dst_nodata=np.nan,
                  resampling=getattr(Resampling, resampling))
    return np.moveaxis(out, 0, -1)


def dsm_error(dsm_path: str | Path, gt_dsm_path: str | Path) -> dict:
    """DSM height error (metres) on the ground truth's grid, over cells valid in both.

    The exported DSM is resampled onto the ground-truth grid by nearest neighbour (heights
    are not blended across a roof edge).  Returns ``rmse_m``, ``median_abs_m``, ``mean_m``
    (bias, export minus truth), ``p90_abs_m``, ``n_cells`` and ``coverage`` (the fraction of
    ground-truth cells the export covers).
    """
    pred, gt = read_geotiff(dsm_path), read_geotiff(gt_dsm_path)
    if pred.array.ndim != 2 or gt.array.ndim != 2:
        raise CitygenError(dsm_path, "a DSM must have one band")
    z = _onto(pred, gt, pred.nodata, "nearest")[..., 0]
    z_gt = gt.array.astype(np.float64)
    gt_ok = np.isfinite(z_gt) & ((z_gt != gt.nodata) if gt.nodata is not None else True)
    ok = gt_ok & np.isfinite(z)
    if not ok.any():
        raise CitygenError(dsm_path, f"no cell overlaps the ground truth {gt_dsm_path}")
    err = z[ok] - z_gt[ok]
    return {"rmse_m": float(np.sqrt(np.mean(err**2))), "median_abs_m": float(np.median(np.abs(err))),
            "mean_m": float(np.mean(err)), "p90_abs_m": float(np.percentile(np.abs(err), 90)),
            "n_cells": int(ok.sum()), "coverage": float(ok.sum() / max(1, gt_ok.sum()))}


def ortho_psnr(ortho_path: str | Path, gt_ortho_path: str | Path) -> dict:
    """PSNR (dB, 8-bit peak) of the exported orthophoto on the ground truth's grid.

    The export is resampled bilinearly onto the ground-truth grid; cells where its alpha
    band is 0 (or that fall outside it) are left out.  Returns ``psnr_db``, ``mse`` and
    ``n_cells``.
    """
    pred, gt = read_geotiff(ortho_path), read_geotiff(gt_ortho_path)
    if pred.array.ndim != 3 or pred.array.shape[-1] not in (3, 4) or gt.array.ndim != 3 or gt.array.shape[-1] < 3:
        raise CitygenError(ortho_path, "orthophotos must be RGB or RGBA")
    rgba = pred.array.astype(np.float64)
    if rgba.shape[-1] == 4:
        # mask before resampling so that nodata cells cannot bleed into their neighbours
        rgba = np.where(rgba[..., 3:4] > 0, rgba, np.nan)
    pred_on_gt = _onto(GeoRaster(rgba[..., :3], pred.crs, pred.transform, None), gt, np.nan, "bilinear")
    ref = gt.array[..., :3].astype(np.float64)
    ok = np.all(np.isfinite(pred_on_gt), axis=-1)
    if gt.array.shape[-1] == 4:
        ok &= gt.array[..., 3] > 0
    if not ok.any():
        raise CitygenError(ortho_path, f"no cell overlaps the ground truth {gt_ortho_path}")
    mse = float(np.mean((pred_on_gt[ok] - ref[ok]) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return {"psnr_db": psnr, "mse": mse, "n_cells": int(ok.sum())}


def semantic_agreement(semantics_path: str | Path, gt_semantics_path: str | Path, n_classes: int | None = None) -> dict:
    """Class raster against ground truth on the truth's grid (nearest neighbour), over cells
    labelled in both (nodata 255 left out).  Returns ``accuracy``, ``miou`` (mean over
    classes present in either), ``iou`` per class id, and ``n_cells``."""
    pred, gt = read_geotiff(semantics_path), read_geotiff(gt_semantics_path)
    if pred.array.ndim != 2 or gt.array.ndim != 2:
        raise CitygenError(semantics_path, "a class raster must have one band")
    nodata = 255 if pred.nodata is None else pred.nodata
    lab = _onto(pred, gt, nodata, "nearest")[..., 0]
    ref = gt.array.astype(np.float64)
    ok = np.isfinite(lab) & (ref != (255 if gt.nodata is None else gt.nodata))
    if not ok.any():
        raise CitygenError(semantics_path, f"no labelled cell overlaps the ground truth {gt_semantics_path}")
    p, t = lab[ok].astype(np.int64), ref[ok].astype(np.int64)
    k = n_classes or int(max(p.max(), t.max())) + 1
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = {int(c): float(inter[c] / union[c]) for c in range(k) if union[c] > 0}
    return {"accuracy": float(inter.sum() / ok.sum()), "miou": float(np.mean(list(iou.values()))), "iou": iou,
            "n_cells": int(ok.sum())}


def compare_to_ground_truth(dsm_path: str | Path, gt_dsm_path: str | Path, ortho_path: str | Path,
                            gt_ortho_path: str | Path, semantics_path: str | Path | None = None,
                            gt_semantics_path: str | Path | None = None) -> dict:
    """An export against ground truth (e.g. the synthetic city's ``dsm.tif``, ``ortho.tif``,
    ``ortho_semantics.tif``): ``{"dsm": ..., "ortho": ..., "semantics": ...}`` (see
    :func:`dsm_error`, :func:`ortho_psnr`, :func:`semantic_agreement`; ``semantics`` only
    when both class rasters are given)."""
    result = {"dsm": dsm_error(dsm_path, gt_dsm_path), "ortho": ortho_psnr(ortho_path, gt_ortho_path)}
    if semantics_path is not None and gt_semantics_path is not None:
        result["semantics"] = semantic_agreement(semantics_path, gt_semantics_path)
    return result
