"""What the ``citygen edit`` subcommand does, flag by flag (the parsing itself is in cli.py)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CitygenError
from .bake import bake_tile
from .ops import OP_CLASSES
from .params import _kind, label_of
from .selection import SpecError, polygon_rings
from .stack import EditStack, stack_path


@dataclass
class EditFlags:
    """The flags of ``citygen edit TILE add`` (see cli.edit for their help)."""

    op: str | None = None
    classes: str | None = None
    polygon: Path | None = None
    polygon_crs: str = "tile"
    box: str | None = None
    height: str | None = None
    instance: str | None = None
    invert: bool = False
    dz: float | None = None
    factor: float | None = None
    color: str | None = None
    hsv: str | None = None
    offset: str | None = None
    rotate: float = 0.0
    pivot: str | None = None
    asset: str | None = None
    source_box: str | None = None
    anchor: str | None = None
    anchor_local: bool = False
    no_fill: bool = False
    params: str | None = None


def _numbers(text: str, n: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CitygenError(None, f"--{flag} needs {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise CitygenError(None, f"--{flag} needs {n} finite comma-separated numbers, got {text!r}")
    return values


def selection_from_flags(f: EditFlags) -> dict | None:
    """The selection the flags describe: the intersection of every selection flag given."""
    parts: list[dict] = []
    # `is not None` throughout: an empty flag value is an error, not "no selection" (everything)
    classes = [c.strip() for c in f.classes.split(",")] if f.classes is not None else None
    if f.instance is not None:
        if not classes or len(classes) != 1:
            raise CitygenError(None, "--instance X,Y needs exactly one --class")
        parts.append({"instance": {"class": classes[0], "point": _numbers(f.instance, 2, "instance")}})
    elif classes is not None:
        parts.append({"class": classes if len(classes) > 1 else classes[0]})
    if f.polygon is not None:
        try:
            geojson = json.loads(Path(f.polygon).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CitygenError(f.polygon, f"not a readable GeoJSON file ({err})") from None
        if f.polygon_crs not in ("tile", "lonlat", "local"):
            raise CitygenError(None, f"--polygon-crs must be tile, lonlat or local, got {f.polygon_crs!r}")
        try:
            polygon_rings(geojson)
        except SpecError as err:
            raise CitygenError(f.polygon, str(err)) from None
        parts.append({"polygon": geojson, "crs": f.polygon_crs})
    if f.box is not None:
        parts.append({"box": _numbers(f.box, 6, "box")})
    if f.height is not None:
        parts.append({"height": _numbers(f.height, 2, "height")})
    if not parts:
        sel = None
    else:
        sel = parts[0] if len(parts) == 1 else {"and": parts}
    if f.invert:
        sel = {"not": sel if sel is not None else {"all": True}}
    return sel


def _flag_name(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def params_from_flags(f: EditFlags) -> dict[str, Any]:
    """The operation's parameters from the flags (``--params JSON`` is merged last).  Which flag
    sets which parameter, and how, is declared by the operation (:mod:`citygen.edit.params`):
    a flag left at its default is not given; a list parameter's flag holds comma-separated numbers."""
    p: dict[str, Any] = {}
    cls = OP_CLASSES.get(f.op or "")
    declared = fields(cls.Params) if cls is not None else ()
    defaults = EditFlags()
    for fld in declared:
        m = fld.metadata
        flag = m.get("flag")
        if flag is None or (m["only_if"] and not getattr(f, m["only_if"])) or (m["unless"] and getattr(f, m["unless"])):
            continue
        value = getattr(f, flag)
        if value is None or value == getattr(defaults, flag):
            continue
        kind = _kind(fld)
        if m["invert"]:
            p[fld.name] = not value
        elif kind == "list[float]":
            p[fld.name] = _numbers(value, m["n"], _flag_name(flag).removeprefix("--"))
        else:
            p[fld.name] = value
    if f.params:
        try:
            extra = json.loads(f.params)
        except ValueError as err:
            raise CitygenError(None, f"--params is not JSON ({err})") from None
        if not isinstance(extra, dict):
            raise CitygenError(None, "--params must be a JSON object")
        p.update(extra)
    for fld in declared:  # a required parameter that has a flag: name the flag
        m = fld.metadata
        if fld.default is MISSING and fld.default_factory is MISSING and fld.name not in p and m.get("flag"):
            raise CitygenError(None, f"--op {f.op} needs {_flag_name(m['flag'])} {m['metavar']}".rstrip())
    return p


