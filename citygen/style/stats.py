"""Statistics-based style transfer: per-class colour distribution matching.

The scene's colours are sampled from the field itself (:func:`scene_colors`: top-down and
oblique parallel rays over the block, rendered with the reference renderer, labelled by the
rendered semantics), the reference's from the image (and its label map when given).  For
each class, an affine map in a decorrelated space (CIE Lab by default) takes the scene's
colour mean and covariance to the reference's:

``mk``        the Monge-Kantorovich linear map (Pitie & Kokaram 2007), the optimal transport
              between two Gaussians: ``A = S^-1/2 (S^1/2 R S^1/2)^1/2 S^-1/2``, ``b = mu_r - A mu_s``
              (matches the full covariance);
``reinhard``  per-channel mean and standard deviation (Reinhard et al. 2001), axis-aligned.

The maps go into a ``restyle`` edit and are applied per sample in the field, by the
sample's class: the same 3-D point has the same stylized colour from every view.
Without a reference label map, one map from the scene's joint statistics over the selected
classes to the reference image's global statistics is used for all selected classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from survey_io.semantics import CLASSES

from ..errors import CitygenError
from ..render.color import ColorTransform, to_space
from ..render.volume import render_rays

#: fewer samples than this and a class's statistics are not trusted (joint fallback).
MIN_SAMPLES = 50
#: the largest colour gain a transfer may apply along a direction (see match_statistics).
MAX_GAIN = 50.0


def color_stats(colors: Tensor, space: str = "lab") -> tuple[Tensor, Tensor]:
    """Mean (3,) and covariance (3, 3) of sRGB colours (N, 3) in ``space`` (float64)."""
    c = to_space(colors.double().clamp(0, 1), space) if space == "lab" else colors.double()
    mean = c.mean(0)
    d = c - mean
    return mean, d.T @ d / max(c.shape[0] - 1, 1)


def _sqrtm(m: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def mk_map(src_mean, src_cov, ref_mean, ref_cov, eps: float = 1e-6, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """The Monge-Kantorovich affine map between two Gaussians: (A (3, 3), b (3,)).

    ``floor`` is a lower bound on the source's variances (eigenvalues): a nearly flat source
    (one colour) would otherwise need an unbounded gain along its thin directions.
    """
    scale = float(torch.trace(src_cov)) / 3 + 1e-12
    w, v = torch.linalg.eigh((src_cov + src_cov.T) / 2)
    s = (v * w.clamp_min(max(floor, eps * scale))) @ v.T
    s_half = _sqrtm(s)
    s_inv_half = torch.linalg.inv(s_half)
    a = s_inv_half @ _sqrtm(s_half @ ref_cov @ s_half) @ s_inv_half
    return a, ref_mean - a @ src_mean


def reinhard_map(src_mean, src_cov, ref_mean, ref_cov, eps: float = 1e-9, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std matching: (diagonal A, b)."""
    a = torch.diag(ref_cov.diagonal().clamp_min(0).sqrt() / src_cov.diagonal().clamp_min(max(eps, floor)).sqrt())
    return a, ref_mean - a @ src_mean


def match_statistics(src_colors: Tensor, src_labels: Tensor, ref_colors: Tensor, ref_labels: Tensor | None = None,
                     classes: list[int] | None = None, method: str = "mk", space: str = "lab",
                     class_names: tuple[str, ...] = CLASSES) -> dict[str, ColorTransform]:
    """Per-class colour transforms taking the scene's statistics to the reference's.

    Args:
        src_colors, src_labels: scene colours (N, 3) in [0, 1] and their classes (N,).
        ref_colors, ref_labels: reference colours (M, 3) and (optionally) classes (M,).
        classes: class ids to restyle (None: every class seen in the scene).
        method: "mk" (full covariance) or "reinhard" (per channel).
        space: "lab" or "rgb".

    Returns:
        class name -> transform (only classes with enough scene samples).
    """
    if method not in ("mk", "reinhard"):
        raise CitygenError(None, f"style method must be 'mk' or 'reinhard', got {method!r}")
    def fit(src_mean, src_cov, ref_mean, ref_cov):
        # Source variances are floored at the reference's mean variance / MAX_GAIN^2, so a flat
        # class (one colour) never gets a gain above ~MAX_GAIN along its thin directions.
        floor = float(torch.trace(ref_cov)) / 3 / MAX_GAIN ** 2
        return (mk_map if method == "mk" else reinhard_map)(src_mean, src_cov, ref_mean, ref_cov, floor=floor)
    if classes is None:
        classes = sorted(int(c) for c in torch.unique(src_labels))
    if ref_colors.shape[0] < MIN_SAMPLES:
        raise CitygenError(None, f"the reference has only {ref_colors.shape[0]} usable pixels")
    selected = torch.isin(src_labels, torch.tensor(classes, dtype=src_labels.dtype))
    if int(selected.sum()) < MIN_SAMPLES:
        raise CitygenError(None, "the scene shows too little of the selected classes to measure their colours")
    joint = fit(*color_stats(src_colors[selected], space), *color_stats(ref_colors, space))
    out = {}
    for c in classes:
        src = src_colors[src_labels == c]
        if src.shape[0] < MIN_SAMPLES:
            continue
        if ref_labels is not None and int((ref_labels == c).sum()) >= MIN_SAMPLES:
            a, b = fit(*color_stats(src, space), *color_stats(ref_colors[ref_labels == c], space))
        else:
            a, b = joint
        out[class_names[c]] = ColorTransform(a.float(), b.float(), space)
    return out


