"""Dataclass configs for the field, the renderer and the one-block trainer, and YAML presets.

The nesting follows nerfstudio: a :class:`TrainConfig` holds a :class:`FieldConfig`, a
:class:`RenderConfig` and an :class:`OptimConfig`.  Presets live in ``citygen/configs/<name>.yaml``
and override the dataclass defaults; command-line overrides (dotted keys such as
``optim.lr_grid``) override the preset.  Every run writes its resolved config beside its
output (``config.json``), and checkpoints carry it in their sidecar.

The shipped presets are package data (``citygen/configs/*.yaml``) read through
:mod:`importlib.resources`, so a checkout, an editable install and a wheel all find them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, Range
from .errors import CitygenError

#: The shipped presets (``tiny``, ``block``, ``city-100km2``): package data of ``citygen``.
PRESETS = resources.files("citygen") / "configs"


@dataclass
class FieldConfig:
    """The hash-grid field (instant-ngp / nerfacto style)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    #: finest grid resolution over the block's longest side (per_level_scale is derived).
    max_resolution: int = 2048
    hidden_dim: int = 64
    geo_feat_dim: int = 15
    color_hidden_layers: int = 2
    sh_degree: int = 4
    appearance_dim: int = 16
    semantic_hidden_dim: int = 64
    #: hash-grid backend: "auto" (native build when present), "torch", "cpp", "cuda", "tcnn".
    backend: str = "auto"
    #: how positions map to the hash grid's unit cube: "cube" scales every axis by the block's
    #: longest side (cubic cells: an aerial block 300 m wide and 50 m tall uses a sixth of the
    #: grid's z range); "per_axis" stretches each axis to [0, 1] (checkpoints written before
    #: this option existed; z cells ~6x finer than x/y, which wastes hash capacity: -0.8 dB
    #: held-out PSNR on the tiny city at 1500 steps).
    normalization: str = "cube"
    #: when > 0, the grid's levels are scaled down together until the finest cell is at least this
    #: many ground sample distances of the block's training images (0: the resolutions as given).
    #: Measured, not the default: +0.25 to +0.8 dB held-out on 4 of 5 tile / block pairs, -0.8 dB on
    #: the tiny city's one block, DSM error mixed (DESIGN.md, "Grid resolution from the images").
    min_cell_gsd: float = 0.0


@dataclass
class RenderConfig:
    """Occupancy-grid ray marching and volume rendering."""

    #: marching step along the ray, metres.
    step_size: float = 0.5
    #: occupancy grid cells along each axis.
    grid_resolution: int = 128
    #: a cell is occupied when its density gives an opacity above this over one step.
    occupancy_alpha_threshold: float = 0.01
    #: EMA decay of the cell densities (instant-ngp: new = max(decay * old, sampled)).
    occupancy_decay: float = 0.95
    #: refresh the grid every this many steps, a tile block's own smaller steps included (scaling
    #: it to the same refreshes per ray cost a drone tile 0.6-1 dB: DESIGN.md, session 9) ...
    occupancy_update_every: int = 16
    #: ... sampling this many random cells (plus as many occupied ones) per refresh.
    occupancy_cells_per_update: int = 65536
    #: first steps during which every cell is refreshed (the grid starts all occupied).
    occupancy_warmup_steps: int = 256
    #: samples marched per segment before dead rays are dropped.
    segment_samples: int = 64
    #: early ray termination: stop once transmittance falls below this.
    min_transmittance: float = 1e-4
    #: rays per chunk when rendering whole images.
    chunk_rays: int = 8192


