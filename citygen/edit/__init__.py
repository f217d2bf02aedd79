"""Semantic editing: non-destructive edits of a block's field, applied at render time.

::

    stack = EditStack.load(tile_dir)
    stack.add("remove", {"class": "vehicle"})
    stack.add("raise", {"and": [{"class": "building"}, {"polygon": geojson}]}, {"dz": 10})
    stack.save()
    edited = EditedField(field, stack, georef=georef)      # renders like the field
    renderer.field_wrapper = tile_field_wrapper(tile_dir)   # every renderer, every block
    bake_tile(tile_dir, out_dir, steps=2000)                 # edits folded into new weights

See :mod:`citygen.edit.ops` for what each operation does, :mod:`citygen.edit.selection` for
the selections and :mod:`citygen.edit.stack` for the file format.

Limits: a renderer that marches each block only inside the block's own box (the tile
renderer takes boxes from the checkpoints) clips matter an edit moves out of it (a building
raised above the box top); moved and inserted objects keep the view dependence of their
source direction (directions are rotated for inserts only); the wrapper reads the stack once,
so a renderer must be given a new wrapper (or ``clear_cache()``) after the stack changes.
Cost: the stack is applied in one loop over its edits, each edit only to the samples inside
its box (:mod:`citygen.edit.pipeline`), so a sample costs work per edit that can reach it
(mapping edits read their input a second time where they copy from); building an
:class:`EditedField` scans, per remove/raise edit, the surroundings of its selection (per
instance edit, the block) to find footprints; ``bake`` removes the per-sample cost.  Edits
are checked when added (:meth:`EditStack.add`): simple polygons, loadable insert assets.
"""

from .field import EditedField
from .ground import GroundHeight, PlaneGround, RasterGround, estimate_ground
from .selection import build_selection, validate_selection
from .stack import STACK_FILE, EditStack, validate_stack
from .tile import tile_blocks, tile_field_wrapper, tile_georef

__all__ = [
           "STACK_FILE",
           "EditStack",
           "EditedField",
           "GroundHeight",
           "PlaneGround",
           "RasterGround",
           "build_selection",
           "estimate_ground",
           "tile_blocks",
           "tile_field_wrapper",
           "tile_georef",
           "validate_selection",
           "validate_stack",
]