def look_down_rays(aabb: Tensor, n: int = 64, tilt_deg: float = 0.0, azimuth_deg: float = 0.0) -> tuple[Tensor, Tensor]:
    """Parallel rays (n*n) over the box, tilted ``tilt_deg`` from the nadir towards ``azimuth_deg``."""
    lo, hi = aabb[0].float(), aabb[1].float()
    t, a = math.radians(tilt_deg), math.radians(azimuth_deg)
    d = torch.tensor([math.sin(t) * math.cos(a), math.sin(t) * math.sin(a), -math.cos(t)], device=aabb.device)
    u = (torch.arange(n, device=aabb.device) + 0.5) / n
    gy, gx = torch.meshgrid(u, u, indexing="ij")
    top = hi[2] + 1.0
    # start above the box, shifted back along the tilt so the rays cover the box's footprint
    shift = (top - lo[2]) * math.tan(t) * 0.5
    x = lo[0] + gx * (hi[0] - lo[0]) - shift * math.cos(a)
    y = lo[1] + gy * (hi[1] - lo[1]) - shift * math.sin(a)
    origins = torch.stack([x, y, torch.full_like(x, float(top))], -1).reshape(-1, 3)
    return origins, d.expand_as(origins).contiguous()


@torch.no_grad()
def scene_colors(field, n: int = 64, step_size: float | None = None, tilts=(0.0, 45.0), azimuths=(0.0, 90.0, 180.0, 270.0),
                 min_acc: float = 0.9) -> tuple[Tensor, Tensor]:
    """Colours (N, 3) and classes (N,) of the scene's visible surfaces, from parallel views.

    The views are a nadir grid and ``tilts`` x ``azimuths`` obliques (facades); rays that do not
    become opaque (``acc < min_acc``) are dropped.
    """

    aabb = field.aabb
    if step_size is None:
        step_size = float((aabb[1] - aabb[0]).max()) / 256
    code = field.appearance.weight.detach().mean(0) if hasattr(field, "appearance") else torch.zeros(0)
    colors, labels = [], []
    views = [(0.0, 0.0)] + [(t, a) for t in tilts if t > 0 for a in azimuths]
    for tilt, az in views:
        o, d = look_down_rays(aabb, n, tilt, az)
        out = render_rays(field, o, d, code.to(aabb.device), step_size=step_size,
                          occupancy=getattr(field, "occupancy", None))
        keep = out["acc"] >= min_acc
        colors.append(out["rgb"][keep].float().cpu())
        labels.append(out["semantics"][keep].argmax(-1).cpu())
    return torch.cat(colors), torch.cat(labels)


def load_reference(image_path, labels_path=None, max_pixels: int = 65536) -> tuple[Tensor, Tensor | None]:
    """Reference colours (M, 3) in [0, 1] and, with a label map (uint8 class ids, 255 = none),
    their classes; subsampled to at most ``max_pixels``."""

    try:
        with Image.open(image_path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise CitygenError(image_path, f"reference image unreadable ({err})") from None
    lab = None
    if labels_path is not None:
        try:
            with Image.open(labels_path) as im:
                lab = np.asarray(im)
        except (OSError, UnidentifiedImageError) as err:
            raise CitygenError(labels_path, f"reference label map unreadable ({err})") from None
        if lab.ndim != 2 or lab.shape != rgb.shape[:2]:
            raise CitygenError(labels_path, f"label map must be a single-channel image of the reference's size "
                                            f"{rgb.shape[1]}x{rgb.shape[0]}, got shape {lab.shape}")
    colors = torch.from_numpy(rgb.reshape(-1, 3))
    labels = None if lab is None else torch.from_numpy(lab.reshape(-1).astype(np.int64))
    if labels is not None:
        keep = labels != 255
        colors, labels = colors[keep], labels[keep]
    if colors.shape[0] > max_pixels:
        idx = torch.randperm(colors.shape[0], generator=torch.Generator().manual_seed(0))[:max_pixels]
        colors = colors[idx]
        labels = None if labels is None else labels[idx]
    return colors, labels


__all__ = ["color_stats", "load_reference", "look_down_rays", "match_statistics", "mk_map", "reinhard_map",
           "scene_colors"]
