"""A picture of a plan (PNG, Pillow): blocks, margins, cameras, a few footprints.

North is up.  Drawn, bottom to top: the orthophoto (optional), coverage cells seen by too
few images (red tint), extended rectangles (blue), cores (black; red when the block is
flagged ``low_coverage``) with their id and image count, camera positions coloured by the
number of blocks they joined (0 red, 1 grey, 2 blue, 3 green, 4+ orange), and the ground
footprints of a few cameras with a line from the camera to its footprint's centre -- an
oblique view's line is long: it trains the blocks it looks at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyproj
from PIL import Image, ImageDraw

from survey_io.atomic import atomic_path
from survey_io.geotiff import read_geotiff

from ..errors import CitygenError
from .plan import TilePlan
from .visibility import Footprints

BLOCK_COUNT_COLORS = [(220, 30, 30), (120, 120, 120), (40, 90, 220), (30, 160, 60), (240, 140, 0)]
FOOTPRINT_COLORS = [(230, 0, 120), (0, 160, 200), (140, 60, 220), (200, 120, 0), (0, 140, 90), (90, 90, 0)]
MAX_CAMERA_DOTS = 6000


def draw_plan(plan: TilePlan, path: str | Path, footprints: Footprints | None = None, n_footprints: int = 6,
              ortho: str | Path | None = None, size_px: int = 1600) -> Path:
    """Draw ``plan`` into the PNG ``path`` (atomically).

    Args:
        footprints: the survey's footprints (camera positions and outlines); without them
            only the grid is drawn.
        n_footprints: how many cameras' footprints to outline (spread over the survey,
            obliques preferred, deterministic).
        ortho: an orthophoto GeoTIFF in the plan's CRS drawn underneath.
        size_px: length of the picture's longer side.
    """
    ext = np.array(plan.grid.extent, dtype=np.float64)
    pad = plan.margin_m + 0.03 * max(ext[2] - ext[0], ext[3] - ext[1])
    x0, y0, x1, y1 = ext[0] - pad, ext[1] - pad, ext[2] + pad, ext[3] + pad
    scale = size_px / max(x1 - x0, y1 - y0)
    w, h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))

    def px(x, y):
        return (np.asarray(x) - x0) * scale, (y1 - np.asarray(y)) * scale

    def rect_px(r):
        (ua, va), (ub, vb) = px(r[0], r[3]), px(r[2], r[1])
        return [float(ua), float(va), float(ub), float(vb)]

    img = Image.new("RGB", (w, h), (255, 255, 255))
    if ortho is not None:
        img = _ortho_background(plan, Path(ortho), (x0, y1), scale, (w, h))
    # ImageDraw replaces RGBA pixels rather than blending: one layer per translucent kind
    img = img.convert("RGBA")
    margins = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    md = ImageDraw.Draw(margins)
    for b in plan.blocks:
        md.rectangle(rect_px(b.extended), fill=(60, 120, 255, 18), outline=(60, 120, 255, 160), width=1)
    img = Image.alpha_composite(img, margins)
    if plan.view_counts is not None:
        tint = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        td = ImageDraw.Draw(tint)
        cells = plan.view_counts.shape[0] // plan.grid.rows
        csx, csy = plan.grid.block_size[0] / cells, plan.grid.block_size[1] / cells
        min_views = int(plan.config.get("coverage_min_views", 1))
        for j, i in zip(*np.nonzero(plan.view_counts < min_views)):
            cx, cy = plan.grid.origin[0] + i * csx, plan.grid.origin[1] + j * csy
            td.rectangle(rect_px((cx, cy, cx + csx, cy + csy)), fill=(255, 0, 0, 70))
        img = Image.alpha_composite(img, tint)
    draw = ImageDraw.Draw(img)
    for b in plan.blocks:
        draw.rectangle(rect_px(b.core), outline=(200, 0, 0) if b.low_coverage else (0, 0, 0), width=2)
        u, v = px(b.core[0], b.core[3])
        if (b.core[2] - b.core[0]) * scale > 60:
            draw.text((float(u) + 4, float(v) + 3), f"{b.id}\n{len(b.images)} img", fill=(0, 0, 0))

    if footprints is not None and len(footprints.names):
        counts: dict[str, int] = {}
        for b in plan.blocks:
            for name in (*b.images, *b.test_images):
                counts[name] = counts.get(name, 0) + 1
        step = max(1, len(footprints.names) // MAX_CAMERA_DOTS)
        r = max(1.0, size_px / 800) * (0.6 if len(footprints.names) > MAX_CAMERA_DOTS else 1.0)
        for k in range(0, len(footprints.names), step):
            color = BLOCK_COUNT_COLORS[min(counts.get(footprints.names[k], 0), len(BLOCK_COUNT_COLORS) - 1)]
            u, v = px(*footprints.positions[k, :2])
            draw.ellipse([float(u) - r, float(v) - r, float(u) + r, float(v) + r], fill=color)
        for n, k in enumerate(_pick_footprints(footprints, n_footprints)):
            color = FOOTPRINT_COLORS[n % len(FOOTPRINT_COLORS)]
            poly = footprints.polygons[k]
            us, vs = px(poly[:, 0], poly[:, 1])
            draw.polygon(list(zip(us.tolist(), vs.tolist())), outline=color, width=3)
            cu, cv = px(*footprints.positions[k, :2])
            mu, mv = px(*poly.mean(axis=0))
            draw.line([float(cu), float(cv), float(mu), float(mv)], fill=color, width=2)
            rr = 3 * r
            draw.ellipse([float(cu) - rr, float(cv) - rr, float(cu) + rr, float(cv) + rr], outline=color, width=2)
    draw.text((6, h - 14), f"{plan.grid.rows}x{plan.grid.cols} blocks of {plan.grid.block_size[0]:.0f} m, "
                           f"margin {plan.margin_m:.0f} m, {plan.n_images} images; north up", fill=(0, 0, 0))
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        img.convert("RGB").save(tmp, format="PNG")
    return path


def _pick_footprints(fp: Footprints, n: int) -> list[int]:
    """Up to ``n`` valid images spread over the survey order, the most oblique first in each stretch."""
    valid = np.flatnonzero(fp.valid)
    if n <= 0 or not len(valid):
        return []
    offset = np.linalg.norm(fp.polygons[valid].mean(axis=1) - fp.positions[valid, :2], axis=1)
    chunks = np.array_split(np.arange(len(valid)), min(n, len(valid)))
    return [int(valid[c[np.argmax(offset[c])]]) for c in chunks if len(c)]


def _ortho_background(plan: TilePlan, path: Path, top_left: tuple[float, float], scale: float,
                      size: tuple[int, int]) -> Image.Image:
    """The orthophoto resampled (nearest) onto the picture's pixels; white outside it."""
    raster = read_geotiff(path)
    if pyproj.CRS.from_user_input(raster.crs) != plan.georef.pyproj_crs:
        raise CitygenError(path, f"orthophoto CRS {raster.crs} differs from the plan's {plan.georef.crs}")
    arr = raster.array
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        lo, hi = np.nanpercentile(arr, [1, 99])
        arr = np.clip((arr - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    w, h = size
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    e = top_left[0] + u / scale + plan.georef.origin[0]
    nth = top_left[1] - v / scale + plan.georef.origin[1]
    inv = ~raster.transform
    col = np.floor(inv.a * e + inv.b * nth + inv.c).astype(np.int64)
    row = np.floor(inv.d * e + inv.e * nth + inv.f).astype(np.int64)
    inside = (col >= 0) & (col < arr.shape[1]) & (row >= 0) & (row < arr.shape[0])
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    out[inside] = arr[row[inside], col[inside]]
    return Image.fromarray(out)
