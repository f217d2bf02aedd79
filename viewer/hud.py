"""The heads-up display: status text and the class legend, rasterised with Pillow into RGBA
overlays that the GL drawer blends over the frame.

The text is built from plain values (:class:`HudInfo`) so it can be checked without GL;
:func:`hud_overlays` returns the images with their window positions, and the drawer blends
exactly those rectangles (everything outside them is the rendered frame, untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from survey_io import Georef

from .colormap import CLASS_LUT


@dataclass
class HudInfo:
    """Everything the HUD shows (all optional but the camera position)."""

    position_local: np.ndarray
    heading_deg: float
    pitch_deg: float
    georef: Georef | None = None
    fps: float | None = None
    mode: str = "rgb"
    render_scale: int | None = None
    gsd_m: float | None = None
    edit_state: str = ""
    layer: str = ""            # what is on screen: "envelope", "neural (refining k%)", "neural", ...
    lines: list[str] = field(default_factory=list)  # picks, measurements, messages


@dataclass
class Overlay:
    """An RGBA image (H, W, 4) uint8 to blend at window pixel (x, y) (top-left corner)."""

    image: np.ndarray
    x: int
    y: int

    @property
    def rect(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) window pixels covered."""
        return self.x, self.y, self.x + self.image.shape[1], self.y + self.image.shape[0]


@lru_cache(maxsize=4)
def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSansMono.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _crs_label(georef: Georef) -> str:
    epsg = georef.epsg
    return f"EPSG:{epsg}" if epsg else "CRS"


def hud_lines(info: HudInfo) -> list[str]:
    """The HUD's text, one string per line."""
    out = []
    head = f"{info.fps:5.1f} FPS  " if info.fps is not None else ""
    scale = f"  1/{info.render_scale}" if info.render_scale and info.render_scale > 1 else ""
    layer = f"  layer {info.layer}" if info.layer else ""
    out.append(f"{head}mode {info.mode}{scale}{layer}")
    p = np.asarray(info.position_local, np.float64)
    if info.georef is not None:
        e, n, h = info.georef.local_to_crs(p)
        lon, lat, _ = info.georef.local_to_lonlat(p)
        out.append(f"{_crs_label(info.georef)}  E {e:.2f}  N {n:.2f}  H {h:.1f} m")
        out.append(f"lon {lon:.6f}  lat {lat:.6f}")
    else:
        out.append(f"local  x {p[0]:.2f}  y {p[1]:.2f}  z {p[2]:.1f} m")
    out.append(f"heading {info.heading_deg % 360:5.1f} deg  pitch {info.pitch_deg:+5.1f} deg")
    if info.gsd_m is not None:
        out.append(f"GSD under cursor {info.gsd_m * 100:.1f} cm/px")
    if info.edit_state:
        out.append(f"edit: {info.edit_state}")
    out.extend(line for line in info.lines if line)
    return out


def text_panel(lines: list[str], font_size: int = 14, pad: int = 6) -> np.ndarray:
    """White text on a translucent dark panel, RGBA uint8."""
    font = _font(font_size)
    widths = [font.getbbox(s)[2] for s in lines] or [0]
    line_h = font_size + 4
    img = Image.new("RGBA", (max(widths) + 2 * pad, line_h * len(lines) + 2 * pad), (0, 0, 0, 150))
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(lines):
        draw.text((pad, pad + i * line_h), s, font=font, fill=(255, 255, 255, 255))
    return np.asarray(img)


def legend_panel(classes: tuple[str, ...], font_size: int = 14, pad: int = 6) -> np.ndarray:
    """Colour swatches with class names, RGBA uint8."""
    font = _font(font_size)
    line_h = font_size + 4
    sw = font_size
    width = max(font.getbbox(c)[2] for c in classes) + sw + 3 * pad
    img = Image.new("RGBA", (width, line_h * len(classes) + 2 * pad), (0, 0, 0, 150))
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(classes):
        y = pad + i * line_h
        color = tuple(round(float(c) * 255) for c in CLASS_LUT[i]) + (255,)
        draw.rectangle([pad, y + 1, pad + sw, y + sw], fill=color)
        draw.text((2 * pad + sw, y), name, font=font, fill=(255, 255, 255, 255))
    return np.asarray(img)


def hud_overlays(info: HudInfo, window: tuple[int, int], classes: tuple[str, ...] = (),
                 legend: bool = False, margin: int = 8) -> list[Overlay]:
    """The HUD panels placed in a window of size (width, height): status top-left, the class
    legend bottom-left (in the class display mode).  Panels are clipped to the window."""
    width, height = window
    overlays = [Overlay(text_panel(hud_lines(info)), margin, margin)]
    if legend and classes:
        img = legend_panel(classes)
        overlays.append(Overlay(img, margin, max(0, height - img.shape[0] - margin)))
    clipped = []
    for o in overlays:
        w = max(0, min(o.image.shape[1], width - o.x))
        h = max(0, min(o.image.shape[0], height - o.y))
        if w and h:
            clipped.append(Overlay(np.ascontiguousarray(o.image[:h, :w]), o.x, o.y))
    return clipped
