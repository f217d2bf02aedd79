"""A tile opened as edited: the field wrapper that applies the tile's edit stack.

Where a tile's blocks and georef are is :mod:`citygen.store.layout`'s (one rule for every
reader); this module adds the edit layer on top and registers it with the renderer, so that
``TileRenderer.open`` applies a tile's stack without the renderer importing the editor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import CitygenError
from ..render.tile import register_edit_opener
from ..store import layout
from ..store.layout import SINGLE_BLOCK, tile_georef
from .field import EditedField
from .stack import EditStack


def tile_blocks(tile_dir: str | Path) -> dict[str, Path]:
    """Block id -> block run folder (holding a checkpoint) of a tile, in plan order."""
    tile_dir = Path(tile_dir)
    if not tile_dir.is_dir():
        raise CitygenError(tile_dir, "tile folder not found")
    blocks = {}
    if (tile_dir / layout.PLAN_FILE).is_file() or layout.is_single_run(tile_dir):
        blocks = layout.discover(tile_dir).trained
    if not blocks:
        raise CitygenError(tile_dir, "no trained blocks in this tile (expected plan.json + block_<id>/checkpoints/, "
                                     "or a training run's checkpoints/)")
    return blocks


def tile_field_wrapper(tile_dir: str | Path, **kwargs) -> Callable:
    """``fn(block_id, field) -> EditedField`` applying the tile's edit stack (read once, now);
    what renderers set as ``field_wrapper``.  With no active edit the field is returned as is."""
    tile_dir = Path(tile_dir)
    stack = EditStack.load(tile_dir)
    georef = tile_georef(tile_dir)

    def wrap(block_id: str, field):
        if not stack.active():
            return field
        return EditedField(field, stack, georef=georef, tile_dir=tile_dir, block_id=block_id, **kwargs)

    return wrap


register_edit_opener(tile_field_wrapper)

__all__ = ["SINGLE_BLOCK", "tile_blocks", "tile_field_wrapper", "tile_georef"]