@dataclass
class OptimConfig:
    """Adam with separate learning rates for the hash table and the MLPs, warmup + exponential decay."""

    lr_grid: float = 1e-2
    lr_mlp: float = 1e-2
    eps: float = 1e-15
    weight_decay_mlp: float = 1e-6
    warmup_steps: int = 100
    #: the learning rate at the last step, as a fraction of the initial one.
    final_lr_fraction: float = 0.03
    #: weight of the semantic cross-entropy.
    semantic_weight: float = 0.04
    #: weight of depth supervision (off by default: real surveys have no depth).
    depth_weight: float = 0.0
    #: weight of the sparse depth loss on rays through SfM keypoints (surveys with an SfM model in
    #: ``sparse/0``, e.g. from ``citygen ingest``; DS-NeRF-style; citygen.train.losses.sparse_depth_loss).
    sparse_depth_weight: float = 0.0
    #: learning rate of a per-training-image affine colour transform (3x3 + offset, identity at the
    #: start) applied to the rendered colour before the loss: exposure and white balance that vary
    #: from image to image.  Held-out views render without it (identity).  0 = off.
    lr_exposure: float = 0.0
    #: weight of the mean transparency (1 - opacity) of the rays (aerial surveys: every ray ends on
    #: the ground, none on the background; citygen.train.losses.ground_opacity_loss).
    ground_opacity_weight: float = 0.0
    #: weight of the opacity entropy regulariser on the accumulation (pushes rays to 0 or 1).
    entropy_weight: float = 1e-3
    #: weight of the mip-NeRF 360 distortion loss (distances in units of the block's height):
    #: concentrates each ray's weight on one surface, clearing the fog that slows marching.
    distortion_weight: float = 0.0
    #: weight of the per-sample opacity entropy (``render_rays(alpha_entropy=True)``): makes each
    #: visible sample empty or opaque, so that rays terminate within a step or two of the surface;
    #: used by the sharpening fine-tune (``citygen sharpen``, :mod:`citygen.train.sharpen`).
    alpha_entropy_weight: float = 0.0
    #: "mse" or "huber" on RGB.
    rgb_loss: str = "mse"
    #: row-sparse Adam on the hash table (tiny-cuda-nn's rule: entries no sample touched keep
    #: their value and moments; citygen.train.optim).  Off by default: with the CPU presets'
    #: 1024-ray batches, dense Adam's momentum on untouched entries trains faster (tiny city,
    #: 1500 steps: held-out 20.72 dB dense vs 20.45 sparse); made for GPU-sized batches.
    sparse_grid: bool = False


@dataclass
class TrainConfig:
    """One block's training run."""

    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    steps: int = 30000
    rays_per_batch: int = 4096
    seed: int = 0
    checkpoint_every: int = 2000
    log_every: int = 50
    #: torch intra-op threads on CPU (0 = leave torch's default).
    threads: int = 0
    #: "auto" (cuda when available), "cpu", "cuda".
    device: str = "auto"
    #: stop early once training has taken this many seconds (0 = no limit; the LR schedule
    #: still follows ``steps``, so size ``steps`` to the budget for a full decay).
    max_seconds: float = 0.0
    #: evaluate held-out views at the end of training.
    eval_at_end: bool = True
    #: image downscale factor applied when loading the survey (1 = full size).
    downscale: int = 1
    #: fraction of each batch drawn in proportion to a per-image error map (instant-ngp;
    #: citygen.train.error_map), the rest uniformly over all pixels; 0 = uniform only.
    error_sampling: float = 0.0
    #: fraction of each batch drawn from pixels holding an SfM keypoint (sparse depth targets), when
    #: ``optim.sparse_depth_weight`` > 0 and the survey has an SfM model.
    sparse_depth_fraction: float = 0.0
    #: error-map cell size in pixels.
    error_map_cell: int = 8
    #: AABB margin added around the derived scene bounds, as a fraction of their size.
    aabb_margin: float = 0.05
    #: a tile block's batch as a multiple of its share of ``rays_per_batch``, the steps raised to
    #: spend the same rays (citygen.tile.block_batch); below 1: still more, smaller steps.
    tile_batch_scale: float = 1.0
    #: a tile block's hash-grid base resolution (0: ``field.base_resolution``): coarser first levels
    #: span a block's well-seen interior and its thinly seen edges (citygen.tile.block_config).
    tile_base_resolution: int = 0
    preset: str = "default"


