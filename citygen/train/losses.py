"""Training losses shared by ``citygen train`` (:mod:`citygen.train.trainer`) and the nerfstudio
method (:mod:`citygen.nerfstudio_plugin`): one definition, so both train the same objective."""

from __future__ import annotations

import torch
from torch import Tensor

#: accumulations are clamped this far inside (0, 1) so the entropy's logarithms stay finite.
ENTROPY_CLAMP = 1e-6


def opacity_entropy(acc: Tensor) -> Tensor:
    """Mean binary entropy of the rays' accumulated opacities (unweighted): pushes each ray to be
    fully transparent or fully opaque, which clears the semi-transparent fog that slows marching."""
    a = acc.clamp(ENTROPY_CLAMP, 1 - ENTROPY_CLAMP)
    return -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()


__all__ = ["ENTROPY_CLAMP", "opacity_entropy"]
