"""The edit stack: a versioned JSON file beside the tile, ``TILE/edits.json``::

    {"version": 1,
     "ground": {"kind": "field"},                          # optional: plane | raster | field
     "edits":  [{"id": "e1", "op": "remove", "selection": {"class": "vehicle"},
                 "params": {"fill_ground": true}, "enabled": true}, ...],
     "undone": [...edits popped by undo, newest last...],
     "baked":  [...edits folded into the weights by `bake`, for the record...]}

Edits are applied in order at render time (:class:`~citygen.edit.field.EditedField`);
``undo`` moves the newest edit to ``undone``, ``redo`` moves it back, and adding an edit
clears ``undone``.  Every load validates the whole file: a malformed or unsafe stack (wrong
version, unknown op, bad polygon, non-finite or absurd numbers, paths escaping the tile
folder, duplicate ids) is a :class:`CitygenError` naming the file and the problem.  Writes
are atomic.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

from survey_io.atomic import atomic_write_json

from ..errors import CitygenError
from ..store.field import load_field
from ..store.layout import STACK_FILE, stack_path
from .ops import OPS, resolve_in_tile, safe_relative_path, validate_params
from .selection import SpecError, validate_selection

STACK_VERSION = 1
MAX_EDITS = 10_000
MAX_BYTES = 64 << 20
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _reject_constants(name: str):
    raise ValueError(f"non-finite number {name} is not allowed")


def validate_edit(edit: Any) -> None:
    """Check one edit's JSON (SpecError on any problem)."""
    if not isinstance(edit, dict):
        raise SpecError("an edit must be an object")
    unknown = set(edit) - {"id", "op", "selection", "params", "enabled", "note"}
    if unknown:
        raise SpecError(f"unknown edit keys {sorted(unknown)}")
    if not isinstance(edit.get("id"), str) or not _ID.match(edit["id"]):
        raise SpecError(f"edit id must match {_ID.pattern}, got {edit.get('id')!r}")
    if edit.get("op") not in OPS:
        raise SpecError(f"unknown op {edit.get('op')!r} (known: {', '.join(OPS)})")
    if not isinstance(edit.get("enabled", True), bool):
        raise SpecError("'enabled' must be true or false")
    validate_selection(edit.get("selection"))
    validate_params(edit["op"], edit.get("params", {}))


def validate_stack(data: Any) -> None:
    """Check a whole stack document (SpecError on any problem)."""
    if not isinstance(data, dict):
        raise SpecError("the edit stack must be a JSON object")
    if data.get("version") != STACK_VERSION:
        raise SpecError(f"unsupported edit stack version {data.get('version')!r} (this citygen reads {STACK_VERSION})")
    unknown = set(data) - {"version", "edits", "undone", "baked", "ground"}
    if unknown:
        raise SpecError(f"unknown top-level keys {sorted(unknown)}")
    ids = set()
    for key in ("edits", "undone", "baked"):
        items = data.get(key, [])
        if not isinstance(items, list):
            raise SpecError(f"'{key}' must be a list")
        if len(items) > MAX_EDITS:
            raise SpecError(f"'{key}' holds {len(items)} edits (limit {MAX_EDITS})")
        for i, edit in enumerate(items):
            try:
                validate_edit(edit)
            except SpecError as err:
                raise SpecError(f"{key}[{i}] (id {edit.get('id') if isinstance(edit, dict) else None!r}): {err}") from None
            if edit["id"] in ids:
                raise SpecError(f"duplicate edit id {edit['id']!r}")
            ids.add(edit["id"])
    ground = data.get("ground")
    if ground is not None:
        if not isinstance(ground, dict) or ground.get("kind") not in ("plane", "raster", "field"):
            raise SpecError("'ground' must be {'kind': 'plane'|'raster'|'field', ...}")
        if ground["kind"] == "plane":
            h = ground.get("height")
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or abs(h) > 1e4:
                raise SpecError("ground plane needs a finite 'height' within +-10 km")
        if ground["kind"] == "raster":
            safe_relative_path(ground.get("path"), "ground raster")


def check_asset(tile_dir: str | Path, rel: str) -> None:
    """An insert's asset must be a loadable field checkpoint inside the tile folder: checked
    when the edit is added, not first at render time (CitygenError naming the asset)."""
    try:
        path = resolve_in_tile(Path(tile_dir), rel)
    except SpecError as err:
        raise CitygenError(Path(tile_dir) / rel, f"insert asset: {err}") from None
    if not path.exists():
        raise CitygenError(path, "insert asset not found (a checkpoint or run folder inside the tile)")
    try:
        load_field(path)
    except CitygenError as err:
        raise CitygenError(err.path or path, f"insert asset {rel!r}: {err.reason}") from None
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CitygenError(path, f"insert asset {rel!r} is not a loadable citygen checkpoint "
                                 f"({type(err).__name__}: {err})") from None


