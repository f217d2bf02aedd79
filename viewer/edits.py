"""Live edit and style toggles: the tile's edit stack on or off, and one style picked from
none / the named styles / the styles stored on the tile, switched while the viewer runs.

:class:`LiveEdits` installs itself as the tile renderer's ``field_wrapper`` once.  Each
block the renderer loads is wrapped in a :class:`SwitchedField` that asks the toggles, at
every call, which field to show: the block's own field, or an
:class:`~citygen.edit.EditedField` of the edits in force.  The edited fields are built on
first use per state and kept, so switching back and forth re-renders without reloading
blocks or rescanning footprints; the viewer only has to start a new render pass.

What is toggled:

* **edits**: the stack's enabled edits other than ``restyle`` ones (removals, recolours,
  raised or inserted matter ...), on or off together, in stack order;
* **style**: at most one ``restyle`` edit applied after them: ``none``, a named style
  (:data:`citygen.style.NAMED_STYLES`, on every class, built in memory: nothing is written
  to the tile), or one of the enabled ``restyle`` edits stored in the tile's stack
  (``tile:<edit id>``).  A tile opens as it renders by default: edits on, and its newest
  stored style when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citygen.edit import EditedField, EditStack
from citygen.errors import CitygenError
from citygen.style import NAMED_STYLES, named_style


@dataclass(frozen=True)
class StyleChoice:
    """One entry of the style cycle: a name for the HUD and the ``restyle`` edit (None: no style)."""

    name: str
    edit: dict | None


def named_style_edit(name: str) -> dict:
    """The ``restyle`` edit of a named style on every class (not stored anywhere)."""
    return {"id": f"view_style_{name}", "op": "restyle", "selection": None,
            "params": {"method": "named", "name": name, "transforms": named_style(name)}, "enabled": True}


class LiveEdits:
    """Edit/style state of a viewer and the field wrapper that applies it.

    Args:
        renderer: a :class:`~citygen.render.tile.TileRenderer` (its ``field_wrapper`` is replaced).
        stack: the tile's edit stack (:meth:`EditStack.load`); its ``ground`` entry and
            ``tile_dir`` are used to build the edited fields.
        georef: the tile's georef (polygon selections in CRS or lon/lat need it).
        named: the named styles offered, in cycle order.
        field_kwargs: passed on to :class:`~citygen.edit.EditedField` (``raster_cell``, ``ground`` ...).
    """

    def __init__(self, renderer, stack: EditStack, georef=None, named: tuple[str, ...] = tuple(NAMED_STYLES),
                 **field_kwargs):
        self.renderer = renderer
        self.stack = stack
        self.georef = georef if georef is not None else getattr(renderer, "georef", None)
        self.field_kwargs = field_kwargs
        active = stack.active()
        self.edits = [e for e in active if e["op"] != "restyle"]
        stored = [StyleChoice(f"tile:{e['id']}", e) for e in active if e["op"] == "restyle"]
        self.styles = [StyleChoice("none", None)] + [StyleChoice(n, named_style_edit(n)) for n in named] + stored
        self.edits_on = True
        self.style_index = len(self.styles) - 1 if stored else 0
        renderer.field_wrapper = self.wrap

    # -- state ----------------------------------------------------------------------------------
    @property
    def style(self) -> StyleChoice:
        return self.styles[self.style_index]

    @property
    def state(self) -> tuple[bool, int]:
        """A hashable summary of what is applied (the key of the edited-field caches)."""
        return self.edits_on and bool(self.edits), self.style_index

    def active_edits(self) -> list[dict]:
        """The edits in force now, in the order they apply."""
        out = list(self.edits) if self.edits_on else []
        if self.style.edit is not None:
            out.append(self.style.edit)
        return out

    def toggle_edits(self) -> bool:
        """Edits on <-> off; returns the new setting."""
        self.edits_on = not self.edits_on
        return self.edits_on

    def next_style(self, step: int = 1) -> StyleChoice:
        """Move ``step`` entries along the style cycle (wrapping); returns the new style."""
        self.style_index = (self.style_index + step) % len(self.styles)
        return self.style

    def set_style(self, name: str) -> StyleChoice:
        """Pick a style by its cycle name (``none``, a named style, ``tile:<id>``)."""
        names = [s.name for s in self.styles]
        if name not in names:
            raise CitygenError(None, f"unknown style {name!r} (offered: {', '.join(names)})")
        self.style_index = names.index(name)
        return self.style

    def describe(self) -> str:
        """The HUD's edit line."""
        if self.edits:
            edits = f"edits {'on' if self.edits_on else 'off'} ({len(self.edits)})"
        else:
            edits = "no edits"
        return f"{edits}  style {self.style.name} [t: edits, c: style]"

    # -- the renderer's field wrapper ---------------------------------------------------------------
    def wrap(self, block_id: str, field) -> SwitchedField:
        return SwitchedField(self, block_id, field)

    def build(self, block_id: str, field) -> Any:
        """The field to show for the current state (``field`` itself when nothing applies)."""
        edits = self.active_edits()
        if not edits:
            return field
        stack = EditStack(edits=edits, ground=self.stack.ground, tile_dir=self.stack.tile_dir)
        return EditedField(field, stack, georef=self.georef, block_id=block_id, **self.field_kwargs)


class SwitchedField:
    """One block's field as the renderer sees it: forwards every call to the variant the
    toggles select now (built on first use, then cached per state)."""

    def __init__(self, live: LiveEdits, block_id: str, field):
        self.live, self.block_id, self.field = live, block_id, field
        self._variants: dict[tuple[bool, int], Any] = {}

    @property
    def current(self) -> Any:
        key = self.live.state
        if key not in self._variants:
            self._variants[key] = self.live.build(self.block_id, self.field)
        return self._variants[key]

    # what the tile renderer calls on a wrapped field
    @property
    def aabb(self):
        return self.current.aabb

    @property
    def n_classes(self) -> int:
        return int(self.field.n_classes)

    @property
    def occupancy(self):
        return getattr(self.current, "occupancy", None)

    @property
    def background_semantics(self):
        return self.current.background_semantics

    def background(self, dirs):
        return self.current.background(dirs)

    def __call__(self, x, dirs, appearance, ray_index=None, with_semantics: bool = True):
        return self.current(x, dirs, appearance, ray_index=ray_index, with_semantics=with_semantics)


def live_edits_for_tile(renderer, tile_dir: str | Path, **kwargs) -> LiveEdits:
    """:class:`LiveEdits` over the stack in ``tile_dir`` (an empty stack when it has none)."""
    return LiveEdits(renderer, EditStack.load(tile_dir), **kwargs)


__all__ = ["LiveEdits", "StyleChoice", "SwitchedField", "live_edits_for_tile", "named_style_edit"]
