"""Colour maps of the display modes, as lookup tables shared by the GL shaders and the numpy
reference implementations (screenshots, headless path renders and tests use the latter).

Depth is shown as normalised disparity through the Turbo colour map: near is red, far is
blue; pixels the field leaves empty (accumulation < 0.5) get :data:`BACKGROUND`.  Classes
are shown with ``survey_io.semantics.CLASS_COLORS``.
"""

from __future__ import annotations

import numpy as np

from survey_io.semantics import CLASS_COLORS

#: colour of empty pixels in the depth and class modes (linear RGB in [0, 1])
BACKGROUND = np.array([0.08, 0.08, 0.10], np.float32)
#: pixels with less accumulated opacity count as empty
EMPTY_ACC = 0.5
LUT_SIZE = 256

# Turbo (Mikhailov 2019), polynomial fit of the published table.
_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def turbo(x: np.ndarray) -> np.ndarray:
    """Turbo colour map of values in [0, 1] -> (..., 3) float32 RGB."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    powers = np.stack([x ** k for k in range(6)], axis=-1)
    rgb = np.stack([powers @ np.asarray(c) for c in (_TURBO_R, _TURBO_G, _TURBO_B)], axis=-1)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


#: (256, 3) float32 table the depth shader samples (linearly) and :func:`colorize_depth` interpolates
TURBO_LUT = turbo(np.linspace(0.0, 1.0, LUT_SIZE))


def class_palette(n: int = LUT_SIZE) -> np.ndarray:
    """(n, 3) float32 class colours: CLASS_COLORS, then a deterministic hash colour for
    classes beyond the default ones (label maps may add classes)."""
    pal = np.zeros((n, 3), np.float32)
    for i in range(n):
        if i < len(CLASS_COLORS):
            pal[i] = np.asarray(CLASS_COLORS[i], np.float32) / 255.0
        else:
            h = (i * 2654435761) & 0xFFFFFF
            pal[i] = np.array([(h >> 16) & 255, (h >> 8) & 255, h & 255], np.float32) / 255.0
    return pal


CLASS_LUT = class_palette()


def depth_range(depth: np.ndarray, acc: np.ndarray | None = None, lo_pct: float = 1.0,
                hi_pct: float = 99.0) -> tuple[float, float]:
    """Robust (near, far) of the valid depths for the colour map (percentiles)."""
    depth = np.asarray(depth, np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    if acc is not None:
        valid &= np.asarray(acc) >= EMPTY_ACC
    if not valid.any():
        return 1.0, 2.0
    near, far = np.percentile(depth[valid], [lo_pct, hi_pct])
    near = max(float(near), 1e-3)
    far = max(float(far), near * 1.001)
    return near, far


def disparity01(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """Depth -> normalised disparity: 1 at ``near``, 0 at ``far`` (clamped)."""
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.maximum(np.asarray(depth, np.float64), 1e-9)
    return np.clip((inv - 1.0 / far) / (1.0 / near - 1.0 / far), 0.0, 1.0)


def lut_lookup(lut: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Linear interpolation of a (L, 3) table at t in [0, 1], texel centres at (i + 0.5) / L
    (what a GL_LINEAR texture sampled at ``(t * (L - 1) + 0.5) / L`` returns)."""
    pos = np.clip(np.asarray(t, np.float64), 0.0, 1.0) * (len(lut) - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, len(lut) - 1)
    w = (pos - i0)[..., None]
    return ((1.0 - w) * lut[i0] + w * lut[i1]).astype(np.float32)


def colorize_depth(depth: np.ndarray, acc: np.ndarray, near: float, far: float) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) float32 RGB, the depth display mode."""
    rgb = lut_lookup(TURBO_LUT, disparity01(depth, near, far))
    empty = (np.asarray(acc) < EMPTY_ACC) | ~(np.asarray(depth) > 0)
    rgb[empty] = BACKGROUND
    return rgb


def class_ids(semantics: np.ndarray) -> np.ndarray:
    """(H, W, C) logits (numpy or torch) -> (H, W) uint8 class ids (argmax)."""
    if hasattr(semantics, "detach"):
        semantics = semantics.detach().argmax(-1).cpu().numpy()
        return semantics.astype(np.uint8)
    return np.asarray(semantics).argmax(-1).astype(np.uint8)


def colorize_classes(ids: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) float32 RGB, the class display mode."""
    rgb = CLASS_LUT[np.asarray(ids, np.int64)].copy()
    rgb[np.asarray(acc) < EMPTY_ACC] = BACKGROUND
    return rgb


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(rgb, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
