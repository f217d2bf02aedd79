"""Per-sample field outputs as the edit pipeline passes them along, and the per-ray context
colours need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rays:
    """View directions and appearance codes: per sample (``ray_index`` None) or per ray."""

    dirs: Tensor
    appearance: Tensor
    ray_index: Tensor | None = None

    def take(self, idx: Tensor) -> Rays:
        """The context of a subset of the samples (indices into the samples)."""
        if self.ray_index is None:
            return Rays(self.dirs[idx], self.appearance[idx])
        return Rays(self.dirs, self.appearance, self.ray_index[idx])

    def sample_dirs(self) -> Tensor:
        return self.dirs if self.ray_index is None else self.dirs[self.ray_index]

    def sample_appearance(self) -> Tensor:
        return self.appearance if self.ray_index is None else self.appearance[self.ray_index]


@dataclass
class Samples:
    """sigma (N,), rgb (N, 3) or None (density-only queries), semantic logits (N, C), and the
    base field's geometry features (N, G) with ``has_geo`` (N,) telling where they are the base
    field's own (the colour-branch restyle needs them)."""

    sigma: Tensor
    rgb: Tensor | None
    logits: Tensor
    geo: Tensor | None = None
    has_geo: Tensor | None = None

    @property
    def labels(self) -> Tensor:
        return self.logits.argmax(-1)

    def take(self, idx: Tensor) -> Samples:
        """The samples at ``idx``."""
        return Samples(self.sigma[idx], None if self.rgb is None else self.rgb[idx], self.logits[idx],
                       None if self.geo is None else self.geo[idx], None if self.has_geo is None else self.has_geo[idx])

    def masked(self, keep: Tensor) -> Samples:
        """Density zeroed where ``keep`` is False (other outputs untouched)."""
        return Samples(torch.where(keep, self.sigma, torch.zeros_like(self.sigma)), self.rgb, self.logits,
                       self.geo, self.has_geo)

    def where(self, cond: Tensor, other: Samples) -> Samples:
        """Self where ``cond``, else ``other``, per sample."""
        c1 = cond[:, None]
        rgb = None if self.rgb is None or other.rgb is None else torch.where(c1, self.rgb, other.rgb)
        geo, has_geo = _pick_geo(cond, self, other)
        return Samples(torch.where(cond, self.sigma, other.sigma), rgb, torch.where(c1, self.logits, other.logits),
                       geo, has_geo)

    def scatter(self, idx: Tensor, part: Samples) -> Samples:
        """A copy with the samples at ``idx`` replaced by ``part``."""
        sigma = self.sigma.index_copy(0, idx, part.sigma.to(self.sigma.dtype))
        rgb = None if self.rgb is None or part.rgb is None else self.rgb.index_copy(0, idx, part.rgb.to(self.rgb.dtype))
        logits = self.logits.index_copy(0, idx, part.logits.to(self.logits.dtype))
        geo, has_geo = self.geo, self.has_geo
        if geo is not None:
            if part.geo is not None:
                geo = geo.index_copy(0, idx, part.geo.to(geo.dtype))
                has_geo = has_geo.index_copy(0, idx, part.has_geo)
            else:
                has_geo = has_geo.index_fill(0, idx, False)
        return Samples(sigma, rgb, logits, geo, has_geo)

    @staticmethod
    def union(a: Samples, b: Samples) -> Samples:
        """Two volumes in the same space: densities add, colours and logits mix by density."""
        sigma = a.sigma + b.sigma
        wa = torch.where(sigma > 0, a.sigma / sigma.clamp_min(1e-20), torch.ones_like(sigma))[:, None]
        rgb = None if a.rgb is None or b.rgb is None else wa * a.rgb + (1 - wa) * b.rgb
        logits = wa * a.logits + (1 - wa) * b.logits
        geo, has_geo = _pick_geo(a.sigma >= b.sigma, a, b)
        return Samples(sigma, rgb, logits, geo, has_geo)


def _pick_geo(cond: Tensor, a: Samples, b: Samples):
    if a.geo is None and b.geo is None:
        return None, None
    ref = a if a.geo is not None else b
    ga = a.geo if a.geo is not None else torch.zeros_like(ref.geo)
    gb = b.geo if b.geo is not None else torch.zeros_like(ref.geo)
    ha = a.has_geo if a.has_geo is not None else torch.zeros_like(cond)
    hb = b.has_geo if b.has_geo is not None else torch.zeros_like(cond)
    return torch.where(cond[:, None], ga, gb), torch.where(cond, ha, hb)


def empty_like(s: Samples) -> Samples:
    return Samples(torch.zeros_like(s.sigma), None if s.rgb is None else torch.zeros_like(s.rgb),
                   torch.zeros_like(s.logits), None if s.geo is None else s.geo,
                   None if s.has_geo is None else torch.zeros_like(s.has_geo))


__all__ = ["Rays", "Samples", "empty_like"]
