"""nerfstudio method ``citygen-field``: citygen's field inside nerfstudio's instant-ngp model.

Registered through the ``nerfstudio.method_configs`` entry point (setup.py) as
``citygen.nerfstudio_plugin:citygen_method``.  nerfstudio is an optional extra
(``pip install citygen[nerfstudio]``): nothing here imports it until nerfstudio itself asks
for ``citygen_method`` (PEP 562 module ``__getattr__``), and then a missing nerfstudio is
reported as a clear :class:`ImportError`.

What it does: nerfstudio's ``instant-ngp`` model (nerfacc occupancy grid, volumetric
sampler, renderers, losses) with its ``NerfactoField`` swapped for a
:class:`~citygen.fields.CityField` (same hash grid layout as citygen's own trainer, the
per-image appearance codes, the citygen colour MLP), so `ns-train citygen-field` trains
the same network that ``citygen train`` trains, on any nerfstudio dataset.  The semantic
head is present but not supervised (nerfstudio's data managers carry no label maps).
"""

from __future__ import annotations

from typing import Any

_SPEC: list[Any] = []


def _require_nerfstudio():
    try:
        import nerfstudio  # noqa: F401
    except ImportError as err:
        raise ImportError("the citygen-field nerfstudio method needs nerfstudio "
                          f"(pip install 'citygen[nerfstudio]'): {err}") from None


def _build_method():
    """Build the :class:`MethodSpecification` (imports nerfstudio)."""
    _require_nerfstudio()
    import copy
    from dataclasses import dataclass, field

    import torch
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.field_components.field_heads import FieldHeadNames
    from nerfstudio.fields.base_field import Field
    from nerfstudio.model_components.ray_samplers import VolumetricSampler
    from nerfstudio.models.instant_ngp import InstantNGPModelConfig, NGPModel
    from nerfstudio.plugins.types import MethodSpecification

    from .config import FieldConfig
    from .fields.field import CityField

    class CitygenNerfstudioField(Field):
        """nerfstudio ``Field`` adapter around a :class:`CityField`."""

        def __init__(self, aabb: torch.Tensor, num_images: int, cfg: FieldConfig):
            super().__init__()
            self.city = CityField(cfg, aabb.detach().cpu(), num_images, n_classes=7)

        def get_density(self, ray_samples):
            positions = ray_samples.frustums.get_positions()
            shape = positions.shape[:-1]
            sigma, geo = self.city.density(positions.reshape(-1, 3))
            return sigma.reshape(*shape, 1), geo.reshape(*shape, -1)

        def get_outputs(self, ray_samples, density_embedding=None):
            dirs = ray_samples.frustums.directions
            shape = dirs.shape[:-1]
            if ray_samples.camera_indices is not None:
                codes = self.city.appearance(ray_samples.camera_indices.reshape(-1).long())
            else:
                codes = self.city.appearance.weight.mean(0).expand(dirs.reshape(-1, 3).shape[0], -1)
            geo = density_embedding.reshape(-1, density_embedding.shape[-1])
            rgb = self.city.color(geo, dirs.reshape(-1, 3), codes)
            return {FieldHeadNames.RGB: rgb.reshape(*shape, 3)}

    @dataclass
    class CitygenNGPModelConfig(InstantNGPModelConfig):
        _target: type = field(default_factory=lambda: CitygenNGPModel)
        city_field: FieldConfig = field(default_factory=lambda: FieldConfig(backend="auto"))
        disable_scene_contraction: bool = True

    class CitygenNGPModel(NGPModel):
        """instant-ngp with the citygen field."""

        config: CitygenNGPModelConfig

        def populate_modules(self):
            super().populate_modules()
            self.field = CitygenNerfstudioField(self.scene_box.aabb, self.num_train_data, self.config.city_field)
            self.sampler = VolumetricSampler(occupancy_grid=self.occupancy_grid, density_fn=self.field.density_fn)

    config = copy.deepcopy(method_configs["instant-ngp-bounded"])
    config.method_name = "citygen-field"
    config.pipeline.model = CitygenNGPModelConfig(eval_num_rays_per_chunk=8192, grid_levels=1, alpha_thre=0.0,
                                                  cone_angle=0.0, near_plane=0.01, background_color="black")
    return MethodSpecification(config=config, description="citygen hash-grid field (instant-ngp renderer)")


def __getattr__(name: str):
    if name == "citygen_method":
        if not _SPEC:
            _SPEC.append(_build_method())
        return _SPEC[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
