"""Sample-count reduction of the real-time renderer: a render-time occupancy mip baked from the
trained field, and a render-time early-termination threshold.

Chosen by measurement on the trained demo tile (``citygen demo``: block b_r0_c0, 150 s of CPU
training, 64^3 training grid with cells of ~5.6 x 6.0 x 1.0 m, 0.8 m steps; three survey views
and one fly-through view; CPU build).  With the reference renderer's samples (training grid,
``min_transmittance = 1e-4``) a ray evaluates 12-19 samples.  Sorted by the transmittance T
before each sample: ~1-2.6 lie in occupied cells where the field is empty (opacity < 1e-3,
T > 0.9), ~3-3.6 are faint fog or the first surface sample (T > 0.9), ~5-10 are the surface
itself (0.01 < T <= 0.9: the young field's surfaces are several metres thick), and ~2-3.4 come
after the ray is 99% opaque (they carry ~0.3% of its weight).  Hence:

* **Fine occupancy** (a 2-level mip): each occupied training-grid cell gets a brick of
  ``fx * fy * fz`` fine cells, baked once at pack time from the trained density: a fine cell is
  occupied when the density at any of its 8 corners or its centre gives an opacity of at least
  ``skip_alpha`` over one marching step.  The march jumps empty coarse cells as before and empty
  fine cells inside occupied coarse ones.  Factors are chosen per axis so that a fine cell is no
  shorter than ``fine_cell_steps`` = a quarter step, at most 8 a side (:func:`fine_factors`), and
  while a block's fine bits would pass 8 MiB (dense bricks: R^3 x brick bits) the largest factor
  is halved down to the one-step rule of before (fine cells at least a step long, at most 4 a
  side), so 128^3 and 256^3 grids keep their former bricks.  The demo grid's flat 5.7 x 6.0 x
  1.0 m cells get bricks of 8 x 8 x 4 (8 MiB of fine bits, 17 % of the packed float32 block;
  baking evaluates the density ~660 times per occupied coarse cell, ~15 s per demo block on the
  loaded 2-core box instead of 1.5 s, once per pack).  Session 8 measured why finer cells pay on a *sharpened*
  field (``citygen sharpen``): with the one-step bricks (4 x 4 x 1) 1.6 of a survey view's 2.9
  samples per pixel were evaluated in empty air (opacity < 3e-2) inside occupied fine cells
  before the thin surface; 8 x 8 x 2 (half a step) gives 2.13 -> 1.51 spp and 8 x 8 x 4 gives
  1.42 spp on demo block b_r0_c0, worst 57 dB against the reference (was 53.7), no loss against
  the survey's images.  On the young, unsharpened fields of session 4 the same change mattered
  less (4 x 4 x 4 saved 0.5 of 8 samples per ray): their surfaces are metres thick.
* **Early termination** at ``min_transmittance`` (render time only; training keeps its own).
  The transmittance left at termination goes to the background, as in the reference: handing it
  to the ray's own mean colour instead was measured 1.8 dB worse, so it was dropped.

Measured trade-off (320x180, mean samples per ray over the four views, worst PSNR against the
torch reference renderer at the training settings): reference sampling 15.5 (the kernel
reproduces the reference, > 94 dB); fine 1e-3 + T 1e-4: 14.7 (80 dB); T 1e-2 alone: 12.6
(64 dB); fine 1e-2 + T 5e-2: 9.1 (48 dB); **fine 3e-2 + T 5e-2 (default): 8.2 (44.8 dB)**;
fine 3e-2 + T 1e-1: 7.5 (41 dB); fine 1e-1 + T 5e-2: 6.6 (37.7 dB).  Larger uniform steps were
rejected: 1.2 m instead of 0.8 m gives 6.5 samples but 27 dB.  The default keeps ~10 dB of
margin above the 35 dB parity bar for tiles other than the one it was tuned on.  Against the
survey's ground-truth test images (320x240) the default loses nothing (20.32 / 19.96 dB vs
20.30 / 19.96 dB with the reference's samples); for scale, the reference at 0.4 m steps differs
from itself at 0.8 m by 32-35 dB, and 1.2 m steps cost 0.1-0.3 dB against ground truth.

Error bound of the skipping: each skipped sample has opacity below ``skip_alpha`` at its corners
and centre, so a ray that skips ``k`` samples misses at most ``k * skip_alpha`` of its weight
(for densities that peak between the sampled points, more; the parity tests measure it).

Bit layout (what ``csrc/realtime_math.h`` reads): the coarse bitfield (``R^3`` bits, padded to
32-bit words), then the fine section: coarse cell ``c``'s fine cell ``(a, b, e)`` at bit
``c * B + (a * fy + b) * fz + e`` with ``B = fx * fy * fz`` (<= 64), padded to words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..fields.occupancy import OccupancyGrid

MAX_FACTOR = 8
#: smallest fine cell, in marching steps (module docstring: session 8)
FINE_CELL_STEPS = 0.25
#: fine bits of one block above which bricks finer than a step are coarsened (8 MiB)
FINE_BITS_BUDGET = 2 ** 26


@dataclass(frozen=True)
class RealtimeSampling:
    """Render-time sample reduction (module docstring).

    ``occupancy_factor`` caps the fine cells per coarse cell along each axis (1 = no fine level,
    the training grid alone); ``skip_alpha`` is the opacity over one step below which a fine cell
    counts as empty; ``min_transmittance`` stops a ray (None = the render config's, as in training);
    ``fine_cell_steps``: the smallest fine cell, in steps (:func:`fine_factors`).
    """

    occupancy_factor: int = MAX_FACTOR
    skip_alpha: float = 3e-2
    min_transmittance: float | None = 5e-2
    fine_cell_steps: float = FINE_CELL_STEPS

    @classmethod
    def reference(cls) -> RealtimeSampling:
        """The reference renderer's sampling: training grid only, its termination threshold."""
        return cls(occupancy_factor=1, skip_alpha=0.0, min_transmittance=None)


def fine_factors(grid: OccupancyGrid, step: float, max_factor: int = MAX_FACTOR,
                 min_steps: float = FINE_CELL_STEPS, budget_bits: int = FINE_BITS_BUDGET) -> tuple[int, int, int]:
    """Fine cells per coarse cell along x, y, z: as many as keep a fine cell at least ``min_steps``
    steps long, between 1 and ``max_factor``.  While the block's fine bits (R^3 x brick) pass
    ``budget_bits``, the largest factor is halved, but not below the one-step rule (fine cells at
    least a step long, at most 4 a side: the rule before session 8), so large grids keep their
    former bricks."""
    size = ((grid.aabb[1] - grid.aabb[0]) / grid.resolution).tolist()

    def rule(steps: float, cap: int) -> list[int]:
        return [int(min(max(math.floor(s / (step * steps)), 1), max(cap, 1))) for s in size]

    base = rule(1.0, min(max_factor, 4))
    f = [max(a, b) for a, b in zip(rule(min_steps, max_factor), base)]
    while grid.resolution ** 3 * math.prod(f) > budget_bits and f != base:
        i = max((a for a in range(3) if f[a] > base[a]), key=lambda a: f[a])
        f[i] = max(f[i] // 2, base[i])
    return tuple(f)


@torch.no_grad()
def bake_fine_occupancy(density_fn: Callable[[Tensor], Tensor], grid: OccupancyGrid, factors: tuple[int, int, int],
                        sigma_threshold: float, chunk_points: int = 1 << 17) -> Tensor:
    """Fine occupancy (R^3, fx*fy*fz) bool inside the occupied cells of ``grid``.

    A fine cell is occupied when ``density_fn`` (points (N, 3) -> sigma (N,)) exceeds
    ``sigma_threshold`` at any of its corners or at its centre.  Cells the coarse grid marks
    empty stay empty (the march never looks at their bricks).
    """
    fx, fy, fz = factors
    R = grid.resolution
    B = fx * fy * fz
    device = grid.aabb.device
    lo = grid.aabb[0].float()
    cell = (grid.aabb[1] - grid.aabb[0]).float() / R
    fine = torch.zeros(R ** 3, B, dtype=torch.bool, device=device)
    occupied = grid.occupied.nonzero().squeeze(-1)
    # Sample offsets inside a coarse cell, in units of the coarse cell: the (f + 1)^3 corners of
    # the fine lattice, then the f^3 fine cell centres.
    axes = [torch.arange(f + 1, device=device, dtype=torch.float32) / f for f in factors]
    corners = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    mids = [(torch.arange(f, device=device, dtype=torch.float32) + 0.5) / f for f in factors]
    centres = torch.stack(torch.meshgrid(*mids, indexing="ij"), -1).reshape(-1, 3)
    offsets = torch.cat([corners, centres])
    n_corners = corners.shape[0]
    # Fine cell (a, b, e) <- its 8 corners (a + da, b + db, e + de) in the corner lattice.
    a, b, e = (t.reshape(-1) for t in torch.meshgrid(*[torch.arange(f, device=device) for f in factors],
                                                     indexing="ij"))
    corner_of = torch.stack([((a + da) * (fy + 1) + (b + db)) * (fz + 1) + (e + de)
                             for da in (0, 1) for db in (0, 1) for de in (0, 1)], -1)   # (B, 8)
    # ~128k density evaluations per chunk whatever the brick (8 x 8 x 4 bricks take 661 a cell).
    chunk_cells = max(chunk_points // offsets.shape[0], 1)
    for start in range(0, occupied.numel(), chunk_cells):
        cells = occupied[start:start + chunk_cells]
        ijk = torch.stack([cells // (R * R), (cells // R) % R, cells % R], -1).float()
        x = lo + (ijk[:, None, :] + offsets[None]) * cell                        # (n, P, 3)
        sigma = density_fn(x.reshape(-1, 3)).float().reshape(cells.numel(), -1)
        hot = sigma > sigma_threshold
        corner_hot = hot[:, :n_corners][:, corner_of].any(-1)                   # (n, B)
        fine[cells] = corner_hot | hot[:, n_corners:]
    return fine


def fine_bits(fine: Tensor) -> Tensor:
    """The fine section of the bitfield: flat bits (R^3 * B) packed into int32 words."""
    flat = fine.detach().reshape(-1).cpu().numpy().astype(bool)
    pad = (-flat.size) % 32
    bits = np.packbits(np.concatenate([flat, np.zeros(pad, dtype=bool)]), bitorder="little")
    return torch.from_numpy(bits.view("<u4").astype(np.uint32).view(np.int32).copy())


def sigma_threshold(skip_alpha: float, step: float) -> float:
    """Density whose opacity over one step is ``skip_alpha``."""
    return -math.log1p(-skip_alpha) / step if skip_alpha > 0 else 0.0


def fine_grid_as_occupancy(grid: OccupancyGrid, fine: Tensor, factors: tuple[int, int, int]) -> OccupancyGrid:
    """The 2-level occupancy as one dense :class:`OccupancyGrid` (isotropic factors only): for the
    torch reference renderer in tests, which then evaluates exactly the samples the march does."""
    f = factors[0]
    if any(v != f for v in factors):
        raise ValueError(f"a dense OccupancyGrid needs equal factors, got {factors}")
    R = grid.resolution
    dense = fine.reshape(R, R, R, f, f, f).permute(0, 3, 1, 4, 2, 5).reshape(-1)
    out = OccupancyGrid(grid.aabb, R * f)
    out.occupied.copy_(dense)
    out.density.copy_(dense.float())
    return out


__all__ = ["FINE_BITS_BUDGET", "FINE_CELL_STEPS", "MAX_FACTOR", "RealtimeSampling", "bake_fine_occupancy", "fine_bits", "fine_factors",
           "fine_grid_as_occupancy", "sigma_threshold"]
