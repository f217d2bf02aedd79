"""Images on disk and on screen: reading survey images, label maps and depth maps, and writing
renders (8-bit RGB, colourised depth and classes) as PNG.  Shared by training, evaluation and the
tile renderer's views, so it sits below all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from survey_io.atomic import atomic_path
from survey_io.semantics import CLASS_COLORS

from .errors import CitygenError


def _open(path: Path, mode: str, size: tuple[int, int] | None, resample) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode) if mode else im
            if size is not None and im.size != size:
                im = im.resize(size, resample)
            return np.array(im)
    except (OSError, ValueError) as err:
        raise CitygenError(path, f"cannot read image ({err})") from None


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 image, resized (box filter) to ``size`` = (W, H) when given."""
    return _open(path, "RGB", size, Image.BOX)


def load_labels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) uint8 label map (nearest-neighbour resize)."""
    arr = _open(path, "", size, Image.NEAREST)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise CitygenError(path, f"label map must be a single-channel 8-bit image, got {arr.dtype} {arr.shape}")
    return arr


def load_depth(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) float32 z-depth in metres (.npy metres or 16-bit PNG millimetres); 0/inf = unknown."""
    try:
        if path.suffix == ".npy":
            d = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            d = _open(path, "", None, Image.NEAREST).astype(np.float32) / 1000.0
    except (OSError, ValueError) as err:
        raise CitygenError(path, f"cannot read depth map ({err})") from None
    if d.ndim != 2:
        raise CitygenError(path, f"depth map must be 2-D, got shape {d.shape}")
    if size is not None and (d.shape[1], d.shape[0]) != size:
        ys = (np.arange(size[1]) + 0.5) * d.shape[0] / size[1]
        xs = (np.arange(size[0]) + 0.5) * d.shape[1] / size[0]
        d = d[ys.astype(int)[:, None], xs.astype(int)[None, :]]
    d[~np.isfinite(d)] = 0.0
    return d


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
    rgb = _ramp(t, [[252, 253, 191], [252, 137, 97], [183, 55, 121], [81, 18, 124], [0, 0, 4]])
    rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


#: piecewise-linear approximation of matplotlib's "viridis" (low = dark purple, high = yellow)
VIRIDIS_STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _ramp(t: np.ndarray, stops) -> np.ndarray:
    """t in [0, 1] -> colours interpolated linearly between equally spaced ``stops`` (float64)."""
    stops = np.asarray(stops, np.float64)
    pos = np.clip(t, 0, 1) * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    f = (pos - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def viridis(t) -> np.ndarray:
    """t in [0, 1] (clipped; any shape) -> (..., 3) float64 RGB in 0..255 along :data:`VIRIDIS_STOPS`."""
    return _ramp(np.asarray(t, np.float64), VIRIDIS_STOPS)


def colorize_heat(values: np.ndarray, top: float) -> np.ndarray:
    """(H, W) values in [0, ``top``] (clipped) -> (H, W, 3) uint8 viridis; 0 is black (nothing
    there, e.g. no field sample), so that it stands apart from the ramp's low end."""
    rgb = viridis(np.asarray(values, np.float64) / max(top, 1e-12))
    rgb[np.asarray(values) <= 0] = 0
    return rgb.round().astype(np.uint8)


def colorize_labels(labels: np.ndarray, colors=CLASS_COLORS) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 (unknown / ignored ids are black)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    return palette[labels]


__all__ = ["VIRIDIS_STOPS", "colorize_depth", "colorize_heat", "colorize_labels", "load_depth", "load_labels", "load_rgb",
           "rgb_to_uint8", "viridis", "write_png"]
