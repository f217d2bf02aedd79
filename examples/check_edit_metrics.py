"""Acceptance figures for semantic editing and style on a trained tile of the synthetic city.

Edits the tile's stack (``TILE/edits.json``) in turn, renders held-out views through the
tile renderer with the edits applied, and measures against the survey's ground truth:

1. remove class ``building`` (with a ground fill): % of rendered pixels still classified
   building; the exported DSM inside the ground-truth building footprints vs the bare-terrain
   ``dtm.tif`` (RMSE / median, before and after); and what the edit did outside the selection:
   PSNR against ground truth, before and after, on the pixels outside it.  A pixel is outside
   the selection when its *unedited* ray puts less than ``--outside-weight`` (default 1 %) of
   its opacity on samples the stack selects (:func:`citygen.edit.probe.selection_weight`,
   computed by the renderer in 3-D, so oblique rays grazing a wall and rays through a
   building's soft fringe count as inside).  The older 2-D definition (pixels the unedited
   render does not label building) is reported beside it for comparison.
2. style: the named style ``sunset`` on buildings, and reference-image colour statistics
   (a synthetic gradient image unless ``--reference`` is given): multi-view consistency
   (view A warped into an overlapping view B with A's rendered depth, mean abs colour
   difference over the pixels that reproject visibly) and the distance of the renders'
   colour statistics (Lab mean / covariance) to the reference, before and after.

The tile's edit stack is restored when the script ends.  Writes ``OUT/edit_metrics.json``,
``OUT/edit_style.png`` (unedited | buildings removed | sunset on buildings | reference
statistics, one view) and ``OUT/remove_<view>.png`` (unedited | buildings removed | the
selection weight in blue with the change outside the selection, x4, in yellow).

    python examples/check_edit_metrics.py --tile TILE --survey transforms.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from citygen.edit import EditStack, tile_field_wrapper
from citygen.edit.probe import selection_weight
from citygen.edit.stack import stack_path
from citygen.export.run import ExportOptions, core_rect, export_scene
from citygen.images import load_rgb
from citygen.render.tile import TileRenderer
from citygen.render.tile_views import select_views
from citygen.style import add_style, rgb_to_lab
from survey_io import read_transforms
from survey_io.atomic import atomic_write_json
from survey_io.semantics import CLASSES

BUILDING = CLASSES.index("building")
GROUND_COPY = "check_edit_metrics_ground.tif"  # the --ground-dtm copy, removed at the end


# -- rendering -----------------------------------------------------------------------------------
def render_views(renderer: TileRenderer, survey, images, downscale: int) -> dict[str, dict]:
    """name -> {rgb (H,W,3) float [0,1], labels (H,W), depth, acc, gt (H,W,3) or None, camera, c2w}."""
    out = {}
    for im in images:
        cam = survey.camera_of(im)
        if downscale > 1:
            cam = cam.scaled(1.0 / downscale)
        r = renderer.render_view(cam, im.c2w)
        path = survey.image_path(im)
        gt = load_rgb(path, (cam.width, cam.height)).astype(np.float32) / 255 if path.is_file() else None
        out[im.name] = {"rgb": r["rgb"].clamp(0, 1).numpy(), "labels": r["semantics"].argmax(-1).numpy(),
                        "depth": r["depth"].numpy(), "acc": r["acc"].numpy(), "gt": gt, "camera": cam,
                        "c2w": np.asarray(im.c2w, dtype=np.float64)}
    return out


def with_stack(tile: Path, renderer: TileRenderer, edits: list[dict], ground: dict | None = None) -> None:
    """Replace the tile's stack by ``edits`` (and ground model) and point the renderer at it."""
    stack = EditStack.load(tile)
    stack.edits, stack.undone, stack.ground = [dict(e) for e in edits], [], ground
    stack.save()
    renderer.field_wrapper = tile_field_wrapper(tile)
    renderer.clear_cache()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def change_outside(before: dict, after: dict, outside: dict[str, np.ndarray]) -> dict:
    """PSNR of the unedited and edited renders against ground truth (and against each other)
    over the ``outside`` pixels of each view, pooled over the views."""
    e = np.concatenate([after[n]["rgb"][m] for n, m in outside.items()])
    u = np.concatenate([before[n]["rgb"][m] for n, m in outside.items()])
    n_px = sum(before[n]["labels"].size for n in outside)
    report = {"pixels": int(len(e)), "fraction": len(e) / n_px, "psnr_edited_vs_unedited": psnr(e, u)}
    if all(before[n]["gt"] is not None for n in outside):
        g = np.concatenate([before[n]["gt"][m] for n, m in outside.items()])
        report.update({"psnr_unedited_vs_gt": psnr(u, g), "psnr_edited_vs_gt": psnr(e, g)})
        report["psnr_change_db"] = report["psnr_edited_vs_gt"] - report["psnr_unedited_vs_gt"]
    return report


