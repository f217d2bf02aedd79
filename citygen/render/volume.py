"""Reference volume renderer (pure torch): occupancy-guided fixed-step marching with early
ray termination, packed field evaluation, and alpha compositing.

Rays are marched in segments of ``segment`` samples at ``t_k = t_near + (k + u) * step``
(``u`` a per-ray jitter in [0, 1) while training, 0.5 otherwise).  In each segment only
samples inside occupied cells are evaluated (packed into one batch), their opacities are
scattered back into a dense (rays, segment) table for the transmittance cumsum, and rays
whose transmittance falls below ``min_transmittance`` (or that left the box) are dropped
before the next segment.  Gradients flow through the transmittance carried across segments.

Quadrature (NeRF): ``alpha_k = 1 - exp(-sigma_k * step)``, ``w_k = T_k * alpha_k`` with
``T_k = exp(-sum_{i<k} sigma_i * step)``; the background fills ``1 - sum w``.
Outputs: ``rgb``; ``acc`` = sum w; ``depth`` = expected z-depth (metres along the camera's
optical axis) of the opaque part, ``sum(w t) / acc * z_scale``; ``semantics`` = volume-weighted
class logits plus ``(1 - acc)`` times the background logits (semantic-NeRF).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from survey_io import Camera

from ..config import RenderConfig
from ..fields.occupancy import OccupancyGrid
from .sampling import camera_rays, intersect_aabb

#: per-sample opacities are clamped this far inside (0, 1) so the entropy's logarithms stay finite
ALPHA_CLAMP = 1e-6
#: the optical depth of one step past which the opacity entropy adds log(tau / TAU_CAP)
TAU_CAP = 1e4


def render_rays(field, origins: Tensor, dirs: Tensor, appearance: Tensor, *, step_size: float,
                occupancy: OccupancyGrid | None = None, z_scale: Tensor | None = None,
                jitter: Tensor | None = None, near: float = 0.0, segment: int = 64,
                min_transmittance: float = 1e-4, with_semantics: bool = True,
                distortion_scale: float | None = None, band: Tensor | None = None,
                alpha_entropy: bool = False) -> dict[str, Tensor]:
    """Volume-render a batch of rays through ``field`` (a :class:`~citygen.fields.CityField`).

    Args:
        origins, dirs: (R, 3) rays, unit directions, local frame metres.
        appearance: (R, A) appearance code per ray (or (A,) shared by all).
        step_size: marching step, metres.
        occupancy: skip samples in empty cells; None evaluates every sample.
        z_scale: (R,) cosine to the optical axis, turning distances into z-depths (None: distances).
        jitter: (R,) sample offsets in [0, 1) (stratified training); None = 0.5 (cell centres).
        near: ignore the first ``near`` metres of each ray.
        segment: samples per marching segment.
        min_transmittance: early termination threshold.
        distortion_scale: when given, also return the mip-NeRF 360 distortion loss per ray,
            with distances along the ray measured in units of ``1 / distortion_scale`` metres.
        band: (R, 2) per-ray interval (t_in, t_out): only the samples with t_in <= t <= t_out are
            evaluated, the others count as empty (the narrow band of :mod:`citygen.render.envelope`;
            the sample positions do not move).
        alpha_entropy: also return ``alpha_entropy`` (R,): ``sum_k T_k H(alpha_k)`` over the
            evaluated samples, ``H`` the binary entropy (:data:`ALPHA_CLAMP`), plus ``T_k`` times
            ``log(tau_k / TAU_CAP)`` where the optical depth ``tau_k`` passes :data:`TAU_CAP`
            (no runaway density).  Zero only when every
            visible sample is empty or opaque: the sharpening fine-tune (:mod:`citygen.train.sharpen`)
            uses it to turn a semi-transparent surface layer, which early termination must march
            through sample by sample, into one opaque step.  Weighted by ``T`` so that samples
            hidden behind the surface are free.

    Returns:
        dict with ``rgb`` (R, 3), ``acc`` (R,), ``depth`` (R,), ``semantics`` (R, C) logits when
        asked, ``distortion`` (R,) when ``distortion_scale`` is given, ``alpha_entropy`` (R,) when
        asked, and ``n_samples`` (scalar
        tensor: field evaluations).

    Distortion (mip-NeRF 360, eq. 15): ``sum_ij w_i w_j |s_i - s_j| + 1/3 sum_i w_i^2 ds`` over the
    ray's samples, ``s`` the scaled distance.  Since samples come in order, the double sum is
    ``2 sum_i w_i (s_i W_<i - S_<i)`` with running sums ``W`` of weights and ``S`` of ``w s``,
    carried across segments, so it costs O(samples).  It pulls each ray's weight into one
    compact surface and so clears the semi-transparent "fog" a young field fills the box with.
    """
    R = origins.shape[0]
    device = origins.device
    if appearance.ndim == 1:
        appearance = appearance.expand(R, -1)
    t_near, t_far, hit = intersect_aabb(origins, dirs, field.aabb, near)
    n_steps = torch.where(hit, ((t_far - t_near) / step_size).ceil().long(), torch.zeros_like(t_far, dtype=torch.long))
    offset = torch.full((R,), 0.5, device=device) if jitter is None else jitter

    C = field.n_classes
    rgb = origins.new_zeros(R, 3)
    depth_sum = origins.new_zeros(R)
    sem = origins.new_zeros(R, C) if with_semantics else None
    log_t = origins.new_zeros(R)          # log transmittance after the samples marched so far
    log_min_t = math.log(min_transmittance) if min_transmittance > 0 else -math.inf
    n_evals = 0
    dist = origins.new_zeros(R) if distortion_scale is not None else None
    w_run = origins.new_zeros(R) if dist is not None else None      # sum of weights so far
    ws_run = origins.new_zeros(R) if dist is not None else None     # sum of weight * s so far
    ent = origins.new_zeros(R) if alpha_entropy else None

    alive = hit.nonzero().squeeze(-1)
    k0 = 0
    steps = torch.arange(segment, device=device, dtype=torch.float32)
    while alive.numel() > 0:
        k = k0 + steps                                                            # (K,)
        t = t_near[alive, None] + (k[None, :] + offset[alive, None]) * step_size  # (A, K)
        valid = k[None, :] < n_steps[alive, None]
        x = origins[alive, None, :] + t[..., None] * dirs[alive, None, :]        # (A, K, 3)
        if occupancy is not None:
            valid = valid & occupancy.query(x)
        if band is not None:
            valid = valid & (t >= band[alive, 0:1]) & (t <= band[alive, 1:2])
        ri, si = valid.nonzero(as_tuple=True)
        if ri.numel() > 0:
            rays = alive[ri]
            out = field(x[ri, si], dirs[alive], appearance[alive], ray_index=ri, with_semantics=with_semantics)
            out = {k: v.float() for k, v in out.items()}  # under autocast the MLPs give bf16
            n_evals += ri.numel()
            tau = x.new_zeros(valid.shape).index_put((ri, si), out["sigma"] * step_size)
            excl = torch.cumsum(tau, dim=1) - tau
            log_t_alive = log_t[alive]
            trans = torch.exp(log_t_alive[:, None] - excl)                         # T before each sample
            w_dense = trans * (1.0 - torch.exp(-tau))
            w = w_dense[ri, si]                                                    # packed weights
            if ent is not None:
                tau_p = tau[ri, si]
                a = (1.0 - torch.exp(-tau_p)).clamp(ALPHA_CLAMP, 1.0 - ALPHA_CLAMP)
                # plus the optical depth past the clamp: there the entropy's gradient is gone and
                # the photometric one, exp(-tau), vanishes but keeps its sign, which Adam turns into
                # full-size steps: log-density then grew linearly (max density 7e4 -> 2e19 in 1500
                # fine-tune steps) until float32 overflowed (the divergence) and sheets of 1e20
                # split the renderers (32.6 dB); this keeps tau near TAU_CAP.  In log(tau): its
                # gradient on the density network's output is then 1, not tau (up to 1e20)
                h = -(a * torch.log(a) + (1.0 - a) * torch.log1p(-a)) \
                    + (torch.log(tau_p.clamp_min(TAU_CAP)) - math.log(TAU_CAP))
                ent = ent.index_add(0, rays, trans[ri, si] * h)
            if dist is not None:
                s_dense = t * distortion_scale
                ws_dense = w_dense * s_dense
                w_before = torch.cumsum(w_dense, dim=1) - w_dense + w_run[alive, None]
                ws_before = torch.cumsum(ws_dense, dim=1) - ws_dense + ws_run[alive, None]
                seg_loss = (2.0 * w_dense * (s_dense * w_before - ws_before)).sum(dim=1) \
                    + (w_dense * w_dense).sum(dim=1) * (step_size * distortion_scale / 3.0)
                dist = dist.index_add(0, alive, seg_loss)
                w_run = w_run.index_add(0, alive, w_dense.sum(dim=1))
                ws_run = ws_run.index_add(0, alive, ws_dense.sum(dim=1))
            rgb = rgb.index_add(0, rays, w[:, None] * out["rgb"])
            depth_sum = depth_sum.index_add(0, rays, w * t[ri, si])
            if with_semantics:
                sem = sem.index_add(0, rays, w[:, None] * out["semantics"])
            log_t = log_t.index_copy(0, alive, log_t_alive - tau.sum(dim=1))
        k0 += segment
        keep = (log_t[alive].detach() > log_min_t) & (n_steps[alive] > k0)
        alive = alive[keep]

    acc = 1.0 - torch.exp(log_t)
    bg = field.background(dirs)
    rgb = rgb + (1.0 - acc)[:, None] * bg
    depth = depth_sum / acc.clamp_min(1e-10)
    if z_scale is not None:
        depth = depth * z_scale
    result = {"rgb": rgb, "acc": acc, "depth": depth, "n_samples": torch.tensor(n_evals)}
    if dist is not None:
        result["distortion"] = dist
    if ent is not None:
        result["alpha_entropy"] = ent
    if with_semantics:
        result["semantics"] = sem + (1.0 - acc)[:, None] * field.background_semantics
    return result


@torch.no_grad()
def render_image(field, camera: Camera, c2w: np.ndarray | Tensor, *, occupancy: OccupancyGrid | str | None = "field",
                 appearance: Tensor | int | None = None, render: RenderConfig | None = None,
                 with_semantics: bool = True) -> dict[str, Tensor]:
    """Render one full image.

    Args:
        field: a :class:`~citygen.fields.CityField`.
        camera, c2w: intrinsics and OpenCV camera-to-world (local frame).
        occupancy: ``"field"`` = the field's own grid (``field.occupancy``), a grid, or None to
            march every sample.
        appearance: a training image index, an explicit code (A,), or None for the
            test-view rule (the code of the nearest training camera).
        render: marching settings (step size, chunking, termination).

    Returns:
        ``rgb`` (H, W, 3) in [0, 1], ``depth`` (H, W) z-depth metres, ``acc`` (H, W), and
        ``semantics`` (H, W, C) logits.
    """
    render = render or RenderConfig()
    if isinstance(occupancy, str):
        occupancy = getattr(field, "occupancy", None)
    device = field.aabb.device
    origins, dirs, z_scale = camera_rays(camera, c2w, device=device)
    if appearance is None:
        code = field.appearance_for_position(origins[0])
    elif isinstance(appearance, int):
        code = field.appearance.weight[appearance]
    else:
        code = appearance.to(device)
    chunks: dict[str, list[Tensor]] = {}
    for i in range(0, origins.shape[0], render.chunk_rays):
        sl = slice(i, i + render.chunk_rays)
        out = render_rays(field, origins[sl], dirs[sl], code, step_size=render.step_size, occupancy=occupancy,
                          z_scale=z_scale[sl], segment=render.segment_samples,
                          min_transmittance=render.min_transmittance, with_semantics=with_semantics)
        for key, value in out.items():
            if key != "n_samples":
                chunks.setdefault(key, []).append(value)
    H, W = camera.height, camera.width
    return {key: torch.cat(v).reshape(H, W, *v[0].shape[1:]) for key, v in chunks.items()}
