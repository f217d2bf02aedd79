"""Held-out evaluation: render each test view, score it, write PNGs and a JSON report.

Metrics are computed on what is written: the render is quantised to 8 bits first, so the
PSNR/SSIM in ``report.json`` are those of ``<view>_rgb.png`` against the ground-truth image.
Per view: PSNR, SSIM (11x11 Gaussian, sigma 1.5), semantic pixel accuracy and mIoU against
the label map (255 ignored), depth mean absolute error (metres, pixels with known depth).
The report's ``mean`` averages the per-view numbers; ``semantic_total`` scores all pixels
of all views together.  LPIPS (vgg, v0.1; :mod:`citygen.nets.lpips`) is computed when a
weights file is given; the report's ``lpips`` then names that file, else says how to get one.

Held-out SfM points: when ``points3D_heldout.npz`` (written by ``citygen ingest``) lies beside
``transforms.json``, each held-out point observed in a test view is compared with the rendered
z-depth at its pixel: ``heldout_points`` in the report gives the median absolute error, the RMSE
and the share within 2 GSD (the pixel footprint at the point's depth, z / fl_x of the rendered
camera), over all such observations; without the file, or without an observation in the
scored views, it holds a sentence saying so (:class:`citygen.metrics.HeldoutPointScore`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from survey_io import Survey
from survey_io.atomic import atomic_write_json

from ..images import colorize_depth, colorize_labels, load_depth, load_labels, load_rgb, rgb_to_uint8, write_png
from ..metrics import HeldoutPointScore, confusion_matrix, psnr, semantic_scores, ssim
from ..nets.lpips import LPIPS, load_lpips, lpips_distance, lpips_report
from ..render.volume import render_image
from ..store.field import load_field
from .data import load_survey, select_images


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
    out = Path(out)
    lpips_net = load_lpips(lpips_weights, device)  # a bad weights file fails before any rendering
    survey = load_survey(survey)
    field, meta = load_field(checkpoint, device)
    cfg = meta["train_config"]
    views = select_images(survey, image_names, "test") if image_names else survey.test_images
    survey.check_image_files(views)  # ground truth of the wrong size would be resized, not refused
    n_classes = len(meta["classes"])
    conf_total = torch.zeros(n_classes, n_classes, dtype=torch.long)
    points = HeldoutPointScore(survey)
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
        points.add(im.name, depth, cam, im.c2w, float(cfg.downscale))
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
              "heldout_points": points.report(),
              **lpips_report(lpips_net, mean)}
    atomic_write_json(out / "report.json", report)
    return report
