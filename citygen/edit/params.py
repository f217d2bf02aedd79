"""Declared edit parameters: each operation's parameters are one dataclass (names, types,
defaults and ranges written once), and everything else is derived from it: the check of an
edit's ``params`` (unknown keys, types, required keys, ranges), the typed values an operation
reads, and how ``citygen edit add`` flags fill them in (:mod:`citygen.edit.commands`).

::

    @dataclass(kw_only=True)
    class Params:
        dz: float = param(lo=-1000, hi=1000, flag="dz", metavar="METRES", help="metres up")
        base: float = param(1.0, lo=0, hi=100)

Types, read from the annotation: ``bool``, ``float``, ``str`` (``path=True``: a relative path
inside the tile folder), ``list[float]`` (``n`` numbers), ``list[list[float]]`` and ``dict``
(checked by the operation's own ``check`` hook).  A field without a default is required; a
field whose default is ``None`` is optional (absent and ``null`` read the same).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .selection import SpecError, _finite


def param(default: Any = MISSING, *, lo: float = -math.inf, hi: float = math.inf, n: int | None = None,
          label: str | None = None, path: bool = False, flag: str | None = None, metavar: str = "",
          only_if: str | None = None, unless: str | None = None, invert: bool = False, help: str = "") -> Any:
    """One declared parameter.  ``lo``/``hi``: the range of a number; ``n``: the length of a
    list; ``label``: how messages name it (default ``param 'name'``); ``flag``: the
    :class:`~citygen.edit.commands.EditFlags` attribute that sets it from the command line
    (``only_if`` / ``unless``: only when that boolean flag is / is not set; ``invert``: a
    boolean flag that sets the parameter to false); ``help``: what it does."""
    meta = dict(lo=lo, hi=hi, n=n, label=label, path=path, flag=flag, metavar=metavar, only_if=only_if,
                unless=unless, invert=invert, help=help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "").removesuffix("|None")
    if t not in ("bool", "float", "str", "list[float]", "list[list[float]]", "dict"):
        raise TypeError(f"edit parameter {f.name}: unsupported type {f.type!r}")
    return t


def label_of(f: dataclasses.Field) -> str:
    return f.metadata.get("label") or f"param {f.name!r}"


def check_value(f: dataclasses.Field, v: Any) -> None:
    """One declared parameter's value: its type, length and range (SpecError otherwise)."""
    kind, m, what = _kind(f), f.metadata, label_of(f)
    if kind == "bool":
        if not isinstance(v, bool):
            raise SpecError(f"{what} must be true or false, got {v!r}")
    elif kind == "float":
        (x,) = _finite([v], what)
        if not m["lo"] <= x <= m["hi"]:
            raise SpecError(f"{what} = {x} is outside [{m['lo']:g}, {m['hi']:g}]")
    elif kind == "list[float]":
        _finite(v, what, m["n"])
    elif kind == "list[list[float]]":
        if not isinstance(v, list) or (m["n"] is not None and len(v) != m["n"]):
            raise SpecError(f"{what} must be {m['n']} rows of numbers")
        for row in v:
            _finite(row, f"{what} row", m["n"])
    elif kind == "str":
        if m["path"]:
            safe_relative_path(v, what)
        elif not isinstance(v, str):
            raise SpecError(f"{what} must be a string, got {v!r}"[:200])
    elif kind == "dict" and not isinstance(v, dict):
        raise SpecError(f"{what} must be an object")


def check_params(op: str, spec: type, params: Any, open_keys: bool = False) -> None:
    """``params`` against the dataclass ``spec``: no unknown keys (unless ``open_keys``: the op
    keeps other keys for the record), required keys present, each value well formed."""
    if not isinstance(params, dict):
        raise SpecError("params must be an object")
    declared = {f.name: f for f in fields(spec)}
    unknown = sorted(set(params) - set(declared))
    if unknown and not open_keys:  # a misspelt parameter would silently fall back to its default
        raise SpecError(f"unknown param {', '.join(map(repr, unknown))} for {op} "
                        f"(known: {', '.join(sorted(declared))})")
    for f in declared.values():
        if f.name not in params or (params[f.name] is None and f.default is None):
            if f.default is MISSING and f.default_factory is MISSING:
                raise SpecError(f"param {f.name!r} is required")
            continue
        check_value(f, params[f.name])


def parse_params(spec: type, params: dict) -> Any:
    """The typed values (defaults filled in) of checked ``params``."""
    return spec(**{f.name: params[f.name] for f in fields(spec) if params.get(f.name) is not None})


def safe_relative_path(value: Any, what: str) -> str:
    """A path inside the tile folder: relative, no '..', no drive or root (SpecError otherwise)."""
    if not isinstance(value, str) or not value:
        raise SpecError(f"{what} must be a relative path string")
    p = Path(value)
    if p.is_absolute() or value.startswith(("/", "\\")) or ".." in p.parts or ":" in value or "\\" in value:
        raise SpecError(f"{what} {value!r} escapes the tile folder (give a relative path inside it)")
    return value


__all__ = ["check_params", "check_value", "dataclass", "label_of", "param", "parse_params", "safe_relative_path"]
