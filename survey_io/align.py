"""Robust similarity transform (scale, rotation, translation) between two point sets.

Used to georegister a structure-from-motion model: its camera centres (arbitrary frame and
scale) are mapped onto the cameras' GPS positions in the local ENU frame.

GPS is noisy, sometimes wrong (multipath, a stale fix), and its altitude is often much
worse than its horizontal position.  So:

* the hypothesis is chosen by random sampling of 3-point Umeyama fits, scored by least
  median of squares (no threshold needed, up to 50% outliers) or, with a threshold, by
  MSAC;
* residuals are measured with the vertical axis down-weighted (``vertical_weight``);
* inliers are then refined by Gauss-Newton on the weighted residuals, optionally with a
  weak term pulling camera viewing directions towards prior directions (gimbal or nadir),
  which fixes the roll about the flight line when the cameras lie on one line, where
  positions alone leave it free.

Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ x + translation``."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, np.eye(3), np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points of shape (..., 3)."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def apply_to_c2w(self, c2w: np.ndarray) -> np.ndarray:
        """Transform a camera-to-world 4x4: rotate the axes, map the centre (scale does not touch axes)."""
        out = np.eye(4)
        out[:3, :3] = self.rotation @ np.asarray(c2w)[:3, :3]
        out[:3, 3] = self.apply(np.asarray(c2w)[:3, 3])
        return out

    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "rotation": self.rotation.tolist(), "translation": self.translation.tolist()}


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None,
            with_scale: bool = True) -> Similarity:
    """Weighted least-squares similarity mapping ``src`` onto ``dst`` (Umeyama 1991).

    Args:
        src, dst: (N, 3) corresponding points, N >= 3 (N >= 2 gives a valid but not unique rotation).
        weights: optional non-negative per-point weights.
        with_scale: estimate the scale (else 1).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var_s = float(w @ np.sum(xs**2, axis=1))
    scale = float(np.trace(np.diag(S) @ D) / var_s) if with_scale and var_s > 0 else 1.0
    return Similarity(scale, R, mu_d - scale * R @ mu_s)


def _skew(v: np.ndarray) -> np.ndarray:
    """Cross-product matrices of vectors (..., 3) -> (..., 3, 3)."""
    z = np.zeros(v.shape[:-1])
    return np.stack([np.stack([z, -v[..., 2], v[..., 1]], -1),
                     np.stack([v[..., 2], z, -v[..., 0]], -1),
                     np.stack([-v[..., 1], v[..., 0], z], -1)], -2)


def _so3_exp(w: np.ndarray) -> np.ndarray:
    theta = float(np.linalg.norm(w))
    K = _skew(w)
    if theta < 1e-12:
        return np.eye(3) + K
    return np.eye(3) + np.sin(theta) / theta * K + (1 - np.cos(theta)) / theta**2 * K @ K


