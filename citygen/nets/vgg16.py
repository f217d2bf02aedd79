"""VGG16's convolutional trunk (Simonyan & Zisserman 2015) with user-supplied weights.

The layer numbering and tensor names are torchvision's ``vgg16().features``: conv layers at
indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (``features.<i>.weight`` /
``features.<i>.bias``), a ReLU after each, 2x2 max pools at 4, 9, 16, 23, 30.  The trunk is
built only as deep as its deepest tap, so a file needs only the conv layers up to there.
Weights come from a safetensors file (or already loaded tensors); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..errors import CitygenError

#: (c_in, c_out) of each 3x3 conv, "M" for a 2x2 max pool, in torchvision's order.
VGG16_LAYERS: tuple = ((3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
                       (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512), "M")
#: index in ``features`` of the ReLU after each named conv.
RELU = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the taps of the Gram style loss (Gatys et al.).
STYLE_TAPS = (RELU["relu1_2"], RELU["relu2_2"], RELU["relu3_3"], RELU["relu4_3"])


def vgg16_conv_shapes(last_index: int = 30) -> dict[str, tuple[int, ...]]:
    """``{"features.<i>.weight": shape, "features.<i>.bias": shape}`` of the convs before ``last_index``."""
    shapes, i = {}, 0
    for spec in VGG16_LAYERS:
        if i > last_index:
            break
        if spec == "M":
            i += 1
            continue
        c_in, c_out = spec
        shapes[f"features.{i}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"features.{i}.bias"] = (c_out,)
        i += 2  # conv, relu
    return shapes


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file; a CitygenError naming
    ``path`` when it is missing, truncated or not a safetensors file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise CitygenError(path, f"{what} unreadable ({err})") from None


class VGG16Features(nn.Module):
    """VGG16's ``features`` up to the deepest of ``taps``; returns the activations at ``taps``.

    Args:
        weights: a safetensors file with torchvision's ``features.<i>.{weight,bias}`` tensors
            (the ``features.`` prefix is optional; other tensors are ignored), or such tensors.
        taps: ``features`` indices whose outputs are returned (see :data:`RELU`).
        mean, std: per-channel input normalisation ``(x - mean) / std`` (ImageNet's by
            default, for inputs in [0, 1]); None leaves the input as it is.
        source: the file named in errors when ``weights`` are tensors.
    """

    def __init__(self, weights: str | Path | Mapping[str, Tensor], taps: Sequence[int] = STYLE_TAPS,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 source: str | Path | None = None):
        super().__init__()
        self.taps = tuple(sorted(taps))
        if not self.taps or self.taps[0] < 0 or self.taps[-1] > 30:
            raise ValueError(f"VGG16 taps must be features indices 0..30, got {taps}")
        layers: list[nn.Module] = []
        for spec in VGG16_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(spec[0], spec[1], 3, padding=1), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers[:self.taps[-1] + 1])
        self.normalize = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1))
        if isinstance(weights, Mapping):
            tensors, path = weights, None if source is None else Path(source)
        else:
            path = Path(weights)
            tensors, _ = read_safetensors(path, "feature-network weights")
        self.features.load_state_dict(self._conv_state(tensors, path))
        self.requires_grad_(False)

    def _conv_state(self, tensors: Mapping[str, Tensor], path: Path | None) -> dict[str, Tensor]:
        sd = {}
        for name, p in self.features.state_dict().items():
            for key in (f"features.{name}", name):
                if key in tensors:
                    t = tensors[key]
                    if tuple(t.shape) != tuple(p.shape):
                        raise CitygenError(path, f"{key} has shape {tuple(t.shape)}, VGG16 needs {tuple(p.shape)}")
                    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                        raise CitygenError(path, f"{key} is not finite floating-point weights ({t.dtype})")
                    sd[name] = t.float()
                    break
            else:
                raise CitygenError(path, f"not VGG16 conv weights: {f'features.{name}'!r} is missing "
                                         "(expected torchvision's vgg16 'features.*' keys)")
        return sd

    def forward(self, img: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> the activations at ``taps``, shallowest first."""
        x = (img - self.mean) / self.std if self.normalize else img
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RELU", "STYLE_TAPS", "VGG16Features", "VGG16_LAYERS",
           "read_safetensors", "vgg16_conv_shapes"]
