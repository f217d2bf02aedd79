"""Training schedules shared by ``citygen train`` (:mod:`citygen.train.trainer`) and the nerfstudio
method (:mod:`citygen.nerfstudio_plugin`): the learning-rate curve and the occupancy-grid refresh."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import OptimConfig, RenderConfig

#: the learning rate at step 0, as a fraction of the initial one (linear warmup from there).
WARMUP_START = 0.01


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup from ``WARMUP_START`` over ``optim.warmup_steps``, then exponential decay to
    ``optim.final_lr_fraction`` at ``total_steps``: the factor on each group's initial rate."""
    if step < optim.warmup_steps:
        return WARMUP_START + (1.0 - WARMUP_START) * step / max(optim.warmup_steps, 1)
    span = max(total_steps - optim.warmup_steps, 1)
    return optim.final_lr_fraction ** min((step - optim.warmup_steps) / span, 1.0)


def cosine_decay(done: int, steps: int, final: float) -> float:
    """Half a cosine from 1 at ``done`` = 0 down to ``final`` at ``done`` = ``steps`` (and after):
    the sharpening fine-tune's extra factor on the run's final rate (citygen.train.sharpen), flat
    at both ends so that the entropy's first steps and the last ones both move slowly."""
    x = min(max(done / max(steps, 1), 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * x))


def occupancy_refresh_cells(done: int, render: RenderConfig) -> int | None | bool:
    """instant-ngp's occupancy schedule after ``done`` training steps: False when no refresh is due
    (a refresh follows every ``occupancy_update_every`` steps), else how many random cells it
    samples: None (every cell) while the field is young (``occupancy_warmup_steps``), later
    ``occupancy_cells_per_update`` (plus as many occupied ones)."""
    if done % render.occupancy_update_every:
        return False
    return None if done <= render.occupancy_warmup_steps else render.occupancy_cells_per_update


def refresh_occupancy(field: Any, done: int, render: RenderConfig, step_size: float,
                      generator: torch.Generator | None = None) -> bool:
    """Refresh ``field.occupancy`` from the field's density when the schedule says so (see
    :func:`occupancy_refresh_cells`); ``step_size`` is the marching step in the field's length
    unit.  Returns whether it refreshed."""
    n_cells = occupancy_refresh_cells(done, render)
    if n_cells is False:
        return False
    field.occupancy.update(lambda x: field.density(x)[0], step_size, render.occupancy_alpha_threshold,
                           render.occupancy_decay, n_cells, generator)
    return True


__all__ = ["WARMUP_START", "cosine_decay", "lr_factor", "occupancy_refresh_cells", "refresh_occupancy"]
