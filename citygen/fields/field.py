"""The block's radiance + semantics field: hash grid, density MLP, color MLP, semantic head.

Layout (instant-ngp / nerfacto):

    x (metres, local ENU) --AABB--> [0,1]^3 --HashEncoding--> density MLP --> sigma (trunc_exp), geo (15)
    view dir --SH degree 4--> 16          \\
    appearance code (per training image) --+--> color MLP (2 x 64) --> sigmoid RGB
    geo --semantic MLP--> class logits

Positions map to the hash grid's unit cube as ``u = (x - aabb_min) / norm_extent``.  With
``normalization: cube`` (the default) ``norm_extent`` is the AABB's longest side on every
axis, so hash cells are cubes in metres and a flat aerial block occupies a slab of the grid
(tiny-cuda-nn's isotropic HashGrid sees the same coordinates).  ``per_axis`` (older
checkpoints) stretches each axis to [0, 1], which made the short vertical axis ~6x finer than
needed and cost hash capacity.  The AABB is a buffer saved with the weights, so a checkpoint
maps back to metres without outside help.

Appearance codes: one learned ``appearance_dim`` vector per training image
(``nn.Embedding``).  A view that was not trained on (held-out test views, novel camera
paths) uses the code of the **nearest training camera** (by camera centre), see
:meth:`CityField.appearance_for_position` — a fixed rule, so evaluation is reproducible
and uses only training information (the nearest camera was flown at about the same time,
under the same light).

Background: a ray that leaves the AABB without becoming opaque sees a learned,
view-dependent background: a linear map from the degree-2 SH of the ray direction to RGB
(sigmoid), and a learned constant vector of semantic logits.  Aerial views rarely see it,
but oblique views see the horizon beyond the block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import FieldConfig
from ..errors import CitygenError
from .hash_encoding import HashEncoding, HashGridConfig
from .sh import sh_encode


class _TruncExp(torch.autograd.Function):
    """exp with its gradient clamped (instant-ngp): keeps early training from exploding."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(-15.0, 15.0))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


def mlp(d_in: int, d_hidden: int, n_hidden: int, d_out: int) -> nn.Sequential:
    """Plain ReLU MLP with ``n_hidden`` hidden layers of width ``d_hidden``."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(n_hidden):
        layers += [nn.Linear(d, d_hidden), nn.ReLU(inplace=True)]
        d = d_hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def norm_extent(aabb: Tensor, normalization: str) -> Tensor:
    """The (3,) lengths in metres that map to the hash grid's unit interval, per axis."""
    size = (aabb[1] - aabb[0]).float()
    if normalization == "cube":
        return size.max().expand(3).clone()
    if normalization == "per_axis":
        return size.clone()
    raise CitygenError(None, f"field: normalization must be 'cube' or 'per_axis', got {normalization!r}")


def hash_grid_config(cfg: FieldConfig) -> HashGridConfig:
    """The hash-grid config of a field config (max resolution over the block's longest side)."""
    return HashGridConfig.from_max_resolution(
        cfg.max_resolution, n_levels=cfg.n_levels, base_resolution=cfg.base_resolution,
        n_features_per_level=cfg.n_features_per_level, log2_hashmap_size=cfg.log2_hashmap_size)


def gsd_resolutions(cfg: FieldConfig, longest_m: float, gsd_m: float) -> tuple[int, int]:
    """``(base_resolution, max_resolution)`` of ``cfg``, scaled down together so that the finest
    cell over ``longest_m`` (the side the grid's unit interval spans) is at least
    ``cfg.min_cell_gsd`` ground sample distances (``gsd_m``, see
    :func:`citygen.train.data.ground_sample_distance`); never raised, the base at least 2,
    unchanged with ``min_cell_gsd`` 0.  Both ends scale (every level's cells grow by the same
    factor, the levels keep their ratio): lowering the finest level alone measured worse."""
    if cfg.min_cell_gsd <= 0 or gsd_m <= 0 or longest_m <= 0:
        return cfg.base_resolution, cfg.max_resolution
    fit = math.floor(longest_m / (cfg.min_cell_gsd * gsd_m))
    if fit >= cfg.max_resolution:
        return cfg.base_resolution, cfg.max_resolution
    base = max(2, round(cfg.base_resolution * fit / cfg.max_resolution))
    return base, max(base, fit)


