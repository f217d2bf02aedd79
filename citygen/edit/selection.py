"""Selections: which 3-D samples an edit acts on.

A selection is evaluated per sample at local positions ``x`` (N, 3), with the field's
semantic argmax ``labels`` (N,) there.  Kinds (JSON, as stored in the edit stack)::

    {"all": true}                                     everything
    {"class": "vehicle"} / {"class": ["building", 5]} semantic class(es), by name or id
    {"box": [x0, y0, z0, x1, y1, z1]}                 box in the local frame (metres)
    {"polygon": <GeoJSON>, "crs": "tile"|"lonlat"}    (Multi)Polygon / Feature(Collection) in the
                                                      tile's CRS (default) or lon/lat; a vertical prism
    {"height": [h0, h1]}                              height above the ground model, metres
    {"instance": {"class": "building", "point": [x, y], "crs": "local"|"tile"|"lonlat"}}
                                                      the connected component of that class's 2-D
                                                      occupancy raster under a clicked point
    {"and": [...]}, {"or": [...]}, {"not": {...}}    composition

``bound(x)`` is a conservative superset that needs no labels (class tests count as
"maybe"): it sizes occupancy grids and skips field queries.  ``box()`` is an axis-aligned
box holding ``bound`` (or None where it is unbounded): the edit pipeline skips an edit, at
no cost, for the samples outside it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from shapely.geometry import Polygon
from shapely.validation import explain_validity
from torch import Tensor

from survey_io.semantics import CLASSES

from .raster import Raster2D, component_at, dilate, raster_box

#: Limits that flag a corrupt or hostile stack rather than an ambitious edit.
MAX_COORD = 1e8           # |CRS coordinate|, metres
MAX_EXTENT = 1e6          # local extent of a polygon or box side, metres
MAX_VERTICES = 200_000
MAX_DEPTH = 16            # nesting of and/or/not


class SpecError(ValueError):
    """A malformed edit or selection (the stack loader adds the file and the edit id)."""


def _finite(values, what: str, n: int | None = None) -> list[float]:
    if not isinstance(values, (list, tuple)) or (n is not None and len(values) != n):
        raise SpecError(f"{what} must be a list of {n if n is not None else 'some'} numbers, got {values!r}"[:200])
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{what} must hold numbers, got {v!r}"[:200])
        if not math.isfinite(float(v)):
            raise SpecError(f"{what} holds a non-finite value ({v})")
        out.append(float(v))
    return out


def class_ids(value: Any, classes: tuple[str, ...] = CLASSES) -> list[int]:
    """Class names or ids -> ids (SpecError for unknown ones)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise SpecError("class selection names no class")
    ids = []
    for item in items:
        if isinstance(item, bool):
            raise SpecError(f"unknown class {item!r}")
        if isinstance(item, int) and 0 <= item < len(classes):
            ids.append(item)
        elif isinstance(item, str) and item in classes:
            ids.append(classes.index(item))
        else:
            raise SpecError(f"unknown class {item!r} (known: {', '.join(classes)})")
    return ids


def polygon_rings(geojson: Any) -> list[list[list[list[float]]]]:
    """Polygons (each a list of rings of [x, y]) of a GeoJSON Polygon/MultiPolygon/Feature/
    FeatureCollection; SpecError for anything else or a degenerate ring."""
    if not isinstance(geojson, dict):
        raise SpecError("polygon must be a GeoJSON object")
    kind = geojson.get("type")
    if kind == "FeatureCollection":
        feats = geojson.get("features")
        if not isinstance(feats, list) or not feats:
            raise SpecError("polygon FeatureCollection has no features")
        return [p for f in feats for p in polygon_rings(f)]
    if kind == "Feature":
        return polygon_rings(geojson.get("geometry"))
    coords = geojson.get("coordinates")
    if kind == "Polygon":
        polys = [coords]
    elif kind == "MultiPolygon":
        polys = coords if isinstance(coords, list) else None
    else:
        raise SpecError(f"polygon: unsupported GeoJSON type {kind!r} (Polygon, MultiPolygon, Feature, FeatureCollection)")
    if not isinstance(polys, list) or not polys:
        raise SpecError("polygon has no coordinates")
    out, n_vertices = [], 0
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise SpecError("polygon has no rings")
        rings = []
        for ring in poly:
            if not isinstance(ring, list):
                raise SpecError("polygon ring must be a list of positions")
            pts = [_finite(p[:2] if isinstance(p, list) else p, "polygon position", 2) for p in ring]
            if any(abs(c) > MAX_COORD for p in pts for c in p):
                raise SpecError(f"polygon coordinate beyond {MAX_COORD:g} m: not a projected CRS position")
            if len(pts) > 1 and pts[0] == pts[-1]:
                pts = pts[:-1]
            if len({tuple(p) for p in pts}) < 3:
                raise SpecError("polygon ring needs at least 3 distinct vertices")
            n_vertices += len(pts)
            rings.append(pts)
        out.append(rings)
    if n_vertices > MAX_VERTICES:
        raise SpecError(f"polygon has {n_vertices} vertices (limit {MAX_VERTICES})")
    for i, rings in enumerate(out):
        _check_simple(rings, f"polygon {i + 1} of {len(out)}" if len(out) > 1 else "polygon")
    return out