class EditStack:
    """An edit stack in memory; :meth:`load` / :meth:`save` read and write ``TILE/edits.json``."""

    def __init__(self, edits: list[dict] | None = None, undone: list[dict] | None = None,
                 baked: list[dict] | None = None, ground: dict | None = None, tile_dir: str | Path | None = None):
        self.edits = list(edits or [])
        self.undone = list(undone or [])
        self.baked = list(baked or [])
        self.ground = ground
        self.tile_dir = None if tile_dir is None else Path(tile_dir)

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, tile_dir: str | Path, missing_ok: bool = True) -> EditStack:
        """The stack of a tile (an empty one when the tile has no ``edits.json`` yet)."""
        path = stack_path(tile_dir)
        if not path.exists():
            if missing_ok:
                return cls(tile_dir=tile_dir)
            raise CitygenError(path, "no edit stack")
        return cls.from_file(path, tile_dir)

    @classmethod
    def from_file(cls, path: str | Path, tile_dir: str | Path | None = None) -> EditStack:
        path = Path(path)
        try:
            if path.stat().st_size > MAX_BYTES:
                raise CitygenError(path, f"edit stack larger than {MAX_BYTES >> 20} MiB")
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constants)
        except CitygenError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CitygenError(path, f"edit stack is not valid JSON ({err})") from None
        return cls.from_dict(data, path, tile_dir if tile_dir is not None else path.parent)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None, tile_dir: str | Path | None = None) -> EditStack:
        try:
            validate_stack(data)
        except SpecError as err:
            raise CitygenError(source, f"invalid edit stack: {err}") from None
        return cls(copy.deepcopy(data.get("edits", [])), copy.deepcopy(data.get("undone", [])),
                   copy.deepcopy(data.get("baked", [])), data.get("ground"), tile_dir)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"version": STACK_VERSION, "edits": self.edits, "undone": self.undone}
        if self.baked:
            d["baked"] = self.baked
        if self.ground is not None:
            d["ground"] = self.ground
        return d

    def save(self, tile_dir: str | Path | None = None) -> Path:
        """Validate and write ``edits.json`` atomically; returns its path."""
        tile_dir = Path(tile_dir) if tile_dir is not None else self.tile_dir
        if tile_dir is None:
            raise CitygenError(None, "edit stack: no tile folder to save into")
        path = stack_path(tile_dir)
        try:
            validate_stack(self.to_dict())
        except SpecError as err:
            raise CitygenError(path, f"refusing to write an invalid edit stack: {err}") from None
        atomic_write_json(path, self.to_dict())
        return path

    # -- editing ---------------------------------------------------------------------------------
    def new_id(self, op: str) -> str:
        taken = {e["id"] for e in self.edits + self.undone + self.baked}
        n = len(taken) + 1
        while f"e{n}_{op}" in taken:
            n += 1
        return f"e{n}_{op}"

    def add(self, op: str, selection: dict | None = None, params: dict | None = None, *, edit_id: str | None = None,
            enabled: bool = True, note: str | None = None) -> dict:
        """Append a validated edit (clears the redo list); returns it."""
        edit = {"id": edit_id or self.new_id(op), "op": op, "selection": selection, "params": params or {},
                "enabled": enabled}
        if note:
            edit["note"] = note
        try:
            validate_edit(edit)
            if edit["id"] in {e["id"] for e in self.edits + self.undone + self.baked}:
                raise SpecError(f"duplicate edit id {edit['id']!r}")
        except SpecError as err:
            raise CitygenError(stack_path(self.tile_dir) if self.tile_dir else None, f"edit {edit['id']}: {err}") from None
        if op == "insert" and self.tile_dir is not None:
            check_asset(self.tile_dir, edit["params"]["asset"])
        self.edits.append(edit)
        self.undone.clear()
        return edit

    def undo(self) -> dict:
        if not self.edits:
            raise CitygenError(self._path(), "nothing to undo")
        edit = self.edits.pop()
        self.undone.append(edit)
        return edit

    def redo(self) -> dict:
        if not self.undone:
            raise CitygenError(self._path(), "nothing to redo")
        edit = self.undone.pop()
        self.edits.append(edit)
        return edit

    def set_enabled(self, edit_id: str, enabled: bool) -> dict:
        for e in self.edits:
            if e["id"] == edit_id:
                e["enabled"] = enabled
                return e
        raise CitygenError(self._path(), f"no edit {edit_id!r} in the stack")

    def active(self) -> list[dict]:
        return [e for e in self.edits if e.get("enabled", True)]

    def _path(self):
        return stack_path(self.tile_dir) if self.tile_dir else None


__all__ = ["STACK_FILE", "STACK_VERSION", "EditStack", "check_asset", "stack_path", "validate_edit", "validate_stack"]
