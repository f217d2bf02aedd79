"""nerfstudio method ``citygen-field``: citygen's field and renderer as a nerfstudio model.

Registered through the ``nerfstudio.method_configs`` entry point (setup.py) as
``citygen.nerfstudio_plugin:citygen_method``.  nerfstudio is an optional extra
(``pip install citygen[nerfstudio]``): nothing here imports it until nerfstudio itself asks
for ``citygen_method`` (PEP 562 module ``__getattr__``), and then a missing nerfstudio is
reported as a clear :class:`ImportError`.

What it does: a nerfstudio ``Model`` whose field is a :class:`~citygen.fields.CityField`
(the hash grid, density and colour MLPs and per-image appearance codes of ``citygen train``)
rendered by citygen's own pure-torch renderer (:func:`citygen.render.volume.render_rays` with
an :class:`~citygen.fields.occupancy.OccupancyGrid`), with the trainer's losses (RGB, opacity
entropy, optional distortion) and its optimiser layout: a ``grid`` and an ``mlp`` parameter
group, Adam (betas 0.9/0.99, eps 1e-15), linear warmup then exponential decay.  So
``ns-train citygen-field`` trains the same network ``citygen train`` trains, on any nerfstudio
dataset, on CUDA or on CPU (nerfstudio's instant-ngp model needs nerfacc's CUDA kernels).

Units: nerfstudio's data parsers rescale the scene into its scene box (``[-1, 1]^3`` by
default), so lengths here (marching step, near plane) are scene-box units, not metres.
Held-out views use the appearance code of the nearest training camera (citygen's rule), the
training camera centres being recorded from the training rays.  The semantic head is present
but neither supervised nor rendered (nerfstudio's data managers carry no label maps).
"""

# No `from __future__ import annotations`: tyro (ns-train's CLI) resolves the config dataclasses'
# annotations, which name classes local to _build_method, so they must be evaluated in place.
import dataclasses
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from survey_io.semantics import CLASSES

# citygen's own modules are imported here (not inside _build_method) so that the method's
# losses, schedules and optimiser defaults are visibly the trainer's (tests/test_layers.py checks
# it without nerfstudio); none of them imports nerfstudio.
from .config import FieldConfig, OptimConfig, RenderConfig
from .fields.field import CityField
from .fields.occupancy import OccupancyGrid
from .nets.lpips import ENV_WEIGHTS, load_lpips, lpips_distance, resolve_lpips_weights
from .render.volume import render_rays
from .train.losses import opacity_entropy
from .train.optim import adam_groups
from .train.schedule import WARMUP_START, refresh_occupancy

_SPEC: list[Any] = []


def optimizer_settings(optim: OptimConfig | None = None) -> dict[str, dict[str, Any]]:
    """Adam's settings per parameter group (``grid``, ``mlp``): the trainer's, from ``OptimConfig``."""
    return {g["name"]: {k: g[k] for k in ("lr", "eps", "weight_decay", "betas")}
            for g in adam_groups(optim or OptimConfig())}


def schedule_args(lr: float, optim: OptimConfig, max_steps: int) -> dict[str, Any]:
    """nerfstudio's ``ExponentialDecaySchedulerConfig`` arguments that trace the trainer's
    :func:`~citygen.train.schedule.lr_factor` (times ``lr``): nerfstudio ramps linearly from
    ``lr_pre_warmup`` to ``lr`` over ``warmup_steps``, then decays log-linearly to ``lr_final``
    at ``max_steps``."""
    return {"lr_pre_warmup": WARMUP_START * lr, "lr_final": optim.final_lr_fraction * lr,
            "warmup_steps": optim.warmup_steps, "max_steps": max_steps, "ramp": "linear"}


def _require_nerfstudio():
    try:
        import nerfstudio  # noqa: F401
    except ImportError as err:
        raise ImportError("the citygen-field nerfstudio method needs nerfstudio "
                          f"(pip install 'citygen[nerfstudio]'): {err}") from None