_WHERE = re.compile(r"^(?P<what>.*?)\s*\[(?P<x>\S+) (?P<y>\S+)\]$")


def _check_simple(rings: list[list[list[float]]], what: str) -> None:
    """A polygon must be valid in the OGC sense (shapely's test): rings that do not cross
    themselves or each other, holes inside the shell, non-zero area.  The even-odd test of
    :class:`PolygonSelection` would quietly select a bow-tie's odd parts instead."""
    try:
        poly = Polygon(rings[0], rings[1:])
    except ValueError as err:  # e.g. a ring that shapely cannot build
        raise SpecError(f"{what} is degenerate ({err})") from None
    if not poly.is_valid:
        reason = explain_validity(poly)
        m = _WHERE.match(reason)
        if m:
            reason = f"{m['what'].lower()} at ({float(m['x']):.6g}, {float(m['y']):.6g})"
        raise SpecError(f"{what} is not a simple polygon: {reason}")
    if not poly.area > 0.0:
        raise SpecError(f"{what} is degenerate (zero area)")


def validate_selection(d: Any, depth: int = 0, classes: tuple[str, ...] = CLASSES) -> None:
    """Check a selection's JSON without building it (SpecError on any problem)."""
    if depth > MAX_DEPTH:
        raise SpecError(f"selection nested deeper than {MAX_DEPTH}")
    if d is None:
        return
    if not isinstance(d, dict) or len(d) == 0:
        raise SpecError(f"selection must be an object, got {d!r}"[:200])
    keys = set(d) - {"crs"}
    if len(keys) != 1:
        raise SpecError(f"selection must have exactly one kind, got {sorted(d)}")
    (kind,) = keys
    value = d[kind]
    if kind == "all":
        return
    if kind == "class":
        class_ids(value, classes)
    elif kind == "box":
        b = _finite(value, "box", 6)
        if not all(b[i] < b[i + 3] for i in range(3)):
            raise SpecError(f"box min must be below max on every axis, got {b}")
        if max(b[i + 3] - b[i] for i in range(3)) > MAX_EXTENT:
            raise SpecError(f"box side beyond {MAX_EXTENT:g} m")
    elif kind == "polygon":
        if d.get("crs", "tile") not in ("tile", "lonlat", "local"):
            raise SpecError(f"polygon crs must be 'tile', 'lonlat' or 'local', got {d.get('crs')!r}")
        polys = polygon_rings(value)
        if d.get("crs", "tile") != "lonlat":
            pts = np.asarray([p for poly in polys for ring in poly for p in ring])
            if float((pts.max(0) - pts.min(0)).max()) > MAX_EXTENT:
                raise SpecError(f"polygon wider than {MAX_EXTENT:g} m")
    elif kind == "height":
        h = _finite(value, "height range", 2)
        if not h[0] < h[1] or max(abs(h[0]), abs(h[1])) > 1e4:
            raise SpecError(f"height range must be [low, high] within +-10 km, got {h}")
    elif kind == "instance":
        if not isinstance(value, dict) or "class" not in value or "point" not in value:
            raise SpecError("instance selection needs {'class': ..., 'point': [x, y]}")
        class_ids(value["class"], classes)
        p = _finite(value["point"], "instance point", 2)
        if any(abs(c) > MAX_COORD for c in p):
            raise SpecError("instance point out of range")
        if value.get("crs", "local") not in ("local", "tile", "lonlat"):
            raise SpecError(f"instance crs must be 'local', 'tile' or 'lonlat', got {value.get('crs')!r}")
    elif kind in ("and", "or"):
        if not isinstance(value, list) or not value:
            raise SpecError(f"'{kind}' needs a non-empty list of selections")
        for s in value:
            validate_selection(s, depth + 1, classes)
    elif kind == "not":
        validate_selection(value, depth + 1, classes)
    else:
        raise SpecError(f"unknown selection kind {kind!r} (all, class, box, polygon, height, instance, and, or, not)")


