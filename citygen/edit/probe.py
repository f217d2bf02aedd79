"""How much of each pixel an edit stack may rightly change: the weight the *unedited* ray
puts on samples the stack selects.

:class:`SelectionProbe` renders like the unedited field (same density, so the same
quadrature weights), but its colour is the indicator of :meth:`EditedField.selected` and its
background is black.  Rendered, the red channel of a pixel is ``sum_k w_k [x_k selected]``:
the share of the unedited ray's opacity spent on selected matter (0 for a ray that never
meets the selection, ~1 for one stopped by it).  A pixel is *outside the selection* when
that share is below a small threshold: its unedited colour does not come from anything the
edit acts on, so a faithful edit leaves it unchanged.  This is a 3-D, ray-based definition:
it counts an oblique ray grazing a wall, or a ray through a building's semi-transparent
fringe, as touched, whatever class the 2-D label map gives that pixel.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..store.layout import tile_georef
from .field import EditedField
from .stack import EditStack


class SelectionProbe(nn.Module):
    """The unedited field of ``edited`` with colour = "selected by the stack" (1 or 0)."""

    def __init__(self, edited: EditedField):
        super().__init__()
        field = edited.field
        # registered before `edited`: attribute lookups fall back to the field (see __getattr__)
        self.register_buffer("aabb", field.aabb.detach().float().clone())
        self.edited = edited
        self.n_classes = int(field.n_classes)
        # occupancy (the unedited grid), background_semantics, appearance: the field's (__getattr__)

    def __getattr__(self, name):
        # appearance lookups and the like: the unedited field's
        try:
            return super().__getattr__(name)
        except AttributeError:
            edited = self.__dict__.get("_modules", {}).get("edited")
            if edited is None or name.startswith("__"):
                raise
            return getattr(edited.field, name)

    def forward(self, x: Tensor, dirs: Tensor, appearance: Tensor, ray_index: Tensor | None = None,
                with_semantics: bool = True) -> dict[str, Tensor]:
        field = self.edited.field
        lo, hi = field.aabb[0].to(x), field.aabb[1].to(x)
        sigma, geo = field.density(x)
        sigma = torch.where(((x >= lo) & (x <= hi)).all(-1), sigma.float(), torch.zeros((), device=x.device))
        sel = self.edited.selected(x).float()
        out = {"sigma": sigma, "rgb": sel[:, None].expand(-1, 3)}
        if with_semantics:
            out["semantics"] = field.semantics(geo).float()
        return out

    def background(self, dirs: Tensor) -> Tensor:
        return torch.zeros(dirs.shape[0], 3, device=dirs.device)


def selection_probe_wrapper(tile_dir: str | Path, **kwargs):
    """``fn(block_id, field) -> SelectionProbe`` for the tile's edit stack (a renderer's
    ``field_wrapper``); with no active edit, every sample is unselected."""
    tile_dir = Path(tile_dir)
    stack = EditStack.load(tile_dir)
    georef = tile_georef(tile_dir)

    def wrap(block_id: str, field):
        return SelectionProbe(EditedField(field, stack, georef=georef, tile_dir=tile_dir, block_id=block_id, **kwargs))

    return wrap


@torch.no_grad()
def selection_weight(renderer, tile_dir: str | Path, camera, c2w, **kwargs) -> Tensor:
    """(H, W): per pixel, the share of the unedited ray's opacity that falls on samples the
    tile's edit stack selects.  ``renderer`` is a :class:`~citygen.render.tile.TileRenderer`;
    its field wrapper and background colour are restored afterwards."""
    saved_wrapper, saved_bg = renderer.field_wrapper, renderer.background_color
    try:
        renderer.background_color = None
        renderer.field_wrapper = selection_probe_wrapper(tile_dir, **kwargs)
        return renderer.render_view(camera, c2w)["rgb"][..., 0].clamp(0.0, 1.0)
    finally:
        renderer.background_color = saved_bg
        renderer.field_wrapper = saved_wrapper


__all__ = ["SelectionProbe", "selection_probe_wrapper", "selection_weight"]
