"""A closed-form city field with the CityField rendering interface: a ground slab with
ground/road stripes and axis-aligned coloured boxes (buildings, vehicles, trees).

It exists so that edits and styles can be checked exactly (tests, examples, docs) without
training: every surface, colour and class is known in closed form.  ``geo`` features carry
the class one-hot and the albedo, so ``color(geo, ...)`` and ``semantics(geo)`` work from
them as the learned field's heads do.  The colour branch is a small learnable linear map
(``color_mlp``, initialised to the identity) so the optimisation-based stylizer has
something to fine-tune, as it fine-tunes ``color_*`` of a :class:`~citygen.fields.CityField`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from survey_io.semantics import CLASSES

from ..fields.occupancy import OccupancyGrid

GROUND, ROAD, BUILDING, VEGETATION, WATER, VEHICLE, OTHER = range(7)


@dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    rgb: tuple[float, float, float]
    label: int


#: The default scene: two buildings, a tree and two vehicles on striped ground (z = 0).
DEFAULT_BOXES = (
    Box((-12.0, -10.0, 0.0), (-4.0, -2.0, 10.0), (0.85, 0.30, 0.25), BUILDING),
    Box((3.0, 2.0, 0.0), (11.0, 12.0, 6.0), (0.25, 0.45, 0.85), BUILDING),
    Box((4.0, -12.0, 0.0), (8.0, -8.0, 3.0), (0.20, 0.70, 0.25), VEGETATION),
    Box((-2.0, 5.0, 0.0), (1.0, 6.6, 1.5), (0.95, 0.90, 0.20), VEHICLE),
    Box((-15.0, 8.0, 0.0), (-12.0, 9.6, 1.5), (0.70, 0.70, 0.75), VEHICLE),
)
GROUND_RGB = (0.55, 0.50, 0.42)
ROAD_RGB = (0.35, 0.35, 0.38)
SKY_RGB = (0.60, 0.75, 0.95)
GEO_DIM = 15


class AnalyticCityField(nn.Module):
    """Ground slab ``z in [-ground_depth, ground_z]`` plus ``boxes``; density ``sigma`` inside.

    Roof (top) faces are lit (albedo), walls 0.7 x albedo, so colours are piecewise constant.
    Empty space has class ``other`` and zero density.
    """

    def __init__(self, boxes=DEFAULT_BOXES, aabb=((-20.0, -20.0, -2.0), (20.0, 20.0, 14.0)), sigma: float = 200.0,
                 ground_z: float = 0.0, stripe: float = 5.0, with_occupancy: bool = False, occupancy_resolution: int = 64):
        super().__init__()
        self.boxes = tuple(boxes)
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32))
        self.sigma_value = float(sigma)
        self.ground_z = float(ground_z)
        self.ground_depth = 1.5
        self.stripe = float(stripe)
        self.n_classes = len(CLASSES)
        self.register_buffer("camera_positions", torch.tensor([[0.0, 0.0, 40.0]]))
        self.appearance = nn.Embedding(1, 4)
        nn.init.zeros_(self.appearance.weight)
        self.color_mlp = nn.Linear(3, 3)
        with torch.no_grad():
            self.color_mlp.weight.copy_(torch.eye(3))
            self.color_mlp.bias.zero_()
        self.register_buffer("background_semantics", torch.zeros(self.n_classes))
        self.occupancy: OccupancyGrid | None = None
        if with_occupancy:
            self.occupancy = self.exact_occupancy(occupancy_resolution)

    def exact_occupancy(self, resolution: int) -> OccupancyGrid:
        """The grid whose occupied cells are exactly those overlapping the ground slab or a box."""
        grid = OccupancyGrid(self.aabb, resolution)
        r = resolution
        cells = torch.arange(r ** 3)
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1).float()
        size = (self.aabb[1] - self.aabb[0]) / r
        lo = self.aabb[0] + ijk * size
        hi = lo + size
        solids = [((float(self.aabb[0, 0]), float(self.aabb[0, 1]), self.ground_z - self.ground_depth),
                   (float(self.aabb[1, 0]), float(self.aabb[1, 1]), self.ground_z))]
        solids += [(b.lo, b.hi) for b in self.boxes]
        occ = torch.zeros(r ** 3, dtype=torch.bool)
        for s_lo, s_hi in solids:
            occ |= ((lo <= torch.tensor(s_hi)) & (hi >= torch.tensor(s_lo))).all(-1)
        grid.occupied.copy_(occ)
        grid.density.copy_(occ.float() * self.sigma_value)
        return grid

    # -- closed-form contents -----------------------------------------------------------------
    def classify(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(inside (N,) bool, label (N,) long, albedo rgb (N, 3)) at positions (N, 3)."""
        dev = x.device
        z = x[:, 2]
        ground = (z <= self.ground_z) & (z >= self.ground_z - self.ground_depth)
        road = torch.remainder(torch.floor(x[:, 0] / self.stripe), 3) == 0
        label = torch.where(ground, torch.where(road, ROAD, GROUND), OTHER)
        rgb = torch.where(road[:, None], torch.tensor(ROAD_RGB, device=dev), torch.tensor(GROUND_RGB, device=dev))
        rgb = rgb * ground[:, None]
        inside = ground
        for b in self.boxes:
            lo, hi = torch.tensor(b.lo, device=dev), torch.tensor(b.hi, device=dev)
            m = ((x >= lo) & (x <= hi)).all(-1)
            # lit roof (within 0.3 m of the top), darker walls
            shade = torch.where(z >= hi[2] - 0.3, 1.0, 0.7)[:, None]
            rgb = torch.where(m[:, None], torch.tensor(b.rgb, device=dev) * shade, rgb)
            label = torch.where(m, b.label, label)
            inside = inside | m
        return inside, label, rgb

    def _geo(self, label: Tensor, rgb: Tensor) -> Tensor:
        onehot = torch.nn.functional.one_hot(label, self.n_classes).float()
        pad = torch.zeros(label.shape[0], GEO_DIM - self.n_classes - 3, device=label.device)
        return torch.cat([onehot, rgb, pad], dim=1)

    # -- the CityField interface -----------------------------------------------------------------
    def density(self, x: Tensor) -> tuple[Tensor, Tensor]:
        inside, label, rgb = self.classify(x)
        return inside.float() * self.sigma_value, self._geo(label, rgb)

    def color(self, geo: Tensor, dirs: Tensor, appearance: Tensor, ray_index: Tensor | None = None) -> Tensor:
        return self.color_mlp(geo[:, self.n_classes:self.n_classes + 3]).clamp(0.0, 1.0)

    def semantics(self, geo: Tensor) -> Tensor:
        return 20.0 * geo[:, :self.n_classes]

    def forward(self, x, dirs, appearance, ray_index=None, with_semantics=True):
        sigma, geo = self.density(x)
        out = {"sigma": sigma, "rgb": self.color(geo, dirs, appearance, ray_index)}
        if with_semantics:
            out["semantics"] = self.semantics(geo)
        return out

    def background(self, dirs: Tensor) -> Tensor:
        return torch.tensor(SKY_RGB, device=dirs.device).expand(dirs.shape[0], 3)

    def appearance_codes(self, image_index: Tensor) -> Tensor:
        return self.appearance(image_index)

    def appearance_for_position(self, camera_position: Tensor) -> Tensor:
        return self.appearance.weight[0]


__all__ = ["DEFAULT_BOXES", "AnalyticCityField", "Box"]
