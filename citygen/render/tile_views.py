"""Render survey views of a trained tile to PNGs and score them against the ground truth.

Backs ``citygen render TILE``.  Per view: ``<stem>_rgb.png``, ``<stem>_depth.png``
(colourised z-depth), ``<stem>_semantics.png`` (class colours), ``<stem>_blocks.png`` (which
block each pixel comes from, blends mixing the blocks' colours), and, where the survey has the
ground truth, PSNR / SSIM (of the 8-bit PNG, as :mod:`citygen.train.evaluate` scores single
blocks), LPIPS when given a weights file (:mod:`citygen.nets.lpips`), semantic pixel accuracy /
mIoU, depth MAE and the seam metric (:mod:`citygen.render.seams`); over all views, the rendered
depth against the survey's held-out SfM points (``heldout_points``: median |error|, RMSE, share
within 2 GSD, scored by :class:`citygen.metrics.HeldoutPointScore` as for single blocks, or
a sentence when the survey has none).  Everything goes to ``metrics.json`` in the output folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from survey_io import Survey
from survey_io.atomic import atomic_write_json

from ..errors import CitygenError
from ..images import colorize_depth, colorize_labels, load_depth, load_labels, load_rgb, rgb_to_uint8, write_png
from ..metrics import HeldoutPointScore, confusion_matrix, psnr, semantic_scores, ssim
from ..nets.lpips import LPIPS, load_lpips, lpips_distance, lpips_report
from .seams import SeamMetric
from .tile import TileRenderer


def select_views(survey: Survey, views: Sequence[str]) -> list:
    """``["test"]`` (held-out views), ``["all"]`` (every image) or image names / stems."""
    if list(views) == ["test"]:
        return survey.test_images
    if list(views) == ["all"]:
        return list(survey.images)
    by_name = {im.name: im for im in survey.images}
    by_stem = {Path(im.name).stem: im for im in survey.images}
    chosen = []
    for v in views:
        im = by_name.get(v) or by_stem.get(v)
        if im is None:
            raise CitygenError(survey.root, f"no view {v!r} in the survey (use test, all, or image names)")
        chosen.append(im)
    return chosen


def render_tile_views(renderer: TileRenderer, survey: Survey, views: Sequence[str], out: str | Path,
                      downscale: int = 1, seam_band_m: float | None = None,
                      lpips_weights: str | Path | LPIPS | None = None) -> dict[str, Any]:
    """Render ``views`` of ``survey`` through ``renderer`` into ``out``; returns the metrics report.

    ``lpips_weights``: an LPIPS weights file (or loaded model) to score the views with LPIPS too.
    """
    out = Path(out)
    lpips_net = load_lpips(lpips_weights, renderer.device)
    images = select_views(survey, views)
    if not images:
        raise CitygenError(survey.root, "no views to render (the survey has no held-out views; try --views all)")
    if seam_band_m is not None and not seam_band_m > 0:
        raise CitygenError(None, f"the seam band must be > 0 metres, got {seam_band_m}")
    grid = renderer.plan.grid
    # a one-block tile has no seams; a plan without margin needs an explicit band
    seams = SeamMetric(renderer.plan, seam_band_m) if grid.rows * grid.cols > 1 and (
        seam_band_m or renderer.plan.margin_m > 0) else None
    n_classes = len(renderer.classes)
    conf_total = torch.zeros(n_classes, n_classes, dtype=torch.long)
    points = HeldoutPointScore(survey)
    rows = []
    t_total = 0.0
    for im in images:
        cam = survey.camera_of(im)
        if downscale > 1:
            cam = cam.scaled(1.0 / downscale)
        size = (cam.width, cam.height)
        t0 = time.perf_counter()
        r = renderer.render_view(cam, im.c2w)
        seconds = time.perf_counter() - t0
        t_total += seconds
        rgb8 = rgb_to_uint8(r["rgb"])
        labels = r["semantics"].argmax(-1).to(torch.uint8).numpy()
        depth = r["depth"].numpy()
        points.add(im.name, depth, cam, im.c2w, downscale)
        stem = Path(im.name).stem
        write_png(out / f"{stem}_rgb.png", rgb8)
        write_png(out / f"{stem}_depth.png", colorize_depth(depth, r["acc"].numpy() > 0.5))
        write_png(out / f"{stem}_semantics.png", colorize_labels(labels))
        write_png(out / f"{stem}_blocks.png", colorize_blocks(r["weights"].numpy()))
        row: dict[str, Any] = {"name": im.name, "seconds": round(seconds, 3),
                               "rays_per_s": round(cam.width * cam.height / max(seconds, 1e-9), 1)}
        image_path = survey.image_path(im)
        if image_path.is_file():
            gt8 = load_rgb(image_path, size)
            pred, gt = torch.from_numpy(rgb8).float() / 255, torch.from_numpy(gt8).float() / 255
            row["psnr"], row["ssim"] = psnr(pred, gt), ssim(pred, gt)
            if lpips_net is not None:
                row["lpips"] = lpips_distance(lpips_net, pred, gt)
            if im.depth is not None and Path(im.depth).is_file():
                gt_depth = load_depth(Path(im.depth), size)
                known = gt_depth > 0
                if known.any():
                    row["depth_mae_m"] = float(np.abs(depth[known] - gt_depth[known]).mean())
                if seams is not None:
                    seam = seams.add(im.name, pred.numpy(), gt.numpy(), cam, im.c2w, gt_depth)
                    row.update({k: v for k, v in seam.items() if k != "name"})
        if im.semantics is not None and Path(im.semantics).is_file():
            conf = confusion_matrix(torch.from_numpy(labels), torch.from_numpy(load_labels(Path(im.semantics), size)),
                                    n_classes)
            conf_total += conf
            row.update(semantic_scores(conf))
        rows.append(row)
    keys = [k for k in ("psnr", "ssim", "lpips", "pixel_accuracy", "miou", "depth_mae_m") if any(k in r for r in rows)]
    mean = {k: float(np.mean([r[k] for r in rows if k in r and math.isfinite(r[k])])) for k in keys}
    seam_report = seams.report() if seams is not None and seams.views else None
    report = {"kind": "citygen.tile_render", "views": rows, "mean": mean,
              "semantic_total": semantic_scores(conf_total) if int(conf_total.sum()) else None,
              "seams": seam_report, "heldout_points": points.report(), "blocks": renderer.block_ids, "missing_blocks": renderer.missing_blocks,
              "downscale": downscale, "render_seconds": round(t_total, 3), **lpips_report(lpips_net, mean)}
    atomic_write_json(out / "metrics.json", _json_safe(report))
    return report


def colorize_blocks(weights: np.ndarray) -> np.ndarray:
    """(H, W, B) per-ray block weights -> (H, W, 3) uint8: each block a hue, blends mix them,
    black where the ray hit nothing (shows where blocks meet and how wide the blend is)."""
    B = weights.shape[-1]
    hues = np.arange(B) * 0.618034 % 1.0  # golden-ratio hues: neighbours in the list differ
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hues[:, None] * 6.0) % 6.0
    palette = 1.0 - 0.8 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)  # HSV -> RGB, s = 0.8, v = 1
    rgb = weights @ palette
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _json_safe(x: Any) -> Any:
    """NaN / inf -> None, so metrics.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


__all__ = ["render_tile_views", "select_views"]