@dataclass
class AlignmentResult:
    """A fitted similarity and how well it maps source onto target.

    Attributes:
        transform: the similarity (source frame -> target frame).
        residuals: (N, 3) ``target - transform(source)``, metres in the target frame.
        inliers: (N,) bool, the points the final fit used.
        threshold: inlier threshold on the weighted residual (given, or from the data).
    """

    transform: Similarity
    residuals: np.ndarray
    inliers: np.ndarray
    threshold: float

    @property
    def horizontal(self) -> np.ndarray:
        return np.linalg.norm(self.residuals[:, :2], axis=1)

    @property
    def vertical(self) -> np.ndarray:
        return np.abs(self.residuals[:, 2])

    def stats(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """RMSE / median / max of the horizontal, vertical and 3D residuals (metres).

        Args:
            mask: the points to summarise (bool (N,)); all of them when None.
        """
        keep = np.ones(len(self.residuals), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)

        def summary(r: np.ndarray) -> dict[str, float]:
            r = r[keep]
            return {"rmse": float(np.sqrt(np.mean(r**2))), "median": float(np.median(r)), "max": float(np.max(r))}

        return {"horizontal": summary(self.horizontal), "vertical": summary(self.vertical),
                "3d": summary(np.linalg.norm(self.residuals, axis=1)),
                "num_inliers": int(self.inliers[keep].sum()), "num_points": int(keep.sum()),
                "threshold": float(self.threshold)}


def _weighted_norm(residuals: np.ndarray, vertical_weight: float) -> np.ndarray:
    r = residuals * np.array([1.0, 1.0, vertical_weight])
    return np.linalg.norm(r, axis=1)


def _refine(sim: Similarity, src, dst, vertical_weight, src_dirs, dst_dirs, direction_weight,
            iterations: int = 20) -> Similarity:
    """Gauss-Newton on scale (log), rotation (left increment) and translation."""
    W = np.array([1.0, 1.0, vertical_weight])
    use_dirs = src_dirs is not None and direction_weight > 0
    s, R, t = sim.scale, sim.rotation, sim.translation
    for _ in range(iterations):
        p = s * src @ R.T  # rotated and scaled source, (N, 3)
        r_pos = ((p + t - dst) * W).reshape(-1)
        J_pos = np.zeros((len(src), 3, 7))
        J_pos[:, :, 0] = p
        J_pos[:, :, 1:4] = -_skew(p)
        J_pos[:, :, 4:7] = np.eye(3)
        J_pos *= W[None, :, None]
        J, r = J_pos.reshape(-1, 7), r_pos
        if use_dirs:
            q = src_dirs @ R.T
            r_dir = (direction_weight * (q - dst_dirs)).reshape(-1)
            J_dir = np.zeros((len(q), 3, 7))
            J_dir[:, :, 1:4] = -direction_weight * _skew(q)
            J, r = np.vstack([J, J_dir.reshape(-1, 7)]), np.concatenate([r, r_dir])
        delta, *_ = np.linalg.lstsq(J, -r, rcond=None)
        s = s * float(np.exp(delta[0]))
        R = _so3_exp(delta[1:4]) @ R
        t = t + delta[4:7]
        if np.linalg.norm(delta) < 1e-12:
            break
    U, _, Vt = np.linalg.svd(R)  # re-orthonormalise
    return Similarity(s, U @ Vt, t)


def _fix_roll_about_line(sim: Similarity, src, dst, src_dirs, dst_dirs) -> Similarity:
    """For (nearly) collinear cameras: turn about the line so viewing directions match best (closed form)."""
    centre = dst.mean(axis=0)
    _, _, Vt = np.linalg.svd(dst - centre)
    a = Vt[0]
    p = src_dirs @ sim.rotation.T
    v = dst_dirs
    p_perp = p - np.outer(p @ a, a)
    alpha = np.arctan2(np.sum(v * np.cross(a, p)), np.sum(v * p_perp))
    R_a = _so3_exp(alpha * a)
    # x -> R_a (s R x + t - c) + c: positions on the line do not move.
    return Similarity(sim.scale, R_a @ sim.rotation, R_a @ (sim.translation - centre) + centre)


def align_similarity(src: np.ndarray, dst: np.ndarray, *, vertical_weight: float = 1.0,
                     threshold: float | None = None, iterations: int = 1000, seed: int = 0,
                     src_dirs: np.ndarray | None = None, dst_dirs: np.ndarray | None = None,
                     direction_weight: float = 0.0) -> AlignmentResult:
    """Robustly fit ``dst ≈ s R src + t``.

    Args:
        src, dst: (N, 3) corresponding points (N >= 3), e.g. SfM camera centres and GPS positions.
        vertical_weight: weight of the z residual relative to x/y (e.g. 0.1 for drifting GPS altitude).
        threshold: inlier threshold on the weighted residual, in ``dst`` units; None picks
            ``max(2.5 * 1.4826 * median, tiny)`` of the least-median-of-squares fit.
        iterations: random 3-point samples.
        seed: seed of the sampler; the result is deterministic for a seed.
        src_dirs, dst_dirs: optional (N, 3) unit viewing directions (source frame / target frame)
            that the rotation should roughly map onto each other.
        direction_weight: cost of a 1-radian direction error, in ``dst`` units (0 ignores directions).

    Returns:
        The fit, per-point residuals on all points, and the inlier mask.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"src and dst must both be (N, 3), got {src.shape} and {dst.shape}")
    n = len(src)
    if n < 3:
        raise ValueError(f"need at least 3 correspondences, got {n}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise ValueError("src and dst must be finite")
    has_dirs = src_dirs is not None and dst_dirs is not None
    if has_dirs:
        src_dirs = np.asarray(src_dirs, dtype=np.float64)
        dst_dirs = np.asarray(dst_dirs, dtype=np.float64)
    spread = float(np.sqrt(np.mean(np.sum((dst - dst.mean(0)) ** 2, axis=1)))) or 1.0
    floor = 1e-6 * spread

    # 1. hypothesis: best of random minimal samples (all triples when there are few).
    rng = np.random.default_rng(seed)
    if n <= 12:
        samples = np.array(list(combinations(range(n), 3)))
    else:
        samples = np.array([rng.choice(n, 3, replace=False) for _ in range(iterations)])
    best, best_cost = None, np.inf
    for idx in samples:
        if np.ptp(src[idx], axis=0).max() == 0:  # all three at one point: no scale
            continue
        sim = umeyama(src[idx], dst[idx])
        if not np.isfinite(sim.scale) or sim.scale <= 0:
            continue
        r = _weighted_norm(dst - sim.apply(src), vertical_weight)
        cost = float(np.median(r**2)) if threshold is None else float(np.sum(np.minimum(r**2, threshold**2)))
        if cost < best_cost:
            best, best_cost = sim, cost
    if best is None:
        best = umeyama(src, dst)
        best_cost = float(np.median(_weighted_norm(dst - best.apply(src), vertical_weight) ** 2))

    th = threshold if threshold is not None else max(2.5 * 1.4826 * float(np.sqrt(best_cost)), floor)
    inliers = _weighted_norm(dst - best.apply(src), vertical_weight) <= th
    if inliers.sum() < 3:
        inliers = np.ones(n, dtype=bool)

    # 2. collinear cameras leave the roll about their line free: take it from the directions.
    if has_dirs:
        sv = np.linalg.svd(dst[inliers] - dst[inliers].mean(0), compute_uv=False)
        if sv[1] < 0.05 * sv[0]:
            best = _fix_roll_about_line(best, src[inliers], dst[inliers], src_dirs[inliers], dst_dirs[inliers])

    # 3. refine on the inliers, re-select inliers, refine again.
    sim = best
    for _ in range(3):
        sim = _refine(sim, src[inliers], dst[inliers], vertical_weight,
                      src_dirs[inliers] if has_dirs else None, dst_dirs[inliers] if has_dirs else None,
                      direction_weight if has_dirs else 0.0)
        r = _weighted_norm(dst - sim.apply(src), vertical_weight)
        if threshold is None:
            th = max(2.5 * 1.4826 * float(np.median(r)), floor)
        new = r <= th
        if new.sum() < 3 or np.array_equal(new, inliers):
            break
        inliers = new
    return AlignmentResult(transform=sim, residuals=dst - sim.apply(src), inliers=inliers, threshold=float(th))
