"""LPIPS, the learned perceptual image distance (Zhang et al. 2018), "vgg" variant, version 0.1.

For images ``x``, ``y`` in [0, 1]: both go to [-1, 1] (``2 x - 1``), through the fixed scaling
layer ``(v - shift) / scale`` and VGG16's conv trunk; at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 the features are unit-normalised along channels, ``f / (|f| + 1e-10)``, their squared
difference is weighted per channel by the learned non-negative ``lin`` 1x1 convolution,
averaged over the pixels, and the five layers are summed.  This is ``lpips.LPIPS(net="vgg",
version="0.1")(x, y, normalize=True)`` of the ``lpips`` package, in pure torch (no torchvision).

Weights are supplied by path, never downloaded: one safetensors file with

* ``features.<i>.weight`` (c_out, c_in, 3, 3) and ``features.<i>.bias`` (c_out,) for
  ``i`` in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28: torchvision's VGG16 conv layers;
* ``lin<k>.weight`` (1, C_k, 1, 1) for ``k`` = 0..4, ``C`` = 64, 128, 256, 512, 512: the
  ``lpips`` package's ``lin<k>.model.1.weight`` (``weights/v0.1/vgg.pth``);
* header metadata ``format = citygen.lpips``, ``net = vgg``, ``version = 0.1`` and the
  source files' names and SHA-256 (written by ``scripts/convert_lpips_weights.py``).

The same file also serves as VGG16 weights for the style loss (it holds the ``features.*`` keys).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CitygenError
from .vgg16 import RELU, VGG16Features, read_safetensors

#: header metadata of a converted weights file
FORMAT = "citygen.lpips"
NET, VERSION = "vgg", "0.1"
#: VGG16 layers LPIPS compares and their channel counts
TAPS = (RELU["relu1_2"], RELU["relu2_2"], RELU["relu3_3"], RELU["relu4_3"], RELU["relu5_3"])
CHANNELS = (64, 128, 256, 512, 512)
#: the lpips package's ScalingLayer constants (applied to inputs in [-1, 1])
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: feature-norm epsilon of lpips.normalize_tensor
EPS = 1e-10
#: environment variable the command line falls back to when --lpips-weights is not given
ENV_WEIGHTS = "CITYGEN_LPIPS_WEIGHTS"
#: the smallest image side for which relu5_3 (after four 2x2 pools) has a pixel
MIN_SIDE = 16


class LPIPS(nn.Module):
    """The LPIPS (vgg, v0.1) distance with weights from a safetensors file (see the module doc).

    ``LPIPS(path)(x, y)`` with ``x``, ``y`` (B, 3, H, W) RGB in [0, 1] gives the (B,) distances.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        path = Path(weights)
        tensors, meta = read_safetensors(path, "LPIPS weights")
        if meta.get("net", NET) != NET or meta.get("version", VERSION) != VERSION:
            raise CitygenError(path, f"LPIPS weights for net={meta.get('net')!r} version={meta.get('version')!r}; "
                                     f"citygen computes net={NET!r} version={VERSION!r}")
        self.net = VGG16Features(tensors, taps=TAPS, mean=None, std=None, source=path)
        self.lins = nn.ParameterList([nn.Parameter(_lin_weight(tensors, k, c, path), requires_grad=False)
                                      for k, c in enumerate(CHANNELS)])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.weights_path = path
        self.metadata = meta
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distances (B,) of image batches ``x``, ``y`` (B, 3, H, W) in [0, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) batches of one shape, got {tuple(x.shape)}, "
                             f"{tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIDE:
            raise CitygenError(None, f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, "
                                     f"got {x.shape[-1]}x{x.shape[-2]}")
        total = x.new_zeros(x.shape[0])
        for fx, fy, w in zip(self.net(self._scaled(x)), self.net(self._scaled(y)), self.lins):
            d = (_unit(fx) - _unit(fy)) ** 2                        # (B, C, h, w)
            total = total + torch.einsum("bchw,c->bhw", d, w.view(-1)).mean((1, 2))
        return total

    def _scaled(self, img: Tensor) -> Tensor:
        return ((2 * img - 1) - self.shift) / self.scale

    def describe(self) -> dict[str, Any]:
        """What a report records about the metric: the weights file and its provenance."""
        info = {"weights": str(self.weights_path), "net": NET, "version": VERSION}
        info.update({k: v for k, v in self.metadata.items() if k.endswith(("_source", "_sha256"))})
        return info


def _unit(f: Tensor) -> Tensor:
    """Features divided by their norm along channels (lpips.normalize_tensor)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS)


def _lin_weight(tensors: dict[str, Tensor], k: int, channels: int, path: Path) -> Tensor:
    key = f"lin{k}.weight"
    if key not in tensors:
        raise CitygenError(path, f"not an LPIPS weights file: {key!r} is missing "
                                 "(build one with scripts/convert_lpips_weights.py)")
    w = tensors[key]
    if tuple(w.shape) != (1, channels, 1, 1):
        raise CitygenError(path, f"{key} has shape {tuple(w.shape)}, LPIPS-vgg needs {(1, channels, 1, 1)}")
    if not w.is_floating_point() or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise CitygenError(path, f"{key} must hold finite non-negative weights (LPIPS clamps them at 0)")
    return w.float()


def lpips_distance(model: LPIPS, pred: Tensor, target: Tensor) -> float:
    """LPIPS of one (H, W, 3) image against another, both in [0, 1]."""
    device = model.shift.device
    with torch.no_grad():
        x = pred.permute(2, 0, 1)[None].float().to(device)
        y = target.permute(2, 0, 1)[None].float().to(device)
        return float(model(x, y)[0])


def load_lpips(weights: str | Path | LPIPS | None, device: str | torch.device = "cpu") -> LPIPS | None:
    """An :class:`LPIPS` on ``device`` from a weights path (None stays None; a model is moved)."""
    if weights is None:
        return None
    model = weights if isinstance(weights, LPIPS) else LPIPS(weights)
    return model.to(device)


def lpips_report(model: LPIPS | None, mean: dict[str, Any]) -> dict[str, Any]:
    """Report entries on LPIPS: the weights file that scored the views (and the mean), or how to get it."""
    if model is None:
        return {"lpips": None, "lpips_note": f"not computed: pass --lpips-weights FILE (or set {ENV_WEIGHTS}); "
                                             "make FILE with scripts/convert_lpips_weights.py"}
    return {"lpips": {**model.describe(), "mean": mean.get("lpips")}}


def resolve_lpips_weights(weights: str | Path | None) -> Path | None:
    """The weights file to use: ``weights`` when given, else ``$CITYGEN_LPIPS_WEIGHTS`` when set."""
    if weights is not None:
        return Path(weights)
    env = os.environ.get(ENV_WEIGHTS, "").strip()
    return Path(env) if env else None


__all__ = ["CHANNELS", "ENV_WEIGHTS", "FORMAT", "LPIPS", "SCALE", "SHIFT", "TAPS", "load_lpips", "lpips_distance",
           "lpips_report", "resolve_lpips_weights"]