# -- DSM vs terrain inside the footprints -------------------------------------------------------
def footprint_dsm_error(dsm_path: Path, dtm_path: Path, scene: dict, origin, gt_dsm_path: Path | None = None) -> dict:
    """DSM (exported) minus bare terrain over the cells inside the ground-truth building footprints;
    with the ground-truth DSM, also over the bare ground outside them (ground-truth DSM within
    0.3 m of the terrain): the tile's own height error where no edit acts, for scale."""
    import rasterio
    from rasterio.features import rasterize
    from rasterio.warp import Resampling, reproject

    with rasterio.open(dsm_path) as src:
        dsm = src.read(1).astype(np.float64)
        nodata, transform, crs, shape = src.nodata, src.transform, src.crs, dsm.shape
    with rasterio.open(dtm_path) as src:
        dtm = np.full(shape, np.nan)
        # NaN outside the source's coverage (the export covers the tile, the survey rasters less)
        reproject(rasterio.band(src, 1), dtm, dst_transform=transform, dst_crs=crs, dst_nodata=np.nan,
                  resampling=Resampling.bilinear)
    gt = None
    if gt_dsm_path is not None:
        with rasterio.open(gt_dsm_path) as src:
            gt = np.full(shape, np.nan)
            reproject(rasterio.band(src, 1), gt, dst_transform=transform, dst_crs=crs, dst_nodata=np.nan,
                      resampling=Resampling.bilinear)
    polys = []
    for b in scene["buildings"]:
        for part in b["parts"]:
            ring = [[x + origin[0], y + origin[1]] for x, y in part["footprint_local"]]
            polys.append({"type": "Polygon", "coordinates": [ring + [ring[0]]]})
    inside = rasterize([(p, 1) for p in polys], out_shape=shape, transform=transform, fill=0,
                       all_touched=False).astype(bool)
    valid = inside & np.isfinite(dsm) & np.isfinite(dtm)
    if nodata is not None:
        valid &= dsm != nodata
    report = {"cells_in_footprints": int(inside.sum()), "cells_valid": int(valid.sum()),
              **_height_errors(dsm[valid] - dtm[valid])}
    if gt is not None:
        bare = ~inside & np.isfinite(dsm) & np.isfinite(gt) & (np.abs(gt - dtm) < 0.3)
        if nodata is not None:
            bare &= dsm != nodata
        report["bare_ground_outside"] = {"cells_valid": int(bare.sum()), **_height_errors(dsm[bare] - dtm[bare])}
    return report


def _height_errors(d: np.ndarray) -> dict:
    if not d.size:
        return {"rmse_m": None, "median_m": None, "median_abs_m": None, "frac_within_2m": None}
    return {"rmse_m": float(np.sqrt(np.mean(d ** 2))), "median_m": float(np.median(d)),
            "median_abs_m": float(np.median(np.abs(d))), "frac_within_2m": float(np.mean(np.abs(d) < 2.0))}


