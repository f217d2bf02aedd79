"""Held-out evaluation: render each test view, score it, write PNGs and a JSON report.

Metrics are computed on what is written: the render is quantised to 8 bits first, so the
PSNR/SSIM in ``report.json`` are those of ``<view>_rgb.png`` against the ground-truth image.
Per view: PSNR, SSIM (11x11 Gaussian, sigma 1.5), semantic pixel accuracy and mIoU against
the label map (255 ignored), depth mean absolute error (metres, pixels with known depth).
The report's ``mean`` averages the per-view numbers; ``semantic_total`` scores all pixels
of all views together.  LPIPS (vgg, v0.1; :mod:`citygen.nets.lpips`) is computed when a
weights file is given; the report's ``lpips`` then names that file, else says how to get one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from survey_io import Survey
from survey_io.atomic import atomic_path, atomic_write_json
from survey_io.semantics import CLASS_COLORS

from ..nets.lpips import LPIPS, load_lpips, lpips_distance, lpips_report
from ..render.volume import render_image
from .data import load_depth, load_labels, load_rgb, load_survey, select_images
from .metrics import confusion_matrix, psnr, semantic_scores, ssim


def rgb_to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """An RGB tensor in [0, 1] (any device) as a uint8 array (clamped, rounded): what is scored and saved."""
    return (rgb.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W[, 3]) array as PNG, atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8, near = bright yellow, far = dark purple (2/98 percentiles)."""
    valid = np.isfinite(depth) & (depth > 0) if valid is None else valid
    if not valid.any():
        return np.zeros((*depth.shape, 3), np.uint8)
    lo, hi = np.percentile(depth[valid], [2, 98])
    t = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    # piecewise-linear approximation of matplotlib's "magma" (reversed: near is bright)
    stops = np.array([[252, 253, 191], [252, 137, 97], [183, 55, 121], [81, 18, 124], [0, 0, 4]], np.float64)
    pos = t * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    f = (pos - i)[..., None]
    rgb = stops[i] * (1 - f) + stops[i + 1] * f
    rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


def colorize_labels(labels: np.ndarray, colors=CLASS_COLORS) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 (unknown / ignored ids are black)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    return palette[labels]


def evaluate(checkpoint: Path | str, survey: Survey | Path | str, out: Path | str,
             image_names: list[str] | None = None, device: str = "cpu", write_images: bool = True,
             lpips_weights: str | Path | LPIPS | None = None) -> dict[str, Any]:
    """Render and score the held-out views of ``survey`` with the field in ``checkpoint``.

    Args:
        checkpoint: sidecar, checkpoints folder or run folder.
        survey: the survey or its ``transforms.json``.
        out: folder for PNGs and ``report.json``.
        image_names: test views to score (None: all of the survey's test views).
        lpips_weights: LPIPS weights file (``scripts/convert_lpips_weights.py``) or a loaded
            :class:`~citygen.nets.lpips.LPIPS`; None: no LPIPS.

    Returns:
        the report: ``{"views": [...], "mean": {...}, "semantic_total": {...}}``.
    """
    from .trainer import load_field

    out = Path(out)
    lpips_net = load_lpips(lpips_weights, device)  # a bad weights file fails before any rendering
    survey = load_survey(survey)
    field, meta = load_field(checkpoint, device)
    cfg = meta["train_config"]
    views = select_images(survey, image_names, "test") if image_names else survey.test_images
    survey.check_image_files(views)  # ground truth of the wrong size would be resized, not refused
    n_classes = len(meta["classes"])
    conf_total = torch.zeros(n_classes, n_classes, dtype=torch.long)
    rows = []
    for im in views:
        cam = survey.camera_of(im)
        if cfg.downscale > 1:
            cam = cam.scaled(1.0 / cfg.downscale)
        size = (cam.width, cam.height)
        r = render_image(field, cam, im.c2w, render=cfg.render, with_semantics=True)
        rgb8 = rgb_to_uint8(r["rgb"])
        gt8 = load_rgb(survey.image_path(im), size)
        pred, gt = torch.from_numpy(rgb8).float() / 255, torch.from_numpy(gt8).float() / 255
        row: dict[str, Any] = {"name": im.name, "psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}
        if lpips_net is not None:
            row["lpips"] = lpips_distance(lpips_net, pred, gt)
        pred_labels = r["semantics"].argmax(-1).to(torch.uint8).cpu()
        if im.semantics is not None:
            gt_labels = torch.from_numpy(load_labels(im.semantics, size).copy())
            conf = confusion_matrix(pred_labels, gt_labels, n_classes)
            conf_total += conf
            row.update(semantic_scores(conf))
        depth = r["depth"].cpu().numpy()
        if im.depth is not None:
            gt_depth = load_depth(im.depth, size)
            known = gt_depth > 0
            if known.any():
                row["depth_mae_m"] = float(np.abs(depth[known] - gt_depth[known]).mean())
        stem = Path(im.name).stem
        if write_images:
            write_png(out / f"{stem}_rgb.png", rgb8)
            write_png(out / f"{stem}_depth.png", colorize_depth(depth, r["acc"].cpu().numpy() > 0.5))
            write_png(out / f"{stem}_semantics.png", colorize_labels(pred_labels.numpy()))
        rows.append(row)
    keys = [k for k in ("psnr", "ssim", "lpips", "pixel_accuracy", "miou", "depth_mae_m") if any(k in r for r in rows)]
    mean = {k: float(np.mean([r[k] for r in rows if k in r and math.isfinite(r[k])])) for k in keys}
    report = {"checkpoint": str(checkpoint), "step": meta["step"], "views": rows, "mean": mean,
              "semantic_total": semantic_scores(conf_total) if int(conf_total.sum()) else None,
              **lpips_report(lpips_net, mean)}
    atomic_write_json(out / "report.json", report)
    return report