class CityField(nn.Module):
    """Density, colour and semantics of one block.

    Args:
        cfg: field hyper-parameters.
        aabb: (2, 3) min/max corners of the block, metres in the local frame.
        n_images: number of training images (appearance codes).
        n_classes: number of semantic classes.
        camera_positions: (n_images, 3) training camera centres (for the test-view appearance rule).
    """

    def __init__(self, cfg: FieldConfig, aabb: Tensor, n_images: int, n_classes: int,
                 camera_positions: Tensor | None = None):
        super().__init__()
        aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(2, 3)
        if not bool(torch.all(aabb[1] > aabb[0])):
            raise CitygenError(None, f"field: AABB max must exceed min on every axis, got {aabb.tolist()}")
        self.cfg = cfg
        self.n_classes = n_classes
        self.register_buffer("aabb", aabb.clone())
        self.norm_extent = norm_extent(aabb, cfg.normalization)
        # Densities are learned per 1/16 of the mean AABB side and converted to 1/metre: the
        # initial density (~e^-1 per unit) gives a ray crossing the block an optical depth of
        # a few units (semi-transparent, as nerfacto's start), whatever the block's size in metres,
        # so the first gradients reach the ground as well as the air above it.
        self.inv_unit_length = 16.0 / float((aabb[1] - aabb[0]).mean())
        if camera_positions is None:
            camera_positions = torch.zeros(max(n_images, 1), 3)
        self.register_buffer("camera_positions", torch.as_tensor(camera_positions, dtype=torch.float32).clone())

        self.encoding = _make_encoding(hash_grid_config(cfg), cfg.backend)
        self.density_mlp = mlp(self.encoding.n_output_dims, cfg.hidden_dim, 1, 1 + cfg.geo_feat_dim)
        self.sh_dim = cfg.sh_degree ** 2
        self.appearance = nn.Embedding(max(n_images, 1), cfg.appearance_dim)
        nn.init.normal_(self.appearance.weight, std=0.01)
        # The color MLP's first layer acts on [geo, SH(dir), appearance]; it is stored as two
        # linear maps whose outputs add (the same function as one layer on the concatenation)
        # so the direction/appearance half can run once per ray instead of once per sample.
        self.color_geo = nn.Linear(cfg.geo_feat_dim, cfg.hidden_dim, bias=False)
        self.color_cond = nn.Linear(self.sh_dim + cfg.appearance_dim, cfg.hidden_dim)
        self.color_mlp = mlp(cfg.hidden_dim, cfg.hidden_dim, cfg.color_hidden_layers - 1, 3)
        self.semantic_mlp = mlp(cfg.geo_feat_dim, cfg.semantic_hidden_dim, 1, n_classes)
        self.background_rgb = nn.Linear(4, 3)          # degree-2 SH of the direction -> RGB logits
        nn.init.zeros_(self.background_rgb.weight)
        nn.init.zeros_(self.background_rgb.bias)
        self.background_semantics = nn.Parameter(torch.zeros(n_classes))
        #: the block's OccupancyGrid (citygen.render), attached by the trainer / loader.
        self.occupancy: nn.Module | None = None

    # -- geometry ---------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        """Metres in the local frame -> the hash grid's [0, 1]^3 (clamped; see the module docstring)."""
        return ((x - self.aabb[0]) / self.norm_extent.to(x)).clamp(0.0, 1.0)

    def density(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Density sigma (N,) in 1/metre and geometry features (N, geo_feat_dim) at positions (N, 3)."""
        h = self.density_mlp(self.encoding(self.normalize(x)))
        sigma = trunc_exp(h[:, 0] - 1.0) * self.inv_unit_length
        return sigma, h[:, 1:]

    def view_conditioning(self, dirs: Tensor, appearance: Tensor) -> Tensor:
        """The direction/appearance half of the color MLP's first layer, (R, hidden)."""
        return self.color_cond(torch.cat([sh_encode(dirs, self.cfg.sh_degree), appearance], dim=-1))

    def color(self, geo: Tensor, dirs: Tensor, appearance: Tensor, ray_index: Tensor | None = None) -> Tensor:
        """RGB in [0, 1] from geometry features (N, G), unit view directions and appearance codes.

        ``dirs`` (R, 3) and ``appearance`` (R, A) are per sample (R = N) when ``ray_index`` is
        None, else per ray with ``ray_index`` (N,) naming each sample's ray.
        """
        cond = self.view_conditioning(dirs, appearance)
        if ray_index is not None:
            cond = cond[ray_index]
        h = torch.relu(self.color_geo(geo) + cond)
        return torch.sigmoid(self.color_mlp(h))

    def semantics(self, geo: Tensor) -> Tensor:
        """Semantic class logits (N, n_classes)."""
        return self.semantic_mlp(geo)

    def forward(self, x: Tensor, dirs: Tensor, appearance: Tensor, ray_index: Tensor | None = None,
                with_semantics: bool = True) -> dict[str, Tensor]:
        """sigma (N,), rgb (N, 3) and (optionally) semantic logits (N, C) at positions x (N, 3).

        ``dirs``/``appearance`` are per sample, or per ray with ``ray_index`` (see :meth:`color`).
        """
        sigma, geo = self.density(x)
        out = {"sigma": sigma, "rgb": self.color(geo, dirs, appearance, ray_index)}
        if with_semantics:
            out["semantics"] = self.semantics(geo)
        return out

    def background(self, dirs: Tensor) -> Tensor:
        """Background RGB (R, 3) seen along unit directions (R, 3)."""
        return torch.sigmoid(self.background_rgb(sh_encode(dirs, 2)))

    # -- appearance --------------------------------------------------------------------------
    def appearance_codes(self, image_index: Tensor) -> Tensor:
        """Codes (R, A) of training images by index."""
        return self.appearance(image_index)

    def appearance_for_position(self, camera_position: Tensor) -> Tensor:
        """The code a novel view uses: the code of the nearest training camera (A,)."""
        d = torch.linalg.norm(self.camera_positions - camera_position.to(self.camera_positions), dim=-1)
        return self.appearance.weight[int(torch.argmin(d))]

    # -- parameter groups ---------------------------------------------------------------------
    def grid_parameters(self) -> list[nn.Parameter]:
        return list(self.encoding.parameters())

    def mlp_parameters(self) -> list[nn.Parameter]:
        grid = {id(p) for p in self.grid_parameters()}
        return [p for p in self.parameters() if id(p) not in grid]


def _make_encoding(cfg: HashGridConfig, backend: str) -> HashEncoding:
    try:
        return HashEncoding(cfg, backend=backend)
    except ImportError:
        # The native extension package is not importable on this machine: the torch
        # reference computes the same function from the same parameters.
        if backend != "auto":
            raise
        return HashEncoding(cfg, backend="torch")


__all__ = ["CityField", "hash_grid_config", "mlp", "norm_extent", "trunc_exp"]
