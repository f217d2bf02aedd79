"""Small 2-D rasters on the ground plane (footprints, ground colour, heights, instances).

A :class:`Raster2D` holds ``values`` (rows, cols, C) over cells of size ``cell`` = (dx, dy)
whose south-west corner is ``origin``; row 0 is the southern row (y grows with the row).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor


class Raster2D:
    def __init__(self, values: Tensor, origin: tuple[float, float], cell: tuple[float, float]):
        self.values = values if values.ndim == 3 else values[..., None]
        self.origin = (float(origin[0]), float(origin[1]))
        self.cell = (float(cell[0]), float(cell[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1]

    def cell_centres(self) -> Tensor:
        """(rows, cols, 2) local xy of the cell centres."""
        rows, cols = self.shape
        y = self.origin[1] + (torch.arange(rows, dtype=torch.float32) + 0.5) * self.cell[1]
        x = self.origin[0] + (torch.arange(cols, dtype=torch.float32) + 0.5) * self.cell[0]
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        return torch.stack([xx, yy], dim=-1)

    def index(self, xy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(row, col, inside) of the cells holding ``xy`` (..., 2); row/col clamped."""
        rows, cols = self.shape
        u = (xy[..., 0] - self.origin[0]) / self.cell[0]
        v = (xy[..., 1] - self.origin[1]) / self.cell[1]
        inside = (u >= 0) & (u < cols) & (v >= 0) & (v < rows)
        return v.floor().long().clamp(0, rows - 1), u.floor().long().clamp(0, cols - 1), inside

    def nearest(self, xy: Tensor) -> Tensor:
        """Value of the cell holding each point (..., C) (the edge cell outside the raster)."""
        r, c, _ = self.index(xy)
        return self.values.to(xy.device)[r, c]

    def bilinear(self, xy: Tensor) -> Tensor:
        """Bilinear interpolation between cell centres (..., C), clamped at the edges."""
        rows, cols = self.shape
        vals = self.values.to(xy.device)
        u = ((xy[..., 0] - self.origin[0]) / self.cell[0] - 0.5).clamp(0, cols - 1)
        v = ((xy[..., 1] - self.origin[1]) / self.cell[1] - 0.5).clamp(0, rows - 1)
        u0 = u.floor().long().clamp(0, max(cols - 2, 0))
        v0 = v.floor().long().clamp(0, max(rows - 2, 0))
        u1, v1 = (u0 + 1).clamp(max=cols - 1), (v0 + 1).clamp(max=rows - 1)
        fu, fv = (u - u0)[..., None], (v - v0)[..., None]
        top = vals[v0, u0] * (1 - fu) + vals[v0, u1] * fu
        bot = vals[v1, u0] * (1 - fu) + vals[v1, u1] * fu
        return top * (1 - fv) + bot * fv


def raster_box(mask: Raster2D) -> Tensor:
    """(2, 3) [lo, hi] over the set cells of a mask raster (z unbounded); lo > hi when none is set."""
    rows, cols = torch.nonzero(mask.values[..., 0] > 0, as_tuple=True)
    if rows.numel() == 0:
        return torch.tensor([[math.inf] * 3, [-math.inf] * 3])
    (x0, y0), (dx, dy) = mask.origin, mask.cell
    return torch.tensor([[x0 + int(cols.min()) * dx, y0 + int(rows.min()) * dy, -math.inf],
                         [x0 + (int(cols.max()) + 1) * dx, y0 + (int(rows.max()) + 1) * dy, math.inf]])


def dilate(mask: Tensor, cells: int = 1) -> Tensor:
    """Binary dilation of a (rows, cols) mask by a (2 cells + 1) square."""
    if cells <= 0:
        return mask
    m = F.max_pool2d(mask[None, None].float(), 2 * cells + 1, stride=1, padding=cells)
    return m[0, 0] > 0


def inpaint(values: Tensor, known: Tensor, blur: int = 1) -> Tensor:
    """Fill unknown cells of ``values`` (rows, cols, C) from the known ones, ring by ring.

    Each pass gives every unknown cell that touches known cells the mean of its known
    3x3 neighbours ("onion peel"); a final box blur of radius ``blur`` (on filled cells
    only) smooths the seams of the rings.  Known cells are returned unchanged.
    """
    vals = values.float().clone()
    k = known.clone()
    if not bool(k.any()):
        return vals
    kernel = torch.ones(1, 1, 3, 3)
    chw = vals.permute(2, 0, 1)[:, None]  # (C, 1, rows, cols)
    while not bool(k.all()):
        kf = k.float()[None, None]
        num = F.conv2d(chw * kf, kernel, padding=1)
        den = F.conv2d(kf, kernel, padding=1)
        ring = (den[0, 0] > 0) & ~k
        if not bool(ring.any()):
            break
        fill = num / den.clamp_min(1e-9)
        chw = torch.where(ring[None, None], fill, chw)
        k = k | ring
    out = chw[:, 0].permute(1, 2, 0)
    if blur > 0:
        size = 2 * blur + 1
        blurred = F.avg_pool2d(out.permute(2, 0, 1)[None], size, stride=1, padding=blur, count_include_pad=False)[0]
        out = torch.where(known[..., None], out, blurred.permute(1, 2, 0))
    return out


def component_at(mask: Tensor, row: int, col: int, search: int = 3) -> Tensor:
    """The 8-connected component of ``mask`` (rows, cols) holding (row, col), or the nearest
    set cell within ``search`` cells of it; all False when there is none."""
    rows, cols = mask.shape
    m = mask.cpu().numpy()
    seed = None
    best = None
    for dr in range(-search, search + 1):
        for dc in range(-search, search + 1):
            r, c = row + dr, col + dc
            if 0 <= r < rows and 0 <= c < cols and m[r, c]:
                d = dr * dr + dc * dc
                if best is None or d < best:
                    best, seed = d, (r, c)
    out = torch.zeros(rows, cols, dtype=torch.bool)
    if seed is None:
        return out
    seen = out.numpy()
    seen[seed] = True
    queue = deque([seed])
    while queue:
        r, c = queue.popleft()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < rows and 0 <= cc < cols and m[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
    return out


__all__ = ["Raster2D", "component_at", "dilate", "inpaint", "raster_box"]