def _build_method():
    """Build the :class:`MethodSpecification` (imports nerfstudio)."""
    _require_nerfstudio()
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.models.base_model import Model, ModelConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
    from nerfstudio.plugins.types import MethodSpecification
    from nerfstudio.utils import colormaps


    optim = OptimConfig()
    settings = optimizer_settings(optim)

    @dataclasses.dataclass
    class CitygenAdamConfig(AdamOptimizerConfig):
        """Adam with the trainer's betas (instant-ngp's; nerfstudio's config leaves torch's 0.999)."""

        betas: tuple[float, float] = settings["grid"]["betas"]

    @dataclasses.dataclass
    class CitygenModelConfig(ModelConfig):
        """citygen's field and renderer; lengths are scene-box units (see the module docstring)."""

        _target: type = dataclasses.field(default_factory=lambda: CitygenModel)
        enable_collider: bool = False  # render_rays clips every ray to the scene box itself
        city_field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
        render: RenderConfig = dataclasses.field(default_factory=lambda: RenderConfig(step_size=0.0))
        """marching and occupancy grid, as in ``citygen train`` but in scene-box units; step_size
        0: the scene box's diagonal / 1024 (instant-ngp's density)."""
        near_plane: float = 0.0
        entropy_weight: float = optim.entropy_weight
        distortion_weight: float = optim.distortion_weight
        """mip-NeRF 360 distortion loss, distances in units of the scene box's height."""

    class _LazyLPIPS:
        """citygen's LPIPS (vgg), from the weights file in ``$CITYGEN_LPIPS_WEIGHTS``, loaded on
        first use.  Not torchmetrics' LPIPS: that one fetches AlexNet weights from the network,
        and citygen downloads nothing at run time.  Without the variable LPIPS is left out of the
        metrics (with one warning)."""

        def __init__(self):
            self.model = None
            self.warned = False

        def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> float | None:
            if self.model is None:
                path = resolve_lpips_weights(None)
                if path is None:
                    if not self.warned:
                        warnings.warn(f"citygen-field: no LPIPS (set {ENV_WEIGHTS} to a weights file made by "
                                      "scripts/convert_lpips_weights.py)", stacklevel=2)
                        self.warned = True
                    return None
                self.model = load_lpips(path, pred.device)
            return lpips_distance(self.model, pred, target)

    class CitygenModel(Model):
        """A :class:`CityField` rendered by citygen's occupancy-grid volume renderer."""

        config: CitygenModelConfig

        def populate_modules(self):
            super().populate_modules()
            aabb = self.scene_box.aabb.detach().float().cpu()
            self.field = CityField(self.config.city_field, aabb, self.num_train_data, n_classes=len(CLASSES))
            self.field.occupancy = OccupancyGrid(self.field.aabb, self.config.render.grid_resolution)
            # training cameras whose centre field.camera_positions holds (for the held-out rule)
            self.register_buffer("camera_seen", torch.zeros(max(self.num_train_data, 1), dtype=torch.bool))
            size = aabb[1] - aabb[0]
            self.step_size = self.config.render.step_size or float(torch.linalg.norm(size)) / 1024
            self.box_height = float(size[2])
            self.samples_per_ray = 0.0
            self.lpips = _LazyLPIPS()

        def get_param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
            return {"grid": self.field.grid_parameters(), "mlp": self.field.mlp_parameters()}

        def get_training_callbacks(self, training_callback_attributes) -> list[TrainingCallback]:
            cfg = self.config.render

            def refresh(step: int):
                # the trainer's schedule (citygen.train.schedule), counted in steps done
                refresh_occupancy(self.field, step + 1, cfg, self.step_size)

            return [TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], refresh)]

        def _appearance(self, ray_bundle, origins: torch.Tensor) -> torch.Tensor:
            """Per-ray appearance codes: the ray's own image while training, else the nearest
            training camera's (citygen's held-out rule; the mean code before any training)."""
            codes = self.field.appearance.weight
            if self.training and ray_bundle.camera_indices is not None:
                index = ray_bundle.camera_indices.reshape(-1).long()
                with torch.no_grad():  # a pinhole camera's rays all start at its centre
                    self.field.camera_positions[index] = origins.detach()
                    self.camera_seen[index] = True
                return codes[index]
            seen = self.camera_seen.nonzero().squeeze(-1)
            if seen.numel() == 0:
                return codes.mean(0).expand(origins.shape[0], -1)
            nearest = torch.cdist(origins, self.field.camera_positions[seen]).argmin(dim=1)
            return codes[seen[nearest]]

        def get_outputs(self, ray_bundle) -> dict[str, torch.Tensor]:
            cfg = self.config
            shape = ray_bundle.shape
            origins = ray_bundle.origins.reshape(-1, 3)
            dirs = ray_bundle.directions.reshape(-1, 3)
            jitter = torch.rand(origins.shape[0], device=origins.device) if self.training else None
            distortion = self.training and cfg.distortion_weight > 0
            out = render_rays(self.field, origins, dirs, self._appearance(ray_bundle, origins),
                              step_size=self.step_size, occupancy=self.field.occupancy, jitter=jitter,
                              near=cfg.near_plane, segment=cfg.render.segment_samples,
                              min_transmittance=cfg.render.min_transmittance, with_semantics=False,
                              distortion_scale=1.0 / self.box_height if distortion else None)
            self.samples_per_ray = float(out["n_samples"]) / max(origins.shape[0], 1)
            outputs = {"rgb": out["rgb"].reshape(*shape, 3), "accumulation": out["acc"].reshape(*shape, 1),
                       "depth": out["depth"].reshape(*shape, 1)}  # distance along the (unit) ray
            if distortion:
                outputs["distortion"] = out["distortion"].reshape(*shape, 1)
            return outputs

        def _ground_truth(self, batch) -> torch.Tensor:
            image = batch["image"].to(self.device)
            if image.dtype == torch.uint8:
                image = image.float() / 255.0
            if image.shape[-1] == 4:  # RGBA: transparent pixels are black (non-premultiplied input)
                image = image[..., :3] * image[..., 3:]
            return image

        def get_metrics_dict(self, outputs, batch) -> dict[str, torch.Tensor | float]:
            mse = F.mse_loss(outputs["rgb"].detach(), self._ground_truth(batch))
            return {"psnr": -10.0 * torch.log10(mse.clamp_min(1e-12)), "samples_per_ray": self.samples_per_ray,
                    "occupied_fraction": self.field.occupancy.occupied_fraction()}

        def get_loss_dict(self, outputs, batch, metrics_dict=None) -> dict[str, torch.Tensor]:
            cfg = self.config
            losses = {"rgb_loss": F.mse_loss(outputs["rgb"], self._ground_truth(batch))}
            if cfg.entropy_weight > 0:
                losses["entropy_loss"] = cfg.entropy_weight * opacity_entropy(outputs["accumulation"])
            if "distortion" in outputs:
                losses["distortion_loss"] = cfg.distortion_weight * outputs["distortion"].mean()
            return losses

        def get_image_metrics_and_images(self, outputs, batch):
            from torchmetrics.functional import structural_similarity_index_measure

            image = self._ground_truth(batch)
            rgb = outputs["rgb"]
            acc = outputs["accumulation"]
            mse = F.mse_loss(rgb, image)
            a = torch.moveaxis(image, -1, 0)[None]  # [1, C, H, W] for the image metrics
            b = torch.moveaxis(rgb, -1, 0)[None].clamp(0.0, 1.0)
            metrics = {"psnr": -10.0 * math.log10(max(float(mse), 1e-12)),
                       "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0))}
            lpips = self.lpips(rgb.clamp(0.0, 1.0), image)
            if lpips is not None:
                metrics["lpips"] = lpips
            images = {"img": torch.cat([image, rgb], dim=1), "accumulation": colormaps.apply_colormap(acc),
                      "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=acc)}
            return metrics, images

    def schedule(group: str, max_steps: int) -> ExponentialDecaySchedulerConfig:
        return ExponentialDecaySchedulerConfig(**schedule_args(settings[group]["lr"], optim, max_steps))

    steps = 30000
    config = TrainerConfig(
        method_name="citygen-field",
        steps_per_eval_batch=500,
        steps_per_save=2000,
        max_num_iterations=steps,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=VanillaDataManagerConfig(dataparser=NerfstudioDataParserConfig(),
                                                 train_num_rays_per_batch=4096, eval_num_rays_per_batch=4096),
            model=CitygenModelConfig(eval_num_rays_per_chunk=8192),
        ),
        optimizers={group: {"optimizer": CitygenAdamConfig(lr=kw["lr"], eps=kw["eps"], weight_decay=kw["weight_decay"]),
                            "scheduler": schedule(group, steps)} for group, kw in settings.items()},
        viewer=ViewerConfig(num_rays_per_chunk=1 << 12),
        vis="viewer",
    )
    return MethodSpecification(config=config, description="citygen hash-grid field and occupancy-grid renderer")


def __getattr__(name: str):
    if name == "citygen_method":
        if not _SPEC:
            _SPEC.append(_build_method())
        return _SPEC[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