#: Allowed values of every numeric key (dotted, as in overrides); one place for the preset
#: files, ``--override`` and the flags alike.  Keys not listed take any value of their type.
RULES: dict[str, Range] = {
    # the hash-grid bounds are HashGridConfig's (tiny-cuda-nn's)
    "field.n_levels": Range(1, 32),
    # whether a table fits this machine is citygen.partition.estimate.check_train_memory's question
    "field.log2_hashmap_size": Range(1, 30),
    "field.base_resolution": AT_LEAST_ONE,
    "field.max_resolution": AT_LEAST_ONE,
    "field.min_cell_gsd": Range(0, 100),
    "field.hidden_dim": AT_LEAST_ONE,
    "field.geo_feat_dim": AT_LEAST_ONE,
    "field.color_hidden_layers": AT_LEAST_ONE,
    "field.sh_degree": Range(1, 4),
    "field.appearance_dim": NON_NEGATIVE,
    "field.semantic_hidden_dim": AT_LEAST_ONE,
    "render.step_size": POSITIVE,
    "render.grid_resolution": AT_LEAST_ONE,
    "render.occupancy_alpha_threshold": UNIT,
    "render.occupancy_decay": UNIT,
    "render.occupancy_update_every": AT_LEAST_ONE,
    "render.occupancy_cells_per_update": AT_LEAST_ONE,
    "render.occupancy_warmup_steps": NON_NEGATIVE,
    "render.segment_samples": AT_LEAST_ONE,
    "render.min_transmittance": Range(0, 1, hi_open=True),
    "render.chunk_rays": AT_LEAST_ONE,
    "optim.lr_grid": POSITIVE,
    "optim.lr_mlp": POSITIVE,
    "optim.eps": POSITIVE,
    "optim.weight_decay_mlp": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.final_lr_fraction": Range(0, 1, lo_open=True),
    "optim.semantic_weight": NON_NEGATIVE,
    "optim.depth_weight": NON_NEGATIVE,
    "optim.sparse_depth_weight": NON_NEGATIVE,
    "optim.lr_exposure": NON_NEGATIVE,
    "optim.ground_opacity_weight": NON_NEGATIVE,
    "optim.entropy_weight": NON_NEGATIVE,
    "optim.distortion_weight": NON_NEGATIVE,
    "optim.alpha_entropy_weight": NON_NEGATIVE,
    "steps": AT_LEAST_ONE,
    "rays_per_batch": AT_LEAST_ONE,
    "seed": NON_NEGATIVE,
    "checkpoint_every": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
    "threads": NON_NEGATIVE,
    "max_seconds": NON_NEGATIVE,
    "downscale": AT_LEAST_ONE,
    "error_sampling": UNIT,
    "sparse_depth_fraction": UNIT,
    "error_map_cell": AT_LEAST_ONE,
    "aabb_margin": NON_NEGATIVE,
    "tile_batch_scale": Range(0, 1, lo_open=True),
    "tile_base_resolution": NON_NEGATIVE,
}

