"""Storage below the renderer: the checkpoint format (:mod:`.checkpoint`), a block's field as
trained (:mod:`.field`: ``load_field``), and the tile layout on disk (:mod:`.layout`: the one
owner of where a tile's plan, blocks, checkpoints, records, edits and locks are).

Imports only :mod:`citygen.fields`, the partition's plan and the scheduler's file names, so that
render, train, edit, style, export and the viewer can all read tiles without importing each other.
"""

from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .field import build_field, load_field
from .layout import LAYOUT_VERSION, TileBlocks, discover, open_block_field, read_tile_config, tile_georef

__all__ = ["LAYOUT_VERSION", "TileBlocks", "build_field", "discover", "list_checkpoints", "load_checkpoint",
           "load_field", "open_block_field", "read_tile_config", "resolve_checkpoint", "save_checkpoint",
           "tile_georef"]
