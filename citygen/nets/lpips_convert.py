"""Build citygen's LPIPS weights file from the official files a user already has:

* torchvision's VGG16 state dict (``vgg16-397923af.pth``, ImageNet weights): the
  ``features.*`` conv tensors are kept, the classifier is dropped;
* the ``lpips`` package's ``weights/v0.1/vgg.pth``: ``lin<k>.model.1.weight`` -> ``lin<k>.weight``.

Both are read with ``torch.load(weights_only=True)`` (no arbitrary unpickling) and checked
against the VGG16 / LPIPS-vgg architecture; the result is one safetensors file (layout in
:mod:`citygen.nets.lpips`) written atomically, with the sources' names and SHA-256 in its header.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from survey_io.atomic import atomic_path

from ..errors import CitygenError
from .lpips import CHANNELS, FORMAT, LPIPS, NET, TAPS, VERSION
from .vgg16 import vgg16_conv_shapes


def convert_lpips_weights(vgg: str | Path, lin: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``out`` (safetensors) from torchvision's VGG16 ``vgg`` and lpips' v0.1 ``lin`` files.

    Returns the header metadata written (plus ``out`` and the tensor count).
    """
    vgg, lin, out = Path(vgg), Path(lin), Path(out)
    tensors = {**vgg_conv_tensors(_load_state_dict(vgg, "torchvision VGG16 weights"), vgg),
               **lin_tensors(_load_state_dict(lin, "LPIPS lin weights"), lin)}
    meta = {"format": FORMAT, "net": NET, "version": VERSION, "vgg_source": vgg.name, "vgg_sha256": _sha256(vgg),
            "lin_source": lin.name, "lin_sha256": _sha256(lin)}

    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    LPIPS(out)  # read back through the loader: the file is usable
    return {**meta, "out": str(out), "tensors": len(tensors)}


def vgg_conv_tensors(state: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """The conv tensors LPIPS needs (``features.0`` .. ``features.28``) from a torchvision VGG16 state dict."""
    if "features.1.running_mean" in state:
        raise CitygenError(path, "this is VGG16 with batch norm (vgg16_bn); LPIPS uses plain vgg16 "
                                 "(vgg16-397923af.pth)")
    out = {}
    for key, shape in vgg16_conv_shapes(TAPS[-1]).items():
        if key not in state:
            raise CitygenError(path, f"not torchvision's VGG16 state dict: {key!r} is missing")
        out[key] = _checked(state[key], key, shape, path)
    return out


def lin_tensors(state: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """``lin<k>.weight`` from the lpips package's state dict (``lin<k>.model.1.weight``; ``.model.0.``
    when saved without dropout)."""
    out = {}
    for k, c in enumerate(CHANNELS):
        found = [key for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight", f"lin{k}.weight") if key in state]
        if not found:
            raise CitygenError(path, f"not the lpips package's vgg.pth: 'lin{k}.model.1.weight' is missing")
        w = _checked(state[found[0]], found[0], (1, c, 1, 1), path)
        if bool((w < 0).any()):
            raise CitygenError(path, f"{found[0]} has negative weights (LPIPS lin weights are clamped at 0)")
        out[f"lin{k}.weight"] = w
    return out


def _checked(t: Any, key: str, shape: tuple[int, ...], path: Path) -> Tensor:
    if not isinstance(t, Tensor):
        raise CitygenError(path, f"{key} is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != shape:
        raise CitygenError(path, f"{key} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise CitygenError(path, f"{key} is not finite floating-point weights ({t.dtype})")
    return t.detach().to(torch.float32).contiguous()


def _load_state_dict(path: Path, what: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails on bad files with many types (KeyError, RuntimeError, UnpicklingError, ...)
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CitygenError(path, f"{what} unreadable ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CitygenError(path, f"{what}: expected a state dict, got {type(state).__name__}")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["convert_lpips_weights", "lin_tensors", "vgg_conv_tensors"]
