"""Error-guided pixel sampling (instant-ngp's "error map").

Each training image gets a coarse grid of cells (``cell`` pixels square) holding a running
mean of the colour error of the rays drawn from it.  A batch takes a fraction of its rays from
cells in proportion to that error (a uniformly random pixel inside the chosen cell) and the
rest uniformly over all pixels, so hard regions -- edges, texture, thin structures -- are
revisited more often while every pixel keeps a non-zero chance.  The loss is not reweighted:
the aim is to spend the step budget where the image is still wrong, not an unbiased estimate
of the uniform loss (instant-ngp does the same).

Cells start at the largest error so that every cell is visited before its estimate is trusted.

Restricted to a subset of the pixels (``pixels``: a tile block trains only the pixels attributed
to it, :mod:`citygen.tile`), both parts draw only from that subset: the uniform part a random
member, the error part a cell holding members (in proportion to its error) and then a random
member of that cell.  The subset is kept once, sorted by cell, as int32 flat indices (4 bytes
per attributed pixel, plus two int64 per cell for where each cell's run starts and its length).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ErrorMap:
    """Per-cell error estimates over a set of images and sampling proportional to them.

    Args:
        sizes: (width, height) of each image, in the order of the flat pixel buffer.
        cell: cell size in pixels.
        decay: weight of the old estimate when a cell is updated (exponential moving average).
        device: where the tables live.
    """

    def __init__(self, sizes: list[tuple[int, int]], cell: int = 8, decay: float = 0.9,
                 device: torch.device | str = "cpu", pixels: Tensor | None = None):
        if cell < 1:
            raise ValueError(f"error map cell must be >= 1 pixel, got {cell}")
        self.cell = int(cell)
        self.decay = float(decay)
        dev = torch.device(device)
        widths = torch.tensor([w for w, _ in sizes], dtype=torch.long)
        heights = torch.tensor([h for _, h in sizes], dtype=torch.long)
        cols = (widths + cell - 1) // cell
        rows = (heights + cell - 1) // cell
        n_cells = cols * rows
        zero = torch.zeros(1, dtype=torch.long)
        self.width, self.height = widths.to(dev), heights.to(dev)
        self.cols = cols.to(dev)
        self.pixel_offsets = torch.cat([zero, (widths * heights).cumsum(0)]).to(dev)
        self.cell_offsets = torch.cat([zero, n_cells.cumsum(0)]).to(dev)
        self.error = torch.ones(int(n_cells.sum()), dtype=torch.float32, device=dev)
        # the image of each cell and its (row, col) within the image, for sampling
        self.cell_image = torch.repeat_interleave(torch.arange(len(sizes)), n_cells).to(dev)
        local = torch.arange(int(n_cells.sum()), device=dev) - self.cell_offsets[self.cell_image]
        self.cell_row = local // self.cols[self.cell_image]
        self.cell_col = local % self.cols[self.cell_image]
        self.pixels = None  # the allowed flat pixel indices, sorted by cell (None: every pixel)
        if pixels is not None:
            pixels = pixels.to(dev, torch.long)
            cells = self.cells_of(pixels)
            order = torch.argsort(cells, stable=True)
            self.pixels = pixels[order].to(torch.int32 if self.n_pixels < 2**31 else torch.long)
            self.cell_count = torch.bincount(cells, minlength=int(n_cells.sum()))
            self.cell_start = torch.cumsum(self.cell_count, 0) - self.cell_count

    @property
    def n_pixels(self) -> int:
        return int(self.pixel_offsets[-1])

    def cells_of(self, idx: Tensor) -> Tensor:
        """The cell of each flat pixel index."""
        image = torch.searchsorted(self.pixel_offsets, idx, right=True) - 1
        local = idx - self.pixel_offsets[image]
        w = self.width[image]
        row, col = local // w, local % w
        return self.cell_offsets[image] + (row // self.cell) * self.cols[image] + col // self.cell

    def sample(self, n: int, fraction: float, generator: torch.Generator | None = None) -> Tensor:
        """``n`` flat pixel indices: ``round(n * fraction)`` by error, the rest uniform."""
        dev = self.error.device
        n_err = int(round(n * fraction))
        if self.pixels is not None:
            return self._sample_allowed(n - n_err, n_err, generator)
        uniform = torch.randint(0, self.n_pixels, (n - n_err,), generator=generator, device=dev)
        if n_err == 0:
            return uniform
        cells = torch.multinomial(self.error, n_err, replacement=True, generator=generator)
        image = self.cell_image[cells]
        w, h = self.width[image], self.height[image]
        r0, c0 = self.cell_row[cells] * self.cell, self.cell_col[cells] * self.cell
        # a uniform pixel of the (possibly clipped) cell at the image's right / bottom edge
        u = torch.rand(n_err, 2, generator=generator, device=dev)
        rows = r0 + (u[:, 0] * (torch.clamp(h - r0, max=self.cell)).float()).long()
        cols = c0 + (u[:, 1] * (torch.clamp(w - c0, max=self.cell)).float()).long()
        return torch.cat([uniform, self.pixel_offsets[image] + rows * w + cols])

    def _sample_allowed(self, n_uniform: int, n_err: int, generator: torch.Generator | None) -> Tensor:
        """:meth:`sample` restricted to ``self.pixels`` (cells without allowed pixels are never drawn)."""
        dev = self.error.device
        pixels = self.pixels
        picks = [torch.randint(0, pixels.numel(), (n_uniform,), generator=generator, device=dev)]
        if n_err:
            weight = torch.where(self.cell_count > 0, self.error, torch.zeros_like(self.error))
            cells = torch.multinomial(weight, n_err, replacement=True, generator=generator)
            u = torch.rand(n_err, generator=generator, device=dev)
            count = self.cell_count[cells]
            picks.append(self.cell_start[cells] + torch.minimum((u * count).long(), count - 1))
        return pixels[torch.cat(picks)].long()

    def update(self, idx: Tensor, error: Tensor) -> None:
        """Blend the per-ray errors of a batch into the estimates of their cells (the mean of
        the batch's rays in a cell is one observation)."""
        cells = self.cells_of(idx)
        n = self.error.numel()
        total = torch.bincount(cells, weights=error.detach().float(), minlength=n)
        count = torch.bincount(cells, minlength=n)
        seen = count > 0
        self.error[seen] = self.decay * self.error[seen] + (1.0 - self.decay) * total[seen] / count[seen]

    def state_dict(self) -> dict[str, Tensor]:
        return {"error": self.error.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["error"].shape != self.error.shape:
            raise ValueError(f"error map has {self.error.numel()} cells, the saved one {state['error'].numel()}")
        self.error.copy_(state["error"])
