"""Multiresolution hash-grid encoding (tiny-cuda-nn ``HashGrid``), three backends, one layout.

The encoding maps positions ``x`` in ``[0, 1]^3`` to ``n_levels * n_features_per_level``
features.  Three backends compute the same function from the same flat parameter vector:

* ``torch``    -- the pure-torch reference below (:func:`hash_grid_encode_torch`); readable,
  differentiable by autograd, runs anywhere.
* ``cuda_ext`` -- the native kernels in :mod:`cuda_ext.hashgrid` (a CPU/OpenMP build for CPU
  tensors, a CUDA build for CUDA tensors), JIT-compiled on first use.
* ``tcnn``     -- ``tinycudann.Encoding`` when tiny-cuda-nn is installed (CUDA only).

Parameter layout (the checkpoint contract; identical to tiny-cuda-nn's ``GridEncodingTemplated``
with ``otype=HashGrid``, 3 input dims, linear interpolation):

* ``params`` is one flat float32 vector.  It is level-major: level ``l`` owns the entries
  ``[offset[l], offset[l+1])`` and each entry is ``n_features_per_level`` consecutive floats, so
  feature ``f`` of entry ``e`` of level ``l`` is ``params[(offset[l] + e) * F + f]``.
* Level scale (float32 arithmetic, as tcnn): ``scale_l = exp2(l * log2(per_level_scale)) *
  base_resolution - 1`` and ``resolution_l = ceil(scale_l) + 1``.
* Entries of level ``l``: ``size_l = min(next_multiple(resolution_l**3, 8), 2**log2_hashmap_size)``
  (``resolution**3`` is capped at ``2**31 - 1`` first, as tcnn does), ``offset[0] = 0``,
  ``offset[l+1] = offset[l] + size_l``; ``n_params = offset[L] * F``.

Lookup of level ``l`` for a point ``x`` (all integer arithmetic is uint32 with wrap-around):

* ``pos = fma(scale_l, x, 0.5)`` per axis (the +0.5 staggers the levels), ``cell = floor(pos)``,
  ``w = pos - cell`` (the trilinear weights).
* Corner ``c`` (bits 0, 1, 2 of ``c`` select +1 on x, y, z) has grid coordinate ``g = cell + bit``
  and weight ``prod_d (w_d if bit_d else 1 - w_d)``.
* Index: dense ``g_x + g_y * R + g_z * R**2`` when ``R**3 <= size_l`` (R = resolution_l), else the
  spatial hash ``g_x * 1 ^ g_y * 2654435761 ^ g_z * 805459861``; either way taken modulo
  ``size_l``.  (The dense index can exceed ``R**3`` at the upper border because of the +0.5 offset;
  tcnn wraps it with the same modulo and so do we.)
* Output: ``y[n, l*F + f] = sum_c weight_c * params[(offset[l] + index_c) * F + f]`` (level-major,
  tcnn order).

Gradients: every backend differentiates w.r.t. ``params`` and ``x``; the torch reference also
supports double backward, ``cuda_ext`` is first-order only.  The tcnn backend follows tcnn.

Initialization is uniform in ``[-init_scale, init_scale]`` (tcnn uses 1e-4).  Inputs are expected
in ``[0, 1]^3``; outside that range the result follows the same uint32 arithmetic as tcnn, which
is well defined but rarely meaningful.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import cuda_ext
from cuda_ext.hashgrid import hashgrid_encode

from ..errors import CitygenError

# tiny-cuda-nn's hashing primes for the first three dimensions.
HASH_PRIMES = (1, 2654435761, 805459861)
_UINT32_MASK = 0xFFFFFFFF
_MAX_DENSE_PARAMS = (2**32 - 1) // 2  # tcnn caps resolution**3 at uint32 max / 2
BACKENDS = ("auto", "torch", "cuda_ext", "tcnn")


@dataclass
class HashGridConfig:
    """Hyper-parameters of a tiny-cuda-nn ``HashGrid`` encoding of 3-D positions."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378

    def __post_init__(self) -> None:
        if not 1 <= self.n_levels <= 32:
            raise CitygenError(None, f"hash grid: n_levels must be in 1..32, got {self.n_levels}")
        if self.n_features_per_level not in (1, 2, 4, 8):
            raise CitygenError(None, "hash grid: n_features_per_level must be 1, 2, 4 or 8, "
                                     f"got {self.n_features_per_level}")
        if not 1 <= self.log2_hashmap_size <= 30:
            raise CitygenError(None, "hash grid: log2_hashmap_size must be in 1..30, "
                                     f"got {self.log2_hashmap_size}")
        if self.base_resolution < 1:
            raise CitygenError(None, f"hash grid: base_resolution must be >= 1, got {self.base_resolution}")
        if not (self.per_level_scale >= 1.0 and math.isfinite(self.per_level_scale)):
            raise CitygenError(None, f"hash grid: per_level_scale must be >= 1, got {self.per_level_scale}")

    @classmethod
    def from_max_resolution(cls, max_resolution: float, n_levels: int = 16, base_resolution: int = 16,
                            **kwargs: Any) -> HashGridConfig:
        """The config whose finest level has ``max_resolution`` (geometric growth from the base)."""
        if n_levels < 2:
            return cls(n_levels=n_levels, base_resolution=base_resolution, per_level_scale=1.0, **kwargs)
        if max_resolution < base_resolution:
            raise CitygenError(None, f"hash grid: max_resolution {max_resolution} < base_resolution "
                                     f"{base_resolution}")
        scale = math.exp(math.log(max_resolution / base_resolution) / (n_levels - 1))
        return cls(n_levels=n_levels, base_resolution=base_resolution, per_level_scale=scale, **kwargs)

    def to_tcnn(self) -> dict:
        """The tiny-cuda-nn encoding config (JSON field names)."""
        return {"otype": "HashGrid", **asdict(self)}

    @classmethod
    def from_tcnn(cls, d: dict) -> HashGridConfig:
        """Read a tiny-cuda-nn ``HashGrid``/``Grid`` config (missing fields get tcnn's defaults)."""
        otype = d.get("otype", "HashGrid")
        grid_type = d.get("type", "Hash")
        if otype.lower() not in ("hashgrid", "grid") or grid_type.lower() != "hash":
            raise CitygenError(None, f"hash grid: not a hash-grid config (otype={otype!r}, type={grid_type!r})")
        if d.get("interpolation", "Linear").lower() != "linear":
            raise CitygenError(None, f"hash grid: only linear interpolation is supported, got "
                                     f"{d['interpolation']!r}")
        return cls(n_levels=int(d.get("n_levels", 16)),
                   n_features_per_level=int(d.get("n_features_per_level", 2)),
                   log2_hashmap_size=int(d.get("log2_hashmap_size", 19)),
                   base_resolution=int(d.get("base_resolution", 16)),
                   per_level_scale=float(d.get("per_level_scale", 2.0)))


