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


def sparse_depth_loss(depth: Tensor, target: Tensor, weight: Tensor, unit: float) -> Tensor:
    """Weighted mean absolute z-depth error of rays through SfM keypoints, in units of ``unit``
    metres (the block's height, like the dense depth loss): ``sum w |d - t| / (unit sum w)``.

    DS-NeRF supervises such rays with a KL term on the ray's termination distribution and
    depth-nerfacto offers it beside an L1/URF variant; on the rendered expected depth the L1 is
    one line, needs no per-sample weights out of the renderer, and (with the distortion loss
    keeping each ray's weight on one surface) gave the sharper DSM on caliterra (see drone.yaml).
    """
    return (weight * (depth - target).abs()).sum() / (weight.sum().clamp_min(1e-12) * unit)


def ground_opacity_loss(acc: Tensor) -> Tensor:
    """Mean transparency ``1 - acc`` of the rays: in an aerial survey every ray ends on the ground.

    Without it the field's learned background (a colour per view direction) paints uniform ground
    seen from above, and the DSM/orthophoto (straight-down rays, nodata below opacity 0.5) is holed
    where it does (caliterra: two thirds of the ground two cameras see; see drone.yaml).
    """
    return (1.0 - acc).mean()


__all__ = ["ENTROPY_CLAMP", "ground_opacity_loss", "opacity_entropy", "sparse_depth_loss"]
