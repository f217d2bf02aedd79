"""What the exporters render from: anything that answers rays (a :class:`RaySource`).

The tile renderer (``citygen.render.tile.TileRenderer``) is one; tests use analytic scenes
with the same surface.  Exporters only ever shoot rays, so they need nothing else from it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from survey_io import Georef

from ..errors import CitygenError

#: Rays per ``render_rays`` call: large enough to keep a GPU busy, small enough for CPU memory.
DEFAULT_CHUNK = 1 << 16


@runtime_checkable
class RaySource(Protocol):
    """A georeferenced scene that renders rays in the tile's local frame.

    Attributes:
        georef: the tile's CRS and local origin.
        classes: semantic class names, by id (the columns of ``semantics``).
        bounds: (2, 3) local-frame min / max xyz of the scene.
    """

    georef: Georef
    classes: tuple[str, ...]
    bounds: np.ndarray

    def render_rays(self, origins: Tensor, dirs: Tensor, appearance=None) -> dict[str, Tensor]:
        """``rgb`` (N, 3) in [0, 1], ``distance`` (N,) expected hit distance along the unit
        direction (metres), ``acc`` (N,) opacity, ``semantics`` (N, C) logits."""
        ...


def source_device(source: RaySource) -> torch.device:
    """The device rays should be made on (the source's ``device`` attribute, else CPU)."""
    return torch.device(getattr(source, "device", "cpu"))


def check_source(source: RaySource, where=None) -> np.ndarray:
    """Validate the parts of ``source`` the exporters rely on; return its bounds as (2, 3) float64."""
    bounds = np.asarray(source.bounds, dtype=np.float64)
    if bounds.shape != (2, 3) or not np.all(np.isfinite(bounds)) or np.any(bounds[1] <= bounds[0]):
        raise CitygenError(where, f"scene bounds must be (2, 3) finite min/max with max > min, got {bounds.tolist()}")
    if not isinstance(source.georef, Georef):
        raise CitygenError(where, "scene has no georef: exports must be placed in a CRS")
    return bounds


@torch.no_grad()
def render_in_chunks(source: RaySource, origins: Tensor, dirs: Tensor, *, chunk: int = DEFAULT_CHUNK,
                     keys: tuple[str, ...] = ("rgb", "distance", "acc", "semantics"),
                     progress=None) -> dict[str, np.ndarray]:
    """Render (N, 3) rays ``chunk`` at a time; return the requested outputs as numpy (float32).

    ``progress`` is an optional callable taking the number of rays just finished.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = origins.shape[0]
    out: dict[str, np.ndarray] = {}
    for i in range(0, n, chunk):
        result = source.render_rays(origins[i:i + chunk], dirs[i:i + chunk])
        for key in keys:
            if key not in result:
                continue
            value = result[key].detach().float().cpu().numpy()
            if key not in out:
                out[key] = np.empty((n, *value.shape[1:]), np.float32)
            out[key][i:i + chunk] = value
        if progress is not None:
            progress(min(chunk, n - i))
    return out


class RayProgress:
    """A rich progress bar over rays (silent when disabled), used as a context manager.

    Example::

        with RayProgress("ortho", total=n, enabled=True) as advance:
            render_in_chunks(source, o, d, progress=advance)
    """

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.description, self.total, self.enabled = description, total, enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return lambda k: None

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), transient=True)
        self._progress.__enter__()
        self._task = self._progress.add_task(self.description, total=self.total)
        return lambda k: self._progress.advance(self._task, k)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