def _flags() -> list[tuple[str, str]]:
    """(text in a reason, the flag to name) pairs: the operations' declared flags (a parameter's
    label, the bracketed part dropped) between the fixed ones and the selection's."""
    pairs = [("unknown op", "--op"), ("unknown param", "--params")]
    for cls in OP_CLASSES.values():
        for fld in fields(cls.Params):
            if fld.metadata.get("flag") and not fld.metadata["invert"]:  # a switch cannot give a bad value
                key = (label_of(fld).split(" [")[0], _flag_name(fld.metadata["flag"]))
                if key not in pairs:
                    pairs.append(key)
    return pairs + [("box", "--box"), ("height range", "--height"), ("instance", "--instance"), ("class", "--class")]


def _flag_of(reason: str) -> str:
    return next((flag for key, flag in _flags() if key in reason), "edit add")


def describe(edit: dict) -> str:
    sel = json.dumps(edit.get("selection"))
    if len(sel) > 60:
        sel = sel[:57] + "..."
    params = json.dumps({k: v for k, v in edit.get("params", {}).items() if k not in ("transforms", "report")})
    if len(params) > 60:
        params = params[:57] + "..."
    return f"{edit['id']:<20} {edit['op']:<13} {'on ' if edit.get('enabled', True) else 'off'} {sel} {params}"


def run_edit(tile: Path, action: str, flags: EditFlags, edit_id: str | None = None, out: Path | None = None,
             steps: int = 500, as_json: bool = False) -> dict:
    """Carry out one ``citygen edit`` action; returns what to print as JSON."""
    tile = Path(tile)
    if not tile.is_dir():
        raise CitygenError(tile, "tile folder not found")
    stack = EditStack.load(tile)
    if action == "add":
        if flags.op is None:
            known = ", ".join(name for name, cls in OP_CLASSES.items() if cls.cli)
            raise CitygenError(None, f"edit add needs --op ({known})")
        if flags.op in OP_CLASSES and not OP_CLASSES[flags.op].cli:
            raise CitygenError(None, "use `citygen style` to add a restyle edit")
        try:
            edit = stack.add(flags.op, selection_from_flags(flags), params_from_flags(flags), edit_id=edit_id)
        except CitygenError as err:
            if err.path != stack_path(tile):
                raise  # it names its own file (the asset, the polygon)
            raise CitygenError(None, f"{_flag_of(err.reason)}: {err.reason}") from None
        stack.save()
        return {"added": edit["id"], "stack": str(stack_path(tile))}
    if action == "list":
        return {"edits": stack.edits, "undone": [e["id"] for e in stack.undone],
                "baked": [e["id"] for e in stack.baked]}
    if action in ("undo", "redo"):
        edit = stack.undo() if action == "undo" else stack.redo()
        stack.save()
        return {action: edit["id"]}
    if action in ("enable", "disable"):
        if not edit_id:
            raise CitygenError(None, f"edit {action} needs --id")
        stack.set_enabled(edit_id, action == "enable")
        stack.save()
        return {action: edit_id}
    if action == "bake":
        if out is None:
            raise CitygenError(None, "edit bake needs --out NEWTILE")
        return {"baked": str(out), "blocks": bake_tile(tile, out, steps=steps)}
    raise CitygenError(None, f"unknown edit action {action!r}")


__all__ = ["EditFlags", "describe", "params_from_flags", "run_edit", "selection_from_flags"]
