"""README pictures of a real-survey run of examples/bench_caliterra.py (its ``--work`` folder)::

    python examples/caliterra_pictures.py --work /tmp/cal-bench --out docs

writes three small PNGs (256-colour, a few hundred KB each):

- ``caliterra_views.png``: two held-out views, photo | render | per-pixel error (mean |RGB
  difference|, black 0 to white 0.25); the view of median PSNR and the worst one, so the picture
  shows neither only the best case nor only the worst.
- ``caliterra_dsm.png``: the exported DSM (height colour ramp times a hillshade; nodata cells
  magenta) beside the true orthophoto.
- ``caliterra_points.png``: the DSM's error at every held-out SfM point (DSM minus point height,
  ``citygen.export.survey_check.dsm_point_errors``), blue below / red above, full colour at
  +-0.5 m, grey crosses where the DSM has no data, over the dimmed orthophoto.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
PANEL_W = 320  # pixels per panel: three panels side by side stay under ~400 KB as 256-colour PNG
ERROR_FULL_SCALE = 0.25  # mean |RGB difference| shown white
POINT_FULL_SCALE_M = 0.5  # DSM error shown fully saturated
NODATA_RGB = (255, 0, 255)


def _panel(rgb: np.ndarray, width: int, label: str) -> Image.Image:
    im = Image.fromarray(rgb)
    im = im.resize((width, round(im.height * width / im.width)), Image.BOX)
    out = Image.new("RGB", (im.width, im.height + 16))
    out.paste(im, (0, 16))
    ImageDraw.Draw(out).text((4, 2), label, fill=(255, 255, 255))
    return out


def _row(panels: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width
    return sheet


def _stack(rows: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet


def _save(im: Image.Image, path: Path) -> None:
    # 256 colours (median cut): photographs as truecolour PNG would be ~1.5 MB
    im.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KB")


def views_picture(work: Path, out: Path) -> None:
    from citygen.images import load_rgb

    report = json.loads((work / "run" / "eval" / "report.json").read_text())
    views = sorted(report["views"], key=lambda v: v["psnr"])
    chosen = [views[len(views) // 2], views[0]]  # the median view, the worst
    rows = []
    for v in chosen:
        stem = Path(v["name"]).stem
        render = np.asarray(Image.open(work / "run" / "eval" / f"{stem}_rgb.png").convert("RGB"))
        photo = load_rgb(work / "survey" / v["name"], (render.shape[1], render.shape[0]))
        err = np.abs(render.astype(np.float64) - photo.astype(np.float64)).mean(-1) / 255
        err8 = (np.clip(err / ERROR_FULL_SCALE, 0, 1) * 255).round().astype(np.uint8)
        rows.append(_row([_panel(photo, PANEL_W, f"held-out {stem}"),
                          _panel(render, PANEL_W, f"render {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}"),
                          _panel(np.repeat(err8[..., None], 3, -1), PANEL_W, f"|error| (white = {ERROR_FULL_SCALE})")]))
    _save(_stack(rows), out / "caliterra_views.png")


def _points_window(work: Path, raster) -> tuple[slice, slice]:
    """Rows / columns of ``raster`` around the held-out points (10 % margin): the export covers the
    whole field box, most of it ground no camera sees well."""
    from rasterio.transform import rowcol

    from citygen.train.data import load_survey

    survey = load_survey(work / "survey" / "transforms.json")
    xyz = np.load(work / "survey" / "points3D_heldout.npz")["xyz"]
    rows, cols = (np.asarray(a) for a in rowcol(raster.transform, xyz[:, 0] + survey.georef.origin[0],
                                                 xyz[:, 1] + survey.georef.origin[1]))
    h, w = raster.array.shape[:2]
    mr, mc = 0.1 * np.ptp(rows), 0.1 * np.ptp(cols)
    return (slice(max(int(rows.min() - mr), 0), min(int(rows.max() + mr) + 1, h)),
            slice(max(int(cols.min() - mc), 0), min(int(cols.max() + mc) + 1, w)))


def _ortho_rgb(work: Path) -> tuple[np.ndarray, object]:
    from survey_io.geotiff import read_geotiff

    ortho = read_geotiff(work / "export" / "ortho.tif")
    a = ortho.array
    rgb = a[..., :3] if a.dtype == np.uint8 else (np.clip(a[..., :3], 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(rgb), ortho


def dsm_picture(work: Path, out: Path) -> None:
    from citygen.images import colorize_depth
    from survey_io.geotiff import read_geotiff

    dsm = read_geotiff(work / "export" / "dsm.tif")
    window = _points_window(work, dsm)
    z = dsm.array.astype(np.float64)[window]
    valid = np.isfinite(z) & ((z != dsm.nodata) if dsm.nodata is not None else True)
    # hillshade (sun from the north-west, 45 degrees up) on the cell size's slopes
    g = abs(float(dsm.gsd))
    zf = np.where(valid, z, np.median(z[valid]) if valid.any() else 0.0)
    dzdy, dzdx = np.gradient(zf, g)
    slope = np.arctan(np.hypot(dzdx, dzdy))
    aspect = np.arctan2(-dzdx, dzdy)
    alt, az = np.radians(45.0), np.radians(315.0)
    shade = np.clip(np.sin(alt) * np.cos(slope) + np.cos(alt) * np.sin(slope) * np.cos(az - aspect), 0, 1)
    ramp = colorize_depth(-zf, valid).astype(np.float64)  # high = bright
    rgb = (ramp * (0.35 + 0.65 * shade[..., None])).round().astype(np.uint8)
    rgb[~valid] = NODATA_RGB
    lo, hi = np.percentile(z[valid], [2, 98]) if valid.any() else (0.0, 0.0)
    ortho, raster = _ortho_rgb(work)
    ortho = np.ascontiguousarray(ortho[_points_window(work, raster)])
    width = 400
    _save(_row([_panel(rgb, width, f"DSM {g:g} m cells, {lo:.0f}-{hi:.0f} m; magenta: no data"),
                _panel(ortho, width, "true orthophoto")]), out / "caliterra_dsm.png")


def points_picture(work: Path, out: Path) -> None:
    from rasterio.transform import rowcol

    from citygen.export.survey_check import dsm_point_errors
    from citygen.train.data import load_survey

    survey = load_survey(work / "survey" / "transforms.json")
    pts = dsm_point_errors(work / "export" / "dsm.tif", survey)
    if pts is None:
        raise SystemExit("the survey has no held-out points")
    ortho, raster = _ortho_rgb(work)
    wr, wc = _points_window(work, raster)
    scale = 2  # drawn at twice the raster's size: dots stay apart
    crop = Image.fromarray((ortho[wr, wc] * 0.6).astype(np.uint8))
    base = crop.resize((crop.width * scale, crop.height * scale), Image.BILINEAR)
    ox, oy = survey.georef.origin[0], survey.georef.origin[1]
    rows, cols = (np.asarray(a) for a in rowcol(raster.transform, pts["xyz"][:, 0] + ox, pts["xyz"][:, 1] + oy))
    rows, cols = (rows - wr.start + 0.5) * scale, (cols - wc.start + 0.5) * scale
    draw = ImageDraw.Draw(base)
    r = max(2, base.width // 250)
    err = pts["error"]
    for row, col, e in sorted(zip(rows, cols, err), key=lambda t: 0 if np.isnan(t[2]) else abs(t[2])):
        if np.isnan(e):
            draw.line([(col - r, row - r), (col + r, row + r)], fill=(160, 160, 160))
            draw.line([(col - r, row + r), (col + r, row - r)], fill=(160, 160, 160))
            continue
        t = float(np.clip(abs(e) / POINT_FULL_SCALE_M, 0, 1))
        colour = (255, round(255 * (1 - t)), round(255 * (1 - t))) if e > 0 else (round(255 * (1 - t)), round(255 * (1 - t)), 255)
        draw.ellipse([col - r, row - r, col + r, row + r], fill=colour)
    ok = ~np.isnan(err)
    label = (f"DSM - point height, {int(ok.sum())} held-out points (median |e| {np.median(np.abs(err[ok])):.3f} m): "
             f"white 0, red +{POINT_FULL_SCALE_M}, blue -{POINT_FULL_SCALE_M} m")
    _save(_panel(np.asarray(base), 640, label), out / "caliterra_points.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="examples/bench_caliterra.py's --work folder")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNGs")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    views_picture(args.work, args.out)
    dsm_picture(args.work, args.out)
    points_picture(args.work, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
