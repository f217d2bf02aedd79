"""A block's field as trained: built from a config, or opened from a checkpoint.

Below the renderer, the trainer and the editor (it imports only :mod:`citygen.fields` and
the checkpoint format), so that every reader opens weights the same way without importing the
trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig, from_dict
from ..errors import CitygenError
from ..fields.field import CityField
from ..fields.occupancy import OccupancyGrid
from .checkpoint import load_checkpoint, load_module_state


def build_field(cfg: TrainConfig, aabb: np.ndarray | torch.Tensor, n_images: int, n_classes: int,
                camera_positions: torch.Tensor | None, device: torch.device) -> CityField:
    """A fresh field (with its occupancy grid attached as ``field.occupancy``)."""
    field = CityField(cfg.field, torch.as_tensor(np.asarray(aabb), dtype=torch.float32), n_images, n_classes,
                      camera_positions)
    field.occupancy = OccupancyGrid(field.aabb, cfg.render.grid_resolution)
    return field.to(device)


def load_field(checkpoint: Path | str, device: torch.device | str = "cpu") -> tuple[CityField, dict[str, Any]]:
    """Load a trained field (with ``field.occupancy``) from a checkpoint, a checkpoints folder or a run folder.

    Returns the field in eval mode and the checkpoint's sidecar metadata (config, AABB, georef, ...).
    """
    tensors, meta = load_checkpoint(Path(checkpoint), device)
    config = meta["config"]
    if "normalization" not in config.get("field", {}):
        # written before FieldConfig.normalization existed: those fields were per-axis
        config = {**config, "field": {**config.get("field", {}), "normalization": "per_axis"}}
    cfg = from_dict(config, str(checkpoint))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    absent = [f"model.{k}" for k in ("appearance.weight", "camera_positions") if k not in model]
    if absent:
        raise CitygenError(checkpoint, f"checkpoint has no tensors {absent}: not a citygen field checkpoint")
    n_images = model["appearance.weight"].shape[0]
    field = build_field(cfg, np.asarray(meta["aabb"]), n_images, len(meta["classes"]),
                        model["camera_positions"], torch.device(device))
    load_module_state(field, model, Path(checkpoint))
    meta["train_config"] = cfg
    return field.eval(), meta


__all__ = ["build_field", "load_field"]
