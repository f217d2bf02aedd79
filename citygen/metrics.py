"""Image metrics: PSNR, SSIM (Gaussian window, Wang et al. 2004), semantic accuracy and mIoU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from survey_io import IGNORE_LABEL


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (inf for identical inputs)."""
    mse = float(torch.mean((pred.double() - target.double()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian (size,), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM of two (H, W, C) or (H, W) images.

    The standard definition: local means, variances and covariance under an 11x11 Gaussian
    window (sigma 1.5), constants ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, averaged over the
    'valid' window positions (no padding) and over channels.
    """
    if pred.ndim == 2:
        pred, target = pred[..., None], target[..., None]
    x = pred.double().permute(2, 0, 1)[:, None]   # (C, 1, H, W)
    y = target.double().permute(2, 0, 1)[:, None]
    g = gaussian_window(window, sigma)
    gx, gy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(img: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(img, gx), gy)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


def confusion_matrix(pred: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """(n_classes, n_classes) counts, rows = ground truth; pixels labelled IGNORE_LABEL are skipped."""
    keep = target != IGNORE_LABEL
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * n_classes + p, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def semantic_scores(conf: Tensor) -> dict[str, float]:
    """Pixel accuracy and mean IoU (over classes present in the ground truth or the prediction)."""
    conf = conf.double()
    total = float(conf.sum())
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"pixel_accuracy": float(tp.sum()) / total if total else math.nan,
            "miou": float(iou.mean()) if present.any() else math.nan}
