"""What the viewer shows: rendered frames, display modes, the block-boundary overlay.

A :class:`Frame` is the renderer's output for one view moved to host memory (numpy) in the
shape the display needs: colour, z-depth, accumulation and class ids.  :func:`colorize` is
the numpy reference of every display mode; the GL drawer computes the same colours in its
shaders from the same lookup tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from .colormap import class_ids, colorize_classes, colorize_depth, depth_range, to_uint8


class DisplayMode(str, Enum):
    RGB = "rgb"
    DEPTH = "depth"
    SEMANTICS = "semantics"


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


@dataclass
class Frame:
    """One rendered view in host memory: ``rgb`` (H, W, 3) float32 in [0, 1], ``depth``
    (H, W) z-depth metres, ``acc`` (H, W) accumulated opacity, ``class_ids`` (H, W) uint8
    (argmax of the semantic logits) or None."""

    rgb: np.ndarray
    depth: np.ndarray
    acc: np.ndarray
    class_ids: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.depth.shape

    @classmethod
    def from_render(cls, out: dict) -> Frame:
        """From a renderer's ``render_view`` dict (torch or numpy values).

        GPU note: this copies device tensors to the host; the CUDA-GL interop path (mapping a
        GL pixel buffer into CUDA and writing it from the renderer) replaces it on GPUs.
        """
        rgb = _numpy(out["rgb"]).astype(np.float32)
        depth = _numpy(out["depth"]).astype(np.float32)
        acc = _numpy(out["acc"]).astype(np.float32) if "acc" in out else np.ones_like(depth)
        ids = class_ids(out["semantics"]) if out.get("semantics") is not None else None
        return cls(rgb, depth, acc, ids)

    @classmethod
    def empty(cls, width: int, height: int) -> Frame:
        return cls(np.zeros((height, width, 3), np.float32), np.zeros((height, width), np.float32),
                   np.zeros((height, width), np.float32), np.zeros((height, width), np.uint8))

    def paste_rows(self, row0: int, band: Frame) -> None:
        """Write a band of rows rendered at this frame's resolution."""
        row1 = row0 + band.depth.shape[0]
        self.rgb[row0:row1] = band.rgb
        self.depth[row0:row1] = band.depth
        self.acc[row0:row1] = band.acc
        if self.class_ids is not None and band.class_ids is not None:
            self.class_ids[row0:row1] = band.class_ids

    def resized_nearest(self, width: int, height: int) -> Frame:
        """Nearest-neighbour resize (a coarse pass shown under the next, finer one)."""
        h, w = self.depth.shape
        rows = np.minimum((np.arange(height) + 0.5) * h / height, h - 1).astype(np.int64)
        cols = np.minimum((np.arange(width) + 0.5) * w / width, w - 1).astype(np.int64)
        ix = np.ix_(rows, cols)
        return Frame(self.rgb[ix].copy(), self.depth[ix].copy(), self.acc[ix].copy(),
                     None if self.class_ids is None else self.class_ids[ix].copy())


def colorize(frame: Frame | dict, mode: str | DisplayMode = DisplayMode.RGB,
             near_far: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 image of a frame in a display mode (the numpy reference)."""
    if isinstance(frame, dict):
        frame = Frame.from_render(frame)
    mode = DisplayMode(mode)
    if mode is DisplayMode.RGB:
        return to_uint8(frame.rgb)
    if mode is DisplayMode.DEPTH:
        near, far = near_far or depth_range(frame.depth, frame.acc)
        return to_uint8(colorize_depth(frame.depth, frame.acc, near, far))
    if frame.class_ids is None:
        return to_uint8(frame.rgb * 0.0)
    return to_uint8(colorize_classes(frame.class_ids, frame.acc))


def block_outlines(plan, ground_z: float = 0.0) -> np.ndarray:
    """(4 * n_blocks, 2, 3) line segments of the blocks' core rectangles at height
    ``ground_z`` in the local frame (``plan`` is a :class:`citygen.partition.plan.TilePlan`)."""
    segs = []
    for b in plan.blocks:
        x0, y0, x1, y1 = b.core
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        for k in range(4):
            a, c = corners[k], corners[(k + 1) % 4]
            segs.append([[a[0], a[1], ground_z], [c[0], c[1], ground_z]])
    return np.asarray(segs, np.float64).reshape(-1, 2, 3)


def plan_ground_height(plan, bounds: np.ndarray | None = None) -> float:
    """Height (local z) at which block outlines are drawn: the plan's ground plane height,
    a ground heightfield's fill height (its typical ground) or minimum, else the bottom of
    ``bounds``."""
    ground = getattr(plan, "ground", None) or {}
    if ground.get("kind") == "plane" and ground.get("height") is not None:
        return float(ground["height"])
    if ground.get("kind") == "heightfield":
        for key in ("fill_height", "min"):
            if ground.get(key) is not None:
                return float(ground[key])
    return float(np.asarray(bounds)[0, 2]) if bounds is not None else 0.0