#: Keys that take one of a few words.
CHOICES: dict[str, tuple[Any, ...]] = {
    "field.n_features_per_level": (1, 2, 4, 8),
    "field.backend": ("auto", "torch", "cpp", "cuda", "tcnn"),
    "field.normalization": ("cube", "per_axis"),
    "optim.rgb_loss": ("mse", "huber"),
    "device": ("auto", "cpu", "cuda"),
}


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def validate(cfg: TrainConfig, where: str | Path | None = None, names: dict[str, str] | None = None) -> TrainConfig:
    """Check every key against :data:`RULES` / :data:`CHOICES`; raise a :class:`CitygenError`
    naming the dotted key (or ``names[key]``, e.g. the command-line flag that set it)."""
    names = names or {}
    flat = _flat(cfg)
    for key, value in flat.items():
        label = names.get(key, f"config key {key!r}")
        if key in RULES:
            problem = RULES[key].problem(value)
            if problem is not None:
                raise CitygenError(where, f"{label} {problem}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise CitygenError(where, f"{label} must be one of {', '.join(map(str, CHOICES[key]))}, got {value!r}")
    if flat["field.n_levels"] >= 2 and flat["field.max_resolution"] < flat["field.base_resolution"]:
        key = "field.max_resolution"
        raise CitygenError(where, f"{names.get(key, f'config key {key!r}')} must be >= field.base_resolution "
                                  f"({flat['field.base_resolution']}), got {flat[key]}")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain JSON/YAML-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise CitygenError(where, f"unknown config key {key!r} (known: {', '.join(known)})")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise CitygenError(where, f"config key {key!r} needs a mapping, got {value!r}")
            _apply(current, value, where)
            continue
        setattr(obj, key, _coerce(current, value, key, where))


def _coerce(current: Any, value: Any, key: str, where: str) -> Any:
    """Convert ``value`` to the type of the default (YAML and the CLI give strings/ints)."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise CitygenError(where, f"config key {key!r} needs true/false, got {value!r}")
    try:
        return type(current)(value)
    except (TypeError, ValueError):
        raise CitygenError(where, f"config key {key!r} needs a {type(current).__name__}, got {value!r}") from None


def from_dict(d: dict[str, Any], where: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a (partial) nested dict, e.g. a checkpoint sidecar."""
    cfg = TrainConfig()
    _apply(cfg, d, where)
    return cfg


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[:-len(".yaml")] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


#: the preset a survey with depth maps (the synthetic city) trains with when none is given ...
DEPTH_PRESET = "tiny"
#: ... and the one for real drone and aerial surveys (no depth maps: SfM points, exposure, sharp surfaces).
DRONE_PRESET = "drone"


def choose_preset(preset: str | Path | None, has_depth_maps: bool) -> tuple[str | Path, str]:
    """The preset to train with, and why: a given ``preset`` always wins; otherwise ``tiny`` for a
    survey whose images all have depth maps and ``drone`` for one without (real imagery)."""
    if preset is not None:
        return preset, "given with --preset"
    if has_depth_maps:
        return DEPTH_PRESET, "the default for a survey with depth maps"
    return DRONE_PRESET, "the default for a survey without depth maps (real imagery)"


def _read_preset(preset: str | Path) -> tuple[str, str, str]:
    """(text, name, where) of a shipped preset name or a YAML file path; ``where`` names it in errors."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") or p.exists():
        try:
            return p.read_text(), p.stem, str(p)
        except OSError as err:
            raise CitygenError(p, f"no such preset or config file ({err.strerror or err}; presets: "
                                  f"{', '.join(preset_names())})") from None
    name = str(preset)
    resource = PRESETS / f"{name}.yaml"
    if "/" in name or not resource.is_file():
        raise CitygenError(p, f"no such preset or config file (presets: {', '.join(preset_names())})")
    # a preset inside the installed package: errors name its package path, not a checkout path
    return resource.read_text(encoding="utf-8"), name, f"citygen/configs/{name}.yaml"


def load_config(preset: str | Path = "tiny", overrides: dict[str, Any] | None = None,
                names: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the preset YAML, then ``overrides`` (nested dict or dotted keys), each
    step checked by :func:`validate`.

    Args:
        preset: a shipped preset name (``tiny``, ``block``, ``city-100km2``; ``citygen/configs/``)
            or a YAML path.
        overrides: e.g. ``{"steps": 500, "optim.lr_grid": 3e-3}`` or ``{"optim": {"lr_grid": 3e-3}}``.
        names: how to call an overridden key in errors (dotted key -> e.g. ``--steps``);
            overridden keys not named here are called ``--override KEY``.
    """
    text, name, where = _read_preset(preset)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise CitygenError(where, f"not a readable YAML config ({err})") from None
    if not isinstance(raw, dict):
        raise CitygenError(where, "a config file must hold a mapping")
    cfg = TrainConfig()
    cfg.preset = name
    _apply(cfg, raw, where)
    validate(cfg, where)                 # a bad preset file is named as such ...
    return apply_overrides(cfg, overrides, names)  # ... and a bad override by the flag that set it


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--override KEY=VALUE ...``) as a dict of dotted keys; the values
    stay strings, checked and converted by :func:`apply_overrides`."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CitygenError(None, f"--override expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any] | None,
                    names: dict[str, str] | None = None) -> TrainConfig:
    """``cfg`` (changed in place, and returned) with ``overrides`` (nested dict or dotted keys)
    applied and checked by :func:`validate`; the one override mechanism (presets, the CLI, the
    scripted tile API).  ``names``: as in :func:`load_config`."""
    if overrides:
        _apply(cfg, _nest(overrides), "overrides")
        labels = {k: (names or {}).get(k, f"--override {k}") for k in _dotted_keys(_nest(overrides))}
        validate(cfg, None, labels)
    return cfg


def _dotted_keys(nested: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in nested.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out