# -- built selections -----------------------------------------------------------------------------
class Selection:
    #: True when evaluate() depends on labels (then bound() is only a superset).
    uses_class = False

    def evaluate(self, x: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def bound(self, x: Tensor) -> Tensor:
        return self.evaluate(x, None)

    def prepare(self, scan: Callable) -> None:
        """Precompute rasters that need the field (instances); ``scan`` is :meth:`EditContext.scan`."""

    def box(self) -> Tensor | None:
        """(2, 3) [lo, hi] holding every position ``bound`` may accept (entries may be +-inf;
        lo > hi when it accepts none), or None when unbounded.  Valid after ``prepare``."""
        return None


class Everything(Selection):
    def evaluate(self, x, labels):
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)


class ClassSelection(Selection):
    uses_class = True

    def __init__(self, ids: list[int]):
        self.ids = sorted(set(ids))

    def evaluate(self, x, labels):
        if labels is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return torch.isin(labels, torch.tensor(self.ids, device=labels.device))


class BoxSelection(Selection):
    def __init__(self, lo, hi):
        self.lo, self.hi = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def evaluate(self, x, labels):
        return ((x >= self.lo.to(x.device)) & (x <= self.hi.to(x.device))).all(-1)

    def box(self):
        return torch.stack([self.lo, self.hi])


class PolygonSelection(Selection):
    """A vertical prism over polygons in the local frame (even-odd rule per polygon: holes work)."""

    def __init__(self, polygons: list[list[np.ndarray]]):
        self.polygons = []
        for rings in polygons:
            edges = []
            for ring in rings:
                a = torch.as_tensor(np.asarray(ring), dtype=torch.float64)
                edges.append(torch.cat([a, torch.roll(a, -1, 0)], dim=1))  # (E, 4): x0 y0 x1 y1
            e = torch.cat(edges)
            self.polygons.append((e, e[:, [0, 2]].min(), e[:, [0, 2]].max(), e[:, [1, 3]].min(), e[:, [1, 3]].max()))

    def box(self):
        lo = [min(float(p[1]) for p in self.polygons), min(float(p[3]) for p in self.polygons), -math.inf]
        hi = [max(float(p[2]) for p in self.polygons), max(float(p[4]) for p in self.polygons), math.inf]
        return torch.tensor([lo, hi], dtype=torch.float64).float()

    def evaluate(self, x, labels):
        out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        px, py = x[:, 0].double(), x[:, 1].double()
        for e, xmin, xmax, ymin, ymax in self.polygons:
            cand = ((px >= xmin) & (px <= xmax) & (py >= ymin) & (py <= ymax)).nonzero().squeeze(-1)
            if cand.numel() == 0:
                continue
            e = e.to(x.device)
            for i in range(0, cand.numel(), 65536):
                idx = cand[i:i + 65536]
                qx, qy = px[idx, None], py[idx, None]
                x0, y0, x1, y1 = e[:, 0], e[:, 1], e[:, 2], e[:, 3]
                crosses = (y0 > qy) != (y1 > qy)
                xi = x0 + (qy - y0) * (x1 - x0) / torch.where(y1 == y0, torch.ones_like(y1), y1 - y0)
                inside = ((crosses & (qx < xi)).sum(-1) % 2) == 1
                out[idx] |= inside
        return out


class HeightSelection(Selection):
    def __init__(self, low: float, high: float, ground):
        self.low, self.high, self.ground = low, high, ground

    def evaluate(self, x, labels):
        h = x[:, 2] - self.ground.height(x[:, :2])
        return (h >= self.low) & (h <= self.high)


class InstanceSelection(Selection):
    """The connected component (8-neighbours) of one class's 2-D occupancy raster that holds
    the clicked point; a vertical prism over that component, intersected with the class."""

    uses_class = True

    def __init__(self, ids: list[int], point_xy: tuple[float, float]):
        self.ids = ClassSelection(ids)
        self.point = point_xy
        self.mask: Raster2D | None = None

    def prepare(self, scan: Callable) -> None:
        occ = scan(lambda x, labels: torch.isin(labels, torch.tensor(self.ids.ids, device=labels.device)))
        r, c, inside = occ.index(torch.tensor([self.point], dtype=torch.float32))
        comp = component_at(occ.values[..., 0] > 0, int(r[0]), int(c[0])) if bool(inside[0]) else \
            torch.zeros(occ.shape, dtype=torch.bool)
        # one cell of margin: the scan samples cell centres
        self.mask = Raster2D(dilate(comp, 1)[..., None].float(), occ.origin, occ.cell)

    def _footprint(self, x):
        if self.mask is None:
            raise RuntimeError("instance selection used before prepare()")
        r, c, inside = self.mask.index(x[:, :2])
        return (self.mask.values.to(x.device)[r, c, 0] > 0) & inside

    def evaluate(self, x, labels):
        return self._footprint(x) & self.ids.evaluate(x, labels)

    def bound(self, x):
        return self._footprint(x)

    def box(self):
        if self.mask is None:
            raise RuntimeError("instance selection used before prepare()")
        return raster_box(self.mask)