# -- multi-view consistency ---------------------------------------------------------------------
def reprojection_error(a: dict, b: dict, rel_tol: float = 0.03) -> dict:
    """Warp view ``a`` into ``b`` with a's rendered depth; mean abs RGB difference (0..255 scale)
    over a's pixels that land inside b, in front of it, and agree with b's depth (not occluded)."""
    cam_a, cam_b = a["camera"], b["camera"]
    H, W = a["depth"].shape
    j, i = np.mgrid[0:H, 0:W]
    z = a["depth"]
    pts = np.stack([(i + 0.5 - cam_a.cx) / cam_a.fl_x * z, (j + 0.5 - cam_a.cy) / cam_a.fl_y * z, z], -1)
    world = pts.reshape(-1, 3) @ a["c2w"][:3, :3].T + a["c2w"][:3, 3]
    w2c = np.linalg.inv(b["c2w"])
    cb = world @ w2c[:3, :3].T + w2c[:3, 3]
    zb = cb[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = cb[:, 0] / zb * cam_b.fl_x + cam_b.cx - 0.5
        v = cb[:, 1] / zb * cam_b.fl_y + cam_b.cy - 0.5
    Hb, Wb = b["depth"].shape
    ui, vi = np.round(u), np.round(v)
    ok = (a["acc"].reshape(-1) > 0.5) & (zb > 0) & (ui >= 0) & (ui < Wb) & (vi >= 0) & (vi < Hb)
    ui, vi = ui[ok].astype(int), vi[ok].astype(int)
    visible = (np.abs(b["depth"][vi, ui] - zb[ok]) < rel_tol * zb[ok]) & (b["acc"][vi, ui] > 0.5)
    ca = a["rgb"].reshape(-1, 3)[ok][visible]
    cb_ = b["rgb"][vi[visible], ui[visible]]
    return {"mean_abs_diff_255": float(np.abs(ca - cb_).mean() * 255) if len(ca) else None,
            "pixels": int(visible.sum()), "fraction_of_a": float(visible.sum() / (H * W))}


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb_to_lab(torch.from_numpy(np.asarray(rgb, dtype=np.float32).reshape(-1, 3))).double().numpy()
    return lab.mean(0), np.cov(lab.T)


def stats_distance(rgb: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> dict:
    m, c = lab_stats(rgb)
    return {"mean_dist_lab": float(np.linalg.norm(m - ref[0])), "cov_frobenius_lab": float(np.linalg.norm(c - ref[1])),
            "mean_lab": [round(float(x), 2) for x in m]}


def gradient_reference(path: Path, size: int = 256) -> None:
    """A sunset-like gradient: deep blue top to orange / magenta bottom, with a horizontal hue drift."""
    t = np.linspace(0, 1, size)[:, None, None]
    s = np.linspace(0, 1, size)[None, :, None]
    top, bottom = np.array([0.10, 0.12, 0.35]), np.array([0.98, 0.55, 0.20])
    img = (1 - t) * top + t * bottom + 0.15 * (s - 0.5) * np.array([0.6, -0.4, 0.8])
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def to8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


# -- main -----------------------------------------------------------------------------------------
def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tile", type=Path, required=True)
    ap.add_argument("--survey", type=Path, required=True, help="the survey's transforms.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--views", type=int, default=3, help="held-out views for the removal figures")
    ap.add_argument("--downscale", type=int, default=2)
    ap.add_argument("--gsd", type=float, default=2.0, help="DSM cell size, metres")
    ap.add_argument("--style", default="sunset")
    ap.add_argument("--reference", type=Path, default=None, help="reference image (default: a synthetic gradient)")
    ap.add_argument("--outside-weight", type=float, default=0.01,
                    help="a pixel is outside the selection when its unedited ray puts less than this share of "
                         "its opacity on selected samples")
    ap.add_argument("--ground-dtm", type=Path, default=None,
                    help="a DTM GeoTIFF the removal fills the ground at (copied into the tile for the run); "
                         "default: the ground the edit estimates from the field")
    args = ap.parse_args()

    t_start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    survey = read_transforms(args.survey)
    root = args.survey.parent
    scene = json.loads((root / "scene.json").read_text())
    tests = select_views(survey, ["test"])[: args.views]
    # view B: the training image after view A in the flight line (front overlap 65 %)
    order = [im.name for im in survey.images]
    view_a = tests[0]
    view_b = survey.images[order.index(view_a.name) + 1]
    all_views = tests + [view_b]

    renderer = TileRenderer.open(args.tile, apply_edits=False)  # edits are set per experiment below
    origin = renderer.georef.origin
    sp = stack_path(args.tile)
    saved = sp.read_bytes() if sp.is_file() else None
    base_edits = EditStack.load(args.tile).active()
    saved_ground = EditStack.load(args.tile).ground
    report: dict = {"tile": str(args.tile), "views": [im.name for im in tests], "view_pair": [view_a.name, view_b.name],
                    "downscale": args.downscale, "dsm_gsd_m": args.gsd, "base_edits": len(base_edits),
                    "removal_ground": str(args.ground_dtm) if args.ground_dtm else "estimated from the field"}
    timings = {}

    def export_dsm(dest: Path) -> Path:
        export_scene(renderer, dest, ExportOptions(what=("dsm",), gsd=args.gsd, rect=core_rect(renderer),
                                                   progress=False))
        return next(dest.glob("*dsm*.tif"))

    try:
        # -- unedited -----------------------------------------------------------------------
        t0 = time.perf_counter()
        with_stack(args.tile, renderer, base_edits, ground=saved_ground)
        before = render_views(renderer, survey, all_views, args.downscale)
        dsm_before = export_dsm(out / "export_before")
        timings["unedited_s"] = time.perf_counter() - t0

        # -- remove buildings --------------------------------------------------------------------
        t0 = time.perf_counter()
        with_stack(args.tile, renderer, base_edits, ground=saved_ground)
        stack = EditStack.load(args.tile)
        stack.add("remove", {"class": "building"}, {"fill_ground": True})
        if args.ground_dtm is not None:
            shutil.copyfile(args.ground_dtm, args.tile / GROUND_COPY)
            stack.ground = {"kind": "raster", "path": GROUND_COPY}
        stack.save()
        renderer.field_wrapper = tile_field_wrapper(args.tile)
        renderer.clear_cache()
        removed = render_views(renderer, survey, tests, args.downscale)
        dsm_after = export_dsm(out / "export_removed")
        timings["remove_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # share of each unedited ray's opacity on selected samples (whole stack: base edits too)
        sel_weight = {n: selection_weight(renderer, args.tile, r["camera"], r["c2w"]).numpy()
                      for n, r in removed.items()}
        timings["selection_weight_s"] = time.perf_counter() - t0

        n_px = sum(r["labels"].size for r in removed.values())
        bld_before = sum(int((r["labels"] == BUILDING).sum()) for n, r in before.items() if n in removed)
        bld_after = sum(int((r["labels"] == BUILDING).sum()) for r in removed.values())
        outside = change_outside(before, removed, {n: w < args.outside_weight for n, w in sel_weight.items()})
        outside["definition"] = (f"unedited ray puts < {args.outside_weight:g} of its opacity on samples the "
                                 "edit stack selects (3-D, from the renderer)")
        outside["older_2d_definition"] = {
            "definition": "pixels the unedited render does not label building (2-D label map)",
            **change_outside(before, removed, {n: before[n]["labels"] != BUILDING for n in removed})}
        report["remove_building"] = {
            "building_pixels_pct_before": 100 * bld_before / n_px,
            "building_pixels_pct_after": 100 * bld_after / n_px,
            "dsm_in_footprints_vs_dtm_before": footprint_dsm_error(dsm_before, root / "dtm.tif", scene, origin,
                                                                     root / "dsm.tif"),
            "dsm_in_footprints_vs_dtm_after": footprint_dsm_error(dsm_after, root / "dtm.tif", scene, origin,
                                                                    root / "dsm.tif"),
            "outside_selection": outside}

        # -- styles ------------------------------------------------------------------------------
        ref_path = args.reference
        if ref_path is None:
            ref_path = out / "reference_gradient.png"
            gradient_reference(ref_path)
        ref_rgb = np.asarray(Image.open(ref_path).convert("RGB"), dtype=np.float32) / 255
        ref_stats = lab_stats(ref_rgb)
        pair = [view_a, view_b]
        styles = {}
        t0 = time.perf_counter()
        with_stack(args.tile, renderer, base_edits, ground=saved_ground)
        add_style(args.tile, named=args.style, classes=["building"])
        renderer.field_wrapper = tile_field_wrapper(args.tile)
        renderer.clear_cache()
        styles[f"{args.style}_on_building"] = render_views(renderer, survey, pair, args.downscale)
        timings["named_style_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with_stack(args.tile, renderer, base_edits, ground=saved_ground)
        add_style(args.tile, reference=ref_path)
        renderer.field_wrapper = tile_field_wrapper(args.tile)
        renderer.clear_cache()
        styles["reference_stats"] = render_views(renderer, survey, pair, args.downscale)
        timings["reference_style_s"] = time.perf_counter() - t0

        def seen(views):  # rendered pixels of the pair (opaque ones)
            return np.concatenate([views[im.name]["rgb"][views[im.name]["acc"] > 0.5] for im in pair])

        def building_px(views):  # pixels of the pair the unedited render calls building
            return np.concatenate([views[im.name]["rgb"][before[im.name]["labels"] == BUILDING] for im in pair])

        style_report = {"unedited": {"reprojection": reprojection_error(before[view_a.name], before[view_b.name]),
                                     "stats_to_reference": stats_distance(seen(before), ref_stats)},
                        "reference_lab_mean": [round(float(x), 2) for x in ref_stats[0]],
                        "reference": str(ref_path)}
        for key, views in styles.items():
            style_report[key] = {"reprojection": reprojection_error(views[view_a.name], views[view_b.name]),
                                 "stats_to_reference": stats_distance(seen(views), ref_stats)}
        # what the named style did to the buildings vs the rest (its selection)
        nb = {im.name: before[im.name]["labels"] != BUILDING for im in pair}
        sv = styles[f"{args.style}_on_building"]
        style_report[f"{args.style}_on_building"]["mean_abs_change_255"] = {
            "building": float(np.abs(building_px(sv) - building_px(before)).mean() * 255),
            "non_building": float(np.mean(np.concatenate([np.abs(sv[n]["rgb"][m] - before[n]["rgb"][m]).ravel()
                                                          for n, m in nb.items()])) * 255)}
        report["style"] = style_report

        # -- pictures ----------------------------------------------------------------------------
        a = view_a.name
        panels = [before[a]["rgb"], removed[a]["rgb"], styles[f"{args.style}_on_building"][a]["rgb"],
                  styles["reference_stats"][a]["rgb"]]
        Image.fromarray(np.concatenate([to8(p) for p in panels], axis=1)).save(out / "edit_style.png")
        for name in removed:
            # unedited | buildings removed | selection weight (blue) and the change outside it (yellow, x4)
            outside_px = sel_weight[name] < args.outside_weight
            change = np.clip(4 * np.abs(removed[name]["rgb"] - before[name]["rgb"]).mean(-1), 0, 1) * outside_px
            probe = np.stack([change, change, sel_weight[name]], -1)
            Image.fromarray(np.concatenate([to8(before[name]["rgb"]), to8(removed[name]["rgb"]), to8(probe)], 1)).save(
                out / f"remove_{Path(name).stem}.png")
    finally:
        (args.tile / GROUND_COPY).unlink(missing_ok=True)
        if saved is None:
            sp.unlink(missing_ok=True)
        else:
            sp.write_bytes(saved)

    timings["total_s"] = time.perf_counter() - t_start
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(out / "edit_metrics.json", report)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
