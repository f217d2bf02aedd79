"""Occupancy grid (instant-ngp): a coarse density grid over the block that lets ray marching
skip empty space.

Each cell holds an exponential moving maximum of the field's density at random points in
the cell, refreshed every few training steps: a sampled cell becomes
``max(decay * old, sigma(random point in cell))``, and every other cell decays to ``decay * old``.  A cell is occupied when its density
gives an opacity above ``alpha_threshold`` over one marching step, i.e.
``sigma > alpha_threshold / step_size`` (capped by the mean cell density, so that a young,
foggy field is never emptied wholesale).  The grid starts fully occupied, and a cell stays
occupied until it has been sampled once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class OccupancyGrid(nn.Module):
    """A ``resolution``^3 occupancy grid over ``aabb`` (cells are anisotropic if the box is)."""

    def __init__(self, aabb: Tensor, resolution: int = 128):
        super().__init__()
        aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(2, 3)
        self.resolution = int(resolution)
        self.register_buffer("aabb", aabb.clone())
        n = self.resolution ** 3
        # -1 = never sampled: such a cell counts as occupied until its first refresh, which
        # replaces the value outright (no EMA against a made-up prior).
        self.register_buffer("density", torch.full((n,), -1.0, dtype=torch.float32))
        self.register_buffer("occupied", torch.ones(n, dtype=torch.bool))

    @property
    def n_cells(self) -> int:
        return self.resolution ** 3

    def cell_index(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flat cell index of positions (..., 3), and whether each lies inside the box."""
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((u >= 0) & (u <= 1)).all(dim=-1)
        ijk = (u * self.resolution).long().clamp(0, self.resolution - 1)
        r = self.resolution
        return (ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2], inside

    def query(self, x: Tensor) -> Tensor:
        """Whether positions (..., 3) fall in occupied cells (False outside the box)."""
        idx, inside = self.cell_index(x)
        return self.occupied[idx] & inside

    def cell_points(self, cells: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A uniformly random point inside each of the given flat cells (N, 3), metres."""
        r = self.resolution
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1).float()
        jitter = torch.rand(ijk.shape, generator=generator, device=ijk.device)
        u = (ijk + jitter) / r
        return self.aabb[0] + u * (self.aabb[1] - self.aabb[0])

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], step_size: float, alpha_threshold: float = 0.01,
               decay: float = 0.95, n_samples: int | None = None, generator: torch.Generator | None = None,
               chunk: int = 1 << 18) -> None:
        """Refresh the grid from ``density_fn`` (positions (N, 3) -> sigma (N,), 1/metre).

        Args:
            step_size: the marching step (metres); sets the density threshold.
            alpha_threshold: occupied when ``1 - exp(-sigma * step)`` would exceed about this.
            decay: EMA decay of the sampled cells.
            n_samples: refresh this many uniformly random cells plus as many random occupied
                ones; None refreshes every cell.
            generator: random source of the cell choice and the point jitter (reproducible runs).
        """
        device = self.density.device
        if n_samples is None or n_samples >= self.n_cells:
            cells = torch.arange(self.n_cells, device=device)
        else:
            uniform = torch.randint(0, self.n_cells, (n_samples,), generator=generator, device=device)
            occ = self.occupied.nonzero().squeeze(-1)
            if occ.numel():
                pick = torch.randint(0, occ.numel(), (n_samples,), generator=generator, device=device)
                cells = torch.cat([uniform, occ[pick]]).unique()
            else:
                cells = uniform.unique()
        points = self.cell_points(cells, generator)
        sigma = torch.cat([density_fn(points[i:i + chunk]).float() for i in range(0, len(points), chunk)])
        # instant-ngp: every known cell decays at every refresh, sampled or not, so a density
        # the field has since dropped (early fog) fades in a few refreshes instead of waiting
        # for its cell to be drawn again; a sampled cell then takes the max with its new value.
        old = self.density[cells]
        self.density.copy_(torch.where(self.density < 0, self.density, self.density * decay))
        self.density[cells] = torch.where(old < 0, sigma, torch.maximum(self.density[cells], sigma))
        known = self.density >= 0
        mean = float(self.density[known].mean()) if bool(known.any()) else 0.0
        threshold = min(alpha_threshold / step_size, mean)
        self.occupied.copy_((self.density > threshold) | ~known)

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())
