"""How big and how long: per-block sizing of a plan, before renting GPUs.

Everything here is arithmetic on the plan and the training config -- estimates, not
measurements.  The formulas (per block; ``P`` counts float32 parameters):

* ``P_hash``: the tiny-cuda-nn HashGrid layout of :mod:`citygen.fields.hash_encoding` (dense
  coarse levels where the grid fits the table, each level rounded up to a multiple of 8
  entries, at most ``2**log2_hashmap_size`` entries; ``n_features_per_level`` floats each),
  for ``field.max_resolution`` over the block's extended rectangle.
* ``P_mlp`` (weights and biases of every linear layer), with ``E = n_levels * F``, hidden
  width ``H``, geometry features ``G``, ``D = sh_degree**2`` direction features, appearance
  ``A``, semantic width ``S`` and ``C = 7`` classes:
  density ``E -> H -> 1+G``; color ``G+D+A -> H (x color_hidden_layers) -> 3``; semantics
  ``G -> S -> C``.
* ``P_app = n_images * A`` (one appearance code per training image).
* model (safetensors) bytes = ``4 * (P_hash + P_mlp + P_app) + 4 * grid_resolution**3``
  (float32 parameters and the float32 occupancy-grid densities).
* training GPU memory = ``4 * P * (1 weight + 1 gradient + 2 Adam moments)``
  ``+ 4 * grid_resolution**3`` (occupancy) ``+ rays_per_batch * samples_per_ray * bytes_per_sample``
  (activations kept for the backward pass) ``+ framework_overhead`` (CUDA context, allocator
  slack) ``+ image cache`` when it is kept on the GPU (by default: when it fits; else it is
  host memory).
* image cache bytes = ``n_images * (W/downscale) * (H/downscale) * (3 + 1)`` (uint8 RGB and a
  uint8 semantic label per pixel).
* training time = ``steps * rays_per_batch / rays_per_second`` (the GPU's training throughput).

The throughput figures in :data:`GPU_PROFILES` are order-of-magnitude guesses for a
hash-grid field with fused kernels, not measurements; calibrate them with ``citygen bench``
on the target machine and pass ``rays_per_second``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from survey_io import Camera, Survey

from ..checks import format_bytes, largest_fitting
from ..config import TrainConfig
from ..errors import CitygenError
from .plan import Block, TilePlan

N_SEMANTIC_CLASSES = 7

#: name -> (training rays per second (estimate), GPU memory in bytes).
GPU_PROFILES: dict[str, tuple[float, float]] = {
    "h100": (5.0e5, 80e9),
    "h200": (5.5e5, 141e9),
    "a100": (3.0e5, 80e9),
    "l40s": (2.5e5, 48e9),
    "cpu": (2.0e3, 24e9),   # the 2-core reference machines, torch hash grid
}


@dataclass
class SizingConfig:
    """Assumptions of the sizing model (see the module doc for the formulas)."""

    #: target GPU, a key of GPU_PROFILES.
    gpu: str = "h100"
    #: training throughput override, rays per second (None = the GPU profile's estimate).
    rays_per_second: float | None = None
    #: mean samples per ray after occupancy-grid skipping.
    samples_per_ray: float = 48.0
    #: activation bytes kept per sample for the backward pass (encoding + MLP activations).
    bytes_per_sample: float = 512.0
    #: keep the block's decoded images on the GPU (True), in host memory (False), or on the
    #: GPU only when everything then still fits its memory (None).
    image_cache_on_gpu: bool | None = None
    #: CUDA context and allocator slack, bytes.
    framework_overhead_bytes: float = 1.5e9

    def __post_init__(self) -> None:
        if self.gpu not in GPU_PROFILES:
            raise CitygenError(None, f"unknown GPU {self.gpu!r} (known: {', '.join(GPU_PROFILES)})")
        if self.rays_per_second is not None and not self.rays_per_second > 0:
            raise CitygenError(None, "rays_per_second must be > 0")

    @property
    def throughput(self) -> float:
        return self.rays_per_second if self.rays_per_second is not None else GPU_PROFILES[self.gpu][0]

    @property
    def gpu_memory_bytes(self) -> float:
        return GPU_PROFILES[self.gpu][1]


def hash_params(train: TrainConfig) -> int:
    """Float parameters of the block's hash grid (the field's own layout)."""
    # deferred: the field imports torch (3 s); `citygen plan` runs without it
    from ..fields.hash_encoding import HashGridConfig, n_params

    f = train.field
    grid = HashGridConfig.from_max_resolution(f.max_resolution, n_levels=f.n_levels, base_resolution=f.base_resolution,
                                              n_features_per_level=f.n_features_per_level,
                                              log2_hashmap_size=f.log2_hashmap_size)
    return n_params(grid)


def mlp_params(train: TrainConfig) -> int:
    """Weights and biases of the density, color and semantic MLPs (module doc)."""
    f = train.field
    E, H, G = f.n_levels * f.n_features_per_level, f.hidden_dim, f.geo_feat_dim
    D, A, S, C = f.sh_degree**2, f.appearance_dim, f.semantic_hidden_dim, N_SEMANTIC_CLASSES

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    density = linear(E, H) + linear(H, 1 + G)
    color = linear(G + D + A, H) + (f.color_hidden_layers - 1) * linear(H, H) + linear(H, 3)
    semantic = linear(G, S) + linear(S, C)
    return density + color + semantic


#: bytes per float32 parameter while training: weight, gradient and two Adam moments.
TRAIN_BYTES_PER_PARAM = 4 * 4


def train_memory_terms(train: TrainConfig, sizing: SizingConfig | None = None) -> dict[str, float]:
    """A block's training memory without its image cache and framework overhead, by the config
    key that sizes each term (module doc): hash table, MLPs, occupancy grid, ray batch."""
    sizing = sizing or SizingConfig()
    return {
        "field.log2_hashmap_size": TRAIN_BYTES_PER_PARAM * hash_params(train),
        "field.hidden_dim": TRAIN_BYTES_PER_PARAM * mlp_params(train),
        "render.grid_resolution": 4 * train.render.grid_resolution**3,
        "rays_per_batch": train.rays_per_batch * sizing.samples_per_ray * sizing.bytes_per_sample,
    }


#: the largest value each key of :func:`train_memory_terms` may take (search bounds).
_TERM_RANGE = {"field.log2_hashmap_size": 30, "field.hidden_dim": 1 << 20, "render.grid_resolution": 1 << 20,
               "rays_per_batch": 1 << 40}


def check_train_memory(train: TrainConfig, budget_bytes: float, budget_source: str,
                       names: dict[str, str] | None = None) -> None:
    """Refuse a config whose training memory (:func:`train_memory_terms`) exceeds the budget,
    naming the key with the largest term and the largest value of it that would fit."""
    terms = train_memory_terms(train)
    total = sum(terms.values())
    if total <= budget_bytes:
        return
    key = max(terms, key=terms.get)
    section, _, leaf = key.rpartition(".")
    holder = getattr(train, section) if section else train

    def need(value: float) -> float:
        old = getattr(holder, leaf)
        setattr(holder, leaf, int(value))
        try:
            return sum(train_memory_terms(train).values())
        finally:
            setattr(holder, leaf, old)

    fit = largest_fitting(need, 1, _TERM_RANGE[key], budget_bytes, integer=True)
    hint = f"; {key} <= {int(fit)} fits" if fit is not None else ""
    label = (names or {}).get(key, key)
    raise CitygenError(None, f"{label} = {getattr(holder, leaf)} needs {format_bytes(total)} to train "
                             f"({format_bytes(terms[key])} of it for {key}), more than the memory budget of "
                             f"{format_bytes(budget_bytes)} ({budget_source}){hint}")


def estimate_block(block: Block, cameras: dict[str, Camera], train: TrainConfig,
                   sizing: SizingConfig) -> dict[str, Any]:
    """Sizing of one block (bytes, seconds) from its images and the configs.

    ``cameras`` maps each image name to its camera (for the image cache's pixel count).
    """
    n_images = len(block.images)
    p_hash, p_mlp = hash_params(train), mlp_params(train)
    p_app = n_images * train.field.appearance_dim
    params = p_hash + p_mlp + p_app
    occupancy = 4 * train.render.grid_resolution**3
    model_bytes = 4 * params + occupancy
    optimizer_state = 4 * params * 4           # weight, gradient, two Adam moments
    rays = train.rays_per_batch * sizing.samples_per_ray * sizing.bytes_per_sample
    ds = train.downscale
    image_cache = 4 * sum((cameras[n].width // ds) * (cameras[n].height // ds) for n in block.images)
    gpu = optimizer_state + occupancy + rays + sizing.framework_overhead_bytes
    cache_on_gpu = sizing.image_cache_on_gpu
    if cache_on_gpu is None:
        cache_on_gpu = gpu + image_cache <= sizing.gpu_memory_bytes
    gpu += image_cache if cache_on_gpu else 0
    seconds = train.steps * train.rays_per_batch / sizing.throughput
    ext = block.extended
    return {
        "id": block.id,
        "n_images": n_images,
        "params": {"hash": p_hash, "mlp": p_mlp, "appearance": p_app, "total": params},
        "model_bytes": model_bytes,
        "model_bytes_per_km2": model_bytes / (block.area_m2 / 1e6),
        "finest_cell_m": max(ext[2] - ext[0], ext[3] - ext[1]) / train.field.max_resolution,
        "memory_bytes": {"optimizer_state": optimizer_state, "occupancy": occupancy, "ray_batch": rays,
                         "image_cache": image_cache, "overhead": sizing.framework_overhead_bytes,
                         "gpu_total": gpu,
                         "host_total": 0 if cache_on_gpu else image_cache},
        "image_cache_on_gpu": bool(cache_on_gpu),
        "fits_gpu": gpu <= sizing.gpu_memory_bytes,
        "train_seconds": seconds,
    }


def sizing_report(plan: TilePlan, survey: Survey, train: TrainConfig | None = None,
                  sizing: SizingConfig | None = None) -> dict[str, Any]:
    """Per-block estimates and a summary of the whole tile (JSON-ready); ``survey`` is the
    planned one (its cameras size the image caches)."""
    train = train or TrainConfig()
    sizing = sizing or SizingConfig()
    cameras = {im.name: survey.camera_of(im) for im in survey.images}
    per_block = [estimate_block(b, cameras, train, sizing) for b in plan.blocks]
    n_img = np.array([len(b.images) for b in plan.blocks])
    gpu = np.array([e["memory_bytes"]["gpu_total"] for e in per_block])
    secs = np.array([e["train_seconds"] for e in per_block])
    model = np.array([e["model_bytes"] for e in per_block])
    area_km2 = sum(b.area_m2 for b in plan.blocks) / 1e6
    trained = n_img > 0
    trained_km2 = sum(b.area_m2 for b, t in zip(plan.blocks, trained) if t) / 1e6
    return {
        "summary": {
            "blocks": len(plan.blocks), "blocks_with_images": int(trained.sum()),
            "grid": [plan.grid.rows, plan.grid.cols], "block_size_m": list(plan.grid.block_size),
            "margin_m": plan.margin_m, "area_km2": area_km2, "images": plan.n_images,
            "unassigned_images": len(plan.unassigned_images),
            "unassigned_examples": plan.unassigned_images[:10],
            "images_per_block": {"min": int(n_img.min()), "median": float(np.median(n_img)), "max": int(n_img.max())},
            "low_coverage_blocks": [b.id for b in plan.blocks if b.low_coverage],
            "gpu_memory_per_block_bytes": {"median": float(np.median(gpu)), "max": float(gpu.max())},
            "host_memory_per_block_bytes": {"max": float(max(e["memory_bytes"]["host_total"] for e in per_block))},
            "train_seconds_per_block": float(secs.max()),
            "gpu_hours_total": float(secs[trained].sum() / 3600.0),
            "model_bytes_total": float(model[trained].sum()),
            "model_mb_per_km2": float(model[trained].sum() / 1e6 / max(trained_km2, 1e-12)),
            "all_blocks_fit_gpu": bool(all(e["fits_gpu"] for e in per_block)),
        },
        "assumptions": {
            "gpu": sizing.gpu, "gpu_memory_bytes": sizing.gpu_memory_bytes,
            "rays_per_second": sizing.throughput, "rays_per_second_is_estimate": sizing.rays_per_second is None,
            "sizing": dataclasses.asdict(sizing), "steps": train.steps, "rays_per_batch": train.rays_per_batch,
            "downscale": train.downscale, "field": dataclasses.asdict(train.field),
            "occupancy_grid_resolution": train.render.grid_resolution,
            "formulas": {
                "model_bytes": "4*(P_hash + P_mlp + n_images*appearance_dim) + 4*grid_resolution^3",
                "gpu_memory": "16*P + 4*grid_resolution^3 + rays_per_batch*samples_per_ray*bytes_per_sample"
                              " + image_cache(if on gpu) + overhead",
                "image_cache": "n_images*(W/downscale)*(H/downscale)*4",
                "train_seconds": "steps*rays_per_batch/rays_per_second",
            },
        },
        "blocks": per_block,
    }
