"""Where a tile's blocks and georef are, and the field wrapper renderers apply.

A tile folder is either a tiled run (``plan.json`` plus ``block_<id>/checkpoints/`` per
trained block, as ``citygen train-tile`` writes it), or a single training run folder
(``checkpoints/`` directly, as ``citygen train`` writes it: one block, id ``"block"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import CitygenError
from ..train.checkpoint import list_checkpoints

SINGLE_BLOCK = "block"


def _has_checkpoint(folder: Path) -> bool:
    return bool(list_checkpoints(folder / "checkpoints") or list_checkpoints(folder))


def tile_blocks(tile_dir: str | Path) -> dict[str, Path]:
    """Block id -> block folder (a run folder with checkpoints) of a tile."""
    tile_dir = Path(tile_dir)
    if not tile_dir.is_dir():
        raise CitygenError(tile_dir, "tile folder not found")
    if list_checkpoints(tile_dir / "checkpoints"):
        return {SINGLE_BLOCK: tile_dir}
    blocks = {}
    if (tile_dir / "plan.json").is_file():
        from ..partition.plan import TilePlan
        from ..tile import block_dir

        for b in TilePlan.load(tile_dir / "plan.json").blocks:
            if _has_checkpoint(block_dir(tile_dir, b.id)):
                blocks[b.id] = block_dir(tile_dir, b.id)
    if not blocks:
        raise CitygenError(tile_dir, "no trained blocks in this tile (expected plan.json + block_<id>/checkpoints/, "
                                     "or a training run's checkpoints/)")
    return blocks


def tile_georef(tile_dir: str | Path):
    """The tile's georef: from ``plan.json``, else from a block checkpoint's sidecar; None if neither has one."""
    from survey_io import Georef

    from ..train.checkpoint import resolve_checkpoint

    tile_dir = Path(tile_dir)
    sources = [tile_dir / "plan.json"]
    try:
        sources += [resolve_checkpoint(p) for p in tile_blocks(tile_dir).values()]
    except CitygenError:
        pass
    for src in sources:
        if src.is_file():
            try:
                d = json.loads(src.read_text()).get("georef")
            except (OSError, ValueError, AttributeError):
                continue
            if d:
                return Georef.from_dict(d)
    return None


def tile_field_wrapper(tile_dir: str | Path, **kwargs) -> Callable:
    """``fn(block_id, field) -> EditedField`` applying the tile's edit stack (read once, now);
    what renderers set as ``field_wrapper``.  With no active edit the field is returned as is."""
    from .field import EditedField
    from .stack import EditStack

    tile_dir = Path(tile_dir)
    stack = EditStack.load(tile_dir)
    georef = tile_georef(tile_dir)

    def wrap(block_id: str, field):
        if not stack.active():
            return field
        return EditedField(field, stack, georef=georef, tile_dir=tile_dir, block_id=block_id, **kwargs)

    return wrap


__all__ = ["SINGLE_BLOCK", "tile_blocks", "tile_field_wrapper", "tile_georef"]
