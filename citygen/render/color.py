"""Colour spaces and colour transforms (torch, differentiable): the one owner, below both edit
(recolor, restyle edits apply them) and style (which fits them), so that edit never imports style.

sRGB values in [0, 1] are the field's output.  CIE Lab (D65) is the decorrelated space the
statistics-based style transfer works in (Reinhard et al. 2001 used lαβ; Lab is the common
modern choice and is what `skimage` uses).  HSV serves the recolor shortcut.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
_EPS = 216.0 / 24389.0
_KAPPA = 24389.0 / 27.0


def srgb_to_linear(c: Tensor) -> Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: Tensor) -> Tensor:
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB (..., 3) in [0, 1] -> CIE Lab (..., 3) (L in [0, 100])."""
    xyz = srgb_to_linear(rgb.clamp(0.0, 1.0)) @ _RGB_TO_XYZ.to(rgb).T / _WHITE.to(rgb)
    f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1.0 / 3.0), (_KAPPA * xyz + 16.0) / 116.0)
    return torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab (..., 3) -> sRGB (..., 3), clamped to [0, 1]."""
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = fy + lab[..., 1] / 500.0
    fz = fy - lab[..., 2] / 200.0
    f = torch.stack([fx, fy, fz], -1)
    xyz = torch.where(f ** 3 > _EPS, f ** 3, (116.0 * f - 16.0) / _KAPPA) * _WHITE.to(lab)
    lin = xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab).T
    return linear_to_srgb(lin.clamp(0.0, 1.0)).clamp(0.0, 1.0)


def to_space(rgb: Tensor, space: str) -> Tensor:
    return rgb_to_lab(rgb) if space == "lab" else rgb


def from_space(c: Tensor, space: str) -> Tensor:
    return lab_to_rgb(c) if space == "lab" else c.clamp(0.0, 1.0)


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """(..., 3) -> hue in [0, 1), saturation, value."""
    r, g, b = rgb.unbind(-1)
    v, _ = rgb.max(-1)
    mn, _ = rgb.min(-1)
    d = v - mn
    s = torch.where(v > 0, d / v.clamp_min(1e-12), torch.zeros_like(v))
    dd = d.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2.0 + (b - r) / dd, 4.0 + (r - g) / dd))
    h = torch.where(d > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], -1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(-1)
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], -1)
    return v[..., None] - v[..., None] * s[..., None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


class ColorTransform:
    """``c -> from_space(M to_space(c) + b)``: an affine map in RGB or Lab."""

    def __init__(self, matrix, offset=(0.0, 0.0, 0.0), space: str = "rgb"):
        if space not in ("rgb", "lab"):
            raise ValueError(f"colour space must be 'rgb' or 'lab', got {space!r}")
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32).reshape(3, 3)
        self.offset = torch.as_tensor(offset, dtype=torch.float32).reshape(3)
        self.space = space

    def __call__(self, rgb: Tensor) -> Tensor:
        c = to_space(rgb, self.space)
        return from_space(c @ self.matrix.to(c).T + self.offset.to(c), self.space)

    def to_dict(self) -> dict:
        return {"space": self.space, "matrix": self.matrix.tolist(), "offset": self.offset.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ColorTransform:
        return cls(d["matrix"], d.get("offset", (0.0, 0.0, 0.0)), d.get("space", "rgb"))


class HsvShift:
    """Rotate hue by ``hue_deg``, scale saturation and value."""

    def __init__(self, hue_deg: float = 0.0, saturation: float = 1.0, value: float = 1.0):
        self.hue, self.sat, self.val = hue_deg / 360.0, saturation, value

    def __call__(self, rgb: Tensor) -> Tensor:
        hsv = rgb_to_hsv(rgb.clamp(0.0, 1.0))
        h = (hsv[..., 0] + self.hue) % 1.0
        s = (hsv[..., 1] * self.sat).clamp(0.0, 1.0)
        v = (hsv[..., 2] * self.val).clamp(0.0, 1.0)
        return hsv_to_rgb(torch.stack([h, s, v], -1))


class TargetColor:
    """Blend towards a target colour, keeping the shading: ``lerp(c, target * L(c) / L(target), strength)``
    with L the Rec.709 luma (so lit roofs and shaded walls stay distinguishable)."""

    def __init__(self, rgb, strength: float = 1.0):
        self.target = torch.as_tensor(rgb, dtype=torch.float32).reshape(3)
        self.strength = float(strength)

    def __call__(self, rgb: Tensor) -> Tensor:
        w = torch.tensor([0.2126, 0.7152, 0.0722]).to(rgb)
        t = self.target.to(rgb)
        shaded = t * ((rgb @ w) / max(float(t @ w), 1e-6))[..., None]
        return torch.lerp(rgb, shaded.clamp(0.0, 1.0), self.strength)


def saturation_matrix(s: float) -> list[list[float]]:
    """RGB matrix scaling saturation about the luma axis (s = 0: grey, 1: identity)."""
    w = [0.2126, 0.7152, 0.0722]
    return [[(1 - s) * w[j] + (s if i == j else 0.0) for j in range(3)] for i in range(3)]


def hue_rotation_matrix(deg: float) -> list[list[float]]:
    """RGB matrix rotating hue about the grey axis by ``deg`` degrees."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    return [[c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
            [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
            [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)]]


__all__ = ["ColorTransform", "HsvShift", "TargetColor", "from_space", "hsv_to_rgb", "hue_rotation_matrix",
           "lab_to_rgb", "linear_to_srgb", "rgb_to_hsv", "rgb_to_lab", "saturation_matrix", "srgb_to_linear",
           "to_space"]