@dataclass(frozen=True)
class GridLevel:
    """Where one level lives in ``params`` and how it maps positions to vertices."""

    scale: float       # float32 value: x * scale + 0.5 is the position in vertex units
    resolution: int    # vertices per axis of the (virtual) dense grid
    offset: int        # first entry of the level (multiply by F for the float offset)
    size: int          # number of entries (the modulo of the index)

    @property
    def dense(self) -> bool:
        """True where the whole grid fits the table: indexing by strides, not hashing."""
        return self.resolution**3 <= self.size


def level_scale(level: int, per_level_scale: float, base_resolution: int) -> np.float32:
    """tcnn's ``exp2f(level * log2f(per_level_scale)) * base_resolution - 1`` in float32.

    ``log2f`` and ``exp2f`` are taken as correctly rounded (float64 evaluation rounded to float32,
    as glibc does); CUDA's device ``exp2f`` may differ by an ulp, which moves outputs by ~1e-7.
    """
    log2_scale = np.float32(math.log2(float(np.float32(per_level_scale))))
    grown = np.float32(2.0 ** float(np.float32(level) * log2_scale))
    return np.float32(grown * np.float32(base_resolution) - np.float32(1.0))


def grid_levels(config: HashGridConfig) -> list[GridLevel]:
    """The per-level layout of ``config`` (tiny-cuda-nn's offset table)."""
    levels = []
    offset = 0
    table_size = 1 << config.log2_hashmap_size
    for level in range(config.n_levels):
        scale = level_scale(level, config.per_level_scale, config.base_resolution)
        resolution = int(np.ceil(scale)) + 1
        dense_size = min(resolution**3, _MAX_DENSE_PARAMS)
        size = min(-(-dense_size // 8) * 8, table_size)
        levels.append(GridLevel(float(scale), resolution, offset, size))
        offset += size
    return levels


def n_params(config: HashGridConfig) -> int:
    """Length of the flat parameter vector."""
    last = grid_levels(config)[-1]
    return (last.offset + last.size) * config.n_features_per_level


def hash_grid_encode_torch(x: Tensor, params: Tensor, levels: list[GridLevel], n_features: int) -> Tensor:
    """Reference hash-grid encoding, vectorized over points, levels and the 8 corners.

    Args:
        x: (N, 3) positions, nominally in [0, 1]^3.
        params: flat float32 parameters in the layout of the module docstring.
        levels: :func:`grid_levels` of the config.
        n_features: features per level.

    Returns:
        (N, len(levels) * n_features) float32, level-major.  Differentiable w.r.t. ``params``
        and ``x`` by autograd.
    """
    device = x.device
    n_levels = len(levels)
    scale = torch.tensor([lv.scale for lv in levels], dtype=torch.float64, device=device)
    resolution = torch.tensor([lv.resolution for lv in levels], dtype=torch.int64, device=device)
    offset = torch.tensor([lv.offset for lv in levels], dtype=torch.int64, device=device)
    size = torch.tensor([lv.size for lv in levels], dtype=torch.int64, device=device)
    dense = torch.tensor([lv.dense for lv in levels], dtype=torch.bool, device=device)

    # fma(scale, x, 0.5) rounded once to float32: the float64 product of two float32 values is
    # exact, so only the final rounding remains (as in the CUDA kernel's fmaf).
    pos = (x.double()[:, None, :] * scale[None, :, None] + 0.5).float()  # (N, L, 3)
    cell_f = torch.floor(pos)
    frac = pos - cell_f                                                  # exact in float32
    cell = cell_f.long()                                                 # (N, L, 3)

    # Per axis d and bit b (0: the cell's vertex, 1: the next one): the vertex coordinate, its
    # trilinear weight factor and its term of the dense index / of the hash.
    bit = torch.tensor([0, 1], device=device)
    vertex = (cell[..., None] + bit) & _UINT32_MASK                      # (N, L, 3, 2) as uint32
    factor = torch.stack([1.0 - frac, frac], dim=-1)                     # (N, L, 3, 2)
    res = resolution[:, None]
    stride = torch.cat([torch.ones_like(res), res, res * res], dim=1)    # (L, 3): 1, R, R^2
    prime = torch.tensor(HASH_PRIMES, device=device)
    dense_term = vertex * stride[None, :, :, None]
    hash_term = (vertex * prime[:, None]) & _UINT32_MASK

    # Corner c = bx + 2 by + 4 bz (tcnn's order: bit d of c selects +1 on axis d), combined in
    # tcnn's order (x, then y, then z) so that float products round the same way.
    def corners(term: Tensor, op) -> Tensor:
        x_, y_, z_ = term[:, :, 0, None, None, :], term[:, :, 1, None, :, None], term[:, :, 2, :, None, None]
        return op(op(x_, y_), z_).flatten(-3)                            # (N, L, 8)

    weight = corners(factor, torch.mul)
    dense_index = corners(dense_term, torch.add) & _UINT32_MASK
    hashed = corners(hash_term, torch.bitwise_xor)
    index = torch.where(dense[None, :, None], dense_index, hashed) % size[None, :, None]
    rows = offset[None, :, None] + index                                # (N, L, 8)

    features = params.view(-1, n_features)[rows]                         # (N, L, 8, F)
    out = (weight[..., None] * features).sum(dim=2)                      # (N, L, F)
    return out.reshape(x.shape[0], n_levels * n_features)


class HashEncoding(torch.nn.Module):
    """tiny-cuda-nn ``HashGrid`` encoding of (N, 3) positions in [0, 1]^3.

    Args:
        config: grid hyper-parameters.
        backend: ``"torch"`` (reference), ``"cuda_ext"`` (native kernels, CPU or CUDA by the
            input's device), ``"tcnn"`` (tiny-cuda-nn, CUDA only) or ``"auto"`` (``cuda_ext``
            where it builds on this machine, else ``torch``).
        init_scale: parameters start uniform in ``[-init_scale, init_scale]``.

    Attributes:
        accumulate_grad_in_place: with the ``cuda_ext`` backend, backward adds the parameter
            gradient straight into ``params.grad`` (see ``cuda_ext.hashgrid``) instead of returning
            one table-sized tensor per call.  Off by default because ``torch.autograd.grad``
            then cannot see that gradient; the trainer turns it on.
    """

    def __init__(self, config: HashGridConfig, backend: str = "auto", init_scale: float = 1e-4):
        super().__init__()
        if backend not in BACKENDS:
            raise CitygenError(None, f"hash grid: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
        self.config = config
        self.levels = grid_levels(config)
        self.n_output_dims = config.n_levels * config.n_features_per_level
        params = torch.empty(n_params(config), dtype=torch.float32).uniform_(-init_scale, init_scale)
        self.params = torch.nn.Parameter(params)
        # Level table for the native kernels; moves with .to(device), not saved in state_dict.
        self.register_buffer("level_offsets", torch.tensor(
            [lv.offset for lv in self.levels] + [self.levels[-1].offset + self.levels[-1].size],
            dtype=torch.int32), persistent=False)
        self.register_buffer("level_scales", torch.tensor([lv.scale for lv in self.levels],
                                                          dtype=torch.float32), persistent=False)
        self._tcnn: list = []  # the tcnn module, kept out of the registry (it shares `params`)
        self.accumulate_grad_in_place = False
        self._auto = backend == "auto"
        self.backend = self._resolve_backend(backend)

    def _resolve_backend(self, backend: str) -> str:
        if backend == "auto":
            return "cuda_ext" if cuda_ext.cpu_available() or cuda_ext.cuda_available() else "torch"
        if backend == "cuda_ext":
            if not (cuda_ext.cpu_available() or cuda_ext.cuda_available()):
                raise CitygenError(None, "hash grid: backend 'cuda_ext' is not available: "
                                         + cuda_ext.unavailable_reason())
        if backend == "tcnn":
            try:
                import tinycudann  # noqa: F401
            except ImportError as err:
                raise CitygenError(None, "hash grid: backend 'tcnn' needs tiny-cuda-nn (the `tinycudann` "
                                         f"Python package, built from source on a CUDA machine): {err}") from None
        return backend

    def forward(self, x: Tensor) -> Tensor:
        """Encode (N, 3) positions in [0, 1]^3 into (N, n_output_dims) float32 features."""
        if x.ndim != 2 or x.shape[1] != 3:
            raise CitygenError(None, f"hash grid: expected positions of shape (N, 3), got {tuple(x.shape)}")
        x = x.float()
        backend = self.backend
        if backend == "cuda_ext":
            if not (cuda_ext.cuda_available() if x.is_cuda else cuda_ext.cpu_available()):
                kind = "CUDA" if x.is_cuda else "CPU"
                if not self._auto:
                    raise CitygenError(None, f"hash grid: backend 'cuda_ext' has no {kind} build here: "
                                             + cuda_ext.unavailable_reason())
                backend = "torch"  # "auto": e.g. a GPU without the CUDA build
        if backend == "torch":
            return hash_grid_encode_torch(x, self.params, self.levels, self.config.n_features_per_level)
        if backend == "cuda_ext":
            return hashgrid_encode(x, self.params, self.level_offsets, self.level_scales,
                                   self.config.n_features_per_level, self.accumulate_grad_in_place)
        return self._forward_tcnn(x)

    def _forward_tcnn(self, x: Tensor) -> Tensor:
        import tinycudann as tcnn

        if not x.is_cuda:
            raise CitygenError(None, "hash grid: backend 'tcnn' runs on CUDA tensors only")
        if not self._tcnn:
            module = tcnn.Encoding(3, self.config.to_tcnn(), dtype=torch.float32).to(x.device)
            if module.params.numel() != self.params.numel():
                raise CitygenError(None, f"hash grid: tcnn expects {module.params.numel()} parameters, "
                                         f"the citygen layout has {self.params.numel()}")
            self._tcnn.append(module)
        module = self._tcnn[0]
        module.params = self.params  # one Parameter, shared: tcnn reads it in the same layout
        return module(x).float()

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, n_params={self.params.numel()}, config={self.config}"