class And(Selection):
    def __init__(self, parts):
        self.parts = parts
        self.uses_class = any(p.uses_class for p in parts)

    def evaluate(self, x, labels):
        out = self.parts[0].evaluate(x, labels)
        for p in self.parts[1:]:
            out = out & p.evaluate(x, labels)
        return out

    def bound(self, x):
        out = self.parts[0].bound(x)
        for p in self.parts[1:]:
            out = out & p.bound(x)
        return out

    def prepare(self, scan):
        for p in self.parts:
            p.prepare(scan)

    def box(self):
        boxes = [b for b in (p.box() for p in self.parts) if b is not None]
        if not boxes:
            return None
        b = torch.stack(boxes)
        return torch.stack([b[:, 0].amax(0), b[:, 1].amin(0)])


class Or(And):
    def evaluate(self, x, labels):
        out = self.parts[0].evaluate(x, labels)
        for p in self.parts[1:]:
            out = out | p.evaluate(x, labels)
        return out

    def bound(self, x):
        out = self.parts[0].bound(x)
        for p in self.parts[1:]:
            out = out | p.bound(x)
        return out

    def box(self):
        boxes = [p.box() for p in self.parts]
        if any(b is None for b in boxes):
            return None
        b = torch.stack(boxes)
        return torch.stack([b[:, 0].amin(0), b[:, 1].amax(0)])


class Not(Selection):
    def __init__(self, inner: Selection):
        self.inner = inner
        self.uses_class = inner.uses_class

    def evaluate(self, x, labels):
        return ~self.inner.evaluate(x, labels)

    def bound(self, x):
        if self.inner.uses_class:  # the complement of a superset is no superset
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return ~self.inner.evaluate(x, None)

    def prepare(self, scan):
        self.inner.prepare(scan)


def _to_local_xy(points: np.ndarray, crs: str, georef) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if crs == "local":
        return pts
    if georef is None:
        raise SpecError(f"coordinates in crs {crs!r} need the tile's georef")
    xyz = np.concatenate([pts, np.zeros((len(pts), 1))], axis=1)
    if crs == "lonlat":
        xyz[:, 2] = georef.origin[2]
        return georef.lonlat_to_local(xyz)[:, :2]
    return georef.crs_to_local(xyz)[:, :2]


def build_selection(d: Any, georef=None, ground_fn: Callable | None = None,
                    classes: tuple[str, ...] = CLASSES) -> Selection:
    """A :class:`Selection` from validated JSON; ``ground_fn()`` gives the ground model (lazily)."""
    validate_selection(d, classes=classes)
    if d is None:
        return Everything()
    kind = next(k for k in d if k != "crs")
    value = d[kind]
    if kind == "all":
        return Everything()
    if kind == "class":
        return ClassSelection(class_ids(value, classes))
    if kind == "box":
        return BoxSelection(value[:3], value[3:])
    if kind == "polygon":
        crs = d.get("crs", "tile")
        polys = [[_to_local_xy(np.asarray(ring), crs, georef) for ring in poly] for poly in polygon_rings(value)]
        return PolygonSelection(polys)
    if kind == "height":
        if ground_fn is None:
            raise SpecError("a height selection needs a ground model")
        return HeightSelection(float(value[0]), float(value[1]), ground_fn())
    if kind == "instance":
        xy = _to_local_xy(np.asarray(value["point"]), value.get("crs", "local"), georef)[0]
        return InstanceSelection(class_ids(value["class"], classes), (float(xy[0]), float(xy[1])))
    if kind == "and":
        return And([build_selection(s, georef, ground_fn, classes) for s in value])
    if kind == "or":
        return Or([build_selection(s, georef, ground_fn, classes) for s in value])
    return Not(build_selection(value, georef, ground_fn, classes))


__all__ = ["And", "BoxSelection", "ClassSelection", "Everything", "HeightSelection", "InstanceSelection", "Not", "Or",
           "PolygonSelection", "Selection", "SpecError", "build_selection", "class_ids", "polygon_rings",
           "validate_selection"]
