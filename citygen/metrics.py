"""Image metrics: PSNR, SSIM (Gaussian window, Wang et al. 2004), semantic accuracy and mIoU; rendered
depth against a survey's held-out SfM points (:class:`HeldoutPointScore`, one scorer for a block's
evaluation, a tile's rendered views and the DSM check)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from survey_io import IGNORE_LABEL, Survey, SurveyError
from survey_io.ingest import HELDOUT_POINTS_FILE  # ingest owns the name of the held-out tenth


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




def point_depth_errors(depth: np.ndarray, camera, c2w: np.ndarray, xyz: np.ndarray, obs_xy: np.ndarray,
                       downscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rendered minus point z-depth at each observation, and the GSD there (metres).

    Args:
        depth: (H, W) rendered z-depth of the (downscaled) camera.
        camera: the rendered camera (its ``fl_x`` gives the GSD).
        c2w: camera-to-world 4x4 (OpenCV axes).
        xyz: (N, 3) points in the world frame; obs_xy: (N, 2) their pixel positions at full
            resolution (COLMAP convention: the first pixel's centre is at 0.5, 0.5).
        downscale: full resolution / rendered resolution.

    Observations outside the image or behind the camera are dropped.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    z = (np.asarray(xyz, dtype=np.float64) - c2w[:3, 3]) @ c2w[:3, 2]
    col = np.floor(np.asarray(obs_xy)[:, 0] / downscale).astype(np.int64)
    row = np.floor(np.asarray(obs_xy)[:, 1] / downscale).astype(np.int64)
    h, w = depth.shape
    ok = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    err = depth[row[ok], col[ok]].astype(np.float64) - z[ok]
    return err, z[ok] / float(camera.fl_x)


def summarize_point_errors(err: np.ndarray, gsd: np.ndarray) -> dict[str, Any] | None:
    """Median |error|, RMSE (metres) and the share within 2 GSD; None without observations."""
    if len(err) == 0:
        return None
    a = np.abs(err)
    return {"num_observations": int(len(a)), "median_abs_m": float(np.median(a)),
            "rmse_m": float(np.sqrt(np.mean(a**2))), "share_within_2gsd": float(np.mean(a <= 2 * gsd))}


def load_heldout_points(survey: Survey) -> dict[str, Any] | None:
    path = Path(survey.root) / HELDOUT_POINTS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in ("xyz", "image_names", "obs_point", "obs_image", "obs_xy")}
    except (OSError, ValueError, KeyError) as err:
        raise SurveyError(path, f"not a held-out points file ({err})") from None
    return data


#: what a report says instead of point figures when the survey has no held-out points file.
NO_HELDOUT_POINTS = "no held-out points (survey has no SfM points)"
#: ... and when it has one but no held-out point is observed in the scored views.
NO_POINT_IN_VIEWS = "no held-out point observed in the scored views"


class HeldoutPointScore:
    """Rendered depth against the survey's held-out SfM points, accumulated view by view: the one
    scorer behind ``citygen train``'s evaluation (:func:`citygen.train.evaluate.evaluate`) and the composited tile's
    (:func:`citygen.render.tile_views.render_tile_views`)."""

    def __init__(self, survey: Survey):
        self.points = load_heldout_points(survey)
        self._err: list[np.ndarray] = []
        self._gsd: list[np.ndarray] = []

    def add(self, image_name: str, depth: np.ndarray, camera, c2w: np.ndarray, downscale: float = 1.0) -> None:
        """Score one rendered view's (H, W) z-depth (``camera``: the rendered, downscaled camera)."""
        if self.points is None:
            return
        k = np.flatnonzero(self.points["image_names"] == Path(image_name).name)
        if not len(k):
            return
        sel = self.points["obs_image"] == k[0]
        err, gsd = point_depth_errors(depth, camera, c2w, self.points["xyz"][self.points["obs_point"][sel]],
                                      self.points["obs_xy"][sel], float(downscale))
        self._err.append(err)
        self._gsd.append(gsd)

    def report(self) -> dict[str, Any] | str:
        """:func:`summarize_point_errors` over every view scored, or a sentence saying why there are
        no figures (a report that reads ``null`` would not say whether the points were missing)."""
        if self.points is None:
            return NO_HELDOUT_POINTS
        if self._err:
            summary = summarize_point_errors(np.concatenate(self._err), np.concatenate(self._gsd))
            if summary is not None:
                return summary
        return NO_POINT_IN_VIEWS
