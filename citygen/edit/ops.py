"""Edit operations: how one edit turns the field before it (``prev``) into the field after it.

Every operation is evaluated per sample at local positions ``x``:

``remove``      density suppressed where the selection holds (class tested on the labels at
                ``x``); with ``fill_ground`` the removed footprint gets a ground layer: an
                opaque slab ``[g - thickness, g]`` at the ground height ``g`` whose colour and
                ground/road class are inpainted ring by ring from the ground just outside the
                footprint (see :class:`RemoveOp`).
``recolor``     a colour transform on the selected samples (matrix + offset, HSV shift, or a
                target colour that keeps the shading).
``restyle``     per-class colour transforms (the stats / named styles of :mod:`citygen.style`),
                or a fine-tuned colour branch (the ``optimize`` stylizer), on the selection.
``raise``       heights above ``base`` metres over the ground move up by ``dz`` (down when
                negative): the field is read at the source ``x' = x - dz z`` where the
                selection holds at ``x'``; the slice at ``base`` is stretched to fill the gap
                (walls grow), and a lowered object leaves empty space.
``lower``       ``raise`` by ``-dz`` (``dz`` >= 0 metres down).
``scale_height`` heights above ``base`` scale by ``factor`` about ``base`` (density divided
                by the factor, so vertical optical depth is kept).
``move`` / ``duplicate`` the selected object is read at the inverse-transformed position
                (offset, optional rotation about z around ``pivot``); ``move`` also removes the
                original (with ground fill).
``insert``      another field (an asset checkpoint inside the tile folder) is read inside its
                ``source_box`` at the inverse-transformed position, anchored at CRS or local
                coordinates; the selection is tested in the asset's own frame and classes.

Operations that bring matter somewhere new extend the box the renderer marches and the
occupancy grid (``extend_aabb`` / ``occupancy``), both conservatively.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..render.color import ColorTransform, HsvShift, TargetColor
from .params import _kind, check_params, param, parse_params, safe_relative_path
from .raster import Raster2D, dilate, inpaint, raster_box
from .samples import Rays, Samples, empty_like
from .selection import Everything, SpecError, class_ids

Stage = Callable[[Tensor, "Rays | None", bool], Samples]
OccStage = Callable[[Tensor], Tensor]

GROUND_IDS = (0, 1)  # ground, road: what a ground layer may be labelled
LAYER_SIGMA = 1e3    # 1/m: opaque within millimetres

#: name -> operation class, in the order they are declared (:func:`register`)
REGISTRY: dict[str, type[Op]] = {}


def register(cls):
    """Add an operation class to the registry (by its ``name``); its ``Params`` must be a dataclass."""
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    for f in dataclasses.fields(cls.Params):
        _kind(f)  # an unsupported type fails at import, not on a user's edit
    REGISTRY[cls.name] = cls
    return cls


def resolve_in_tile(tile_dir: Path | None, rel: str) -> Path:
    """The file ``rel`` names inside the tile folder, links resolved (SpecError if it escapes)."""
    if tile_dir is None:
        raise SpecError(f"{rel!r}: a file reference needs the tile folder")
    root = Path(tile_dir).resolve()
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise SpecError(f"{rel!r} escapes the tile folder")
    return path


def validate_params(op: str, params: Any) -> None:
    """Check an edit's ``params`` for its ``op`` (SpecError on any problem)."""
    if op not in REGISTRY:
        raise SpecError(f"unknown op {op!r} (known: {', '.join(REGISTRY)})")
    REGISTRY[op].validate(params)


def color_function(params: dict) -> Callable[[Tensor], Tensor]:
    if params.get("matrix") is not None:
        return ColorTransform(params["matrix"], params.get("offset") or (0, 0, 0), params.get("space", "rgb"))
    if params.get("hsv") is not None:
        return HsvShift(*params["hsv"])
    return TargetColor(params["color"], params.get("strength", 1.0))


# -- operations -----------------------------------------------------------------------------------
def _union_box(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return None
    return torch.stack([torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1])])


def _placed_box(box: Tensor | None, R: Tensor, src: Tensor, dst: Tensor) -> Tensor | None:
    """Box holding ``(p - src) @ R.T + dst`` for p in ``box`` (rotation about z only)."""
    if box is None:
        return None
    if not bool((box[0] <= box[1]).all()):
        return box  # empty stays empty
    if not bool(torch.isfinite(box[:, :2]).all()):
        return None
    xy = torch.tensor([[float(box[i, 0]), float(box[j, 1])] for i in (0, 1) for j in (0, 1)])
    placed = (xy - src[:2]) @ R[:2, :2].T + dst[:2]
    z = box[:, 2] - src[2] + dst[2]
    return torch.stack([torch.cat([placed.min(0).values, z[:1]]), torch.cat([placed.max(0).values, z[1:]])])


class Op:
    """One edit compiled against a field (see the module docstring for the semantics).

    An operation turns its input stage (the field after the edits before it) into its output,
    sample by sample.  It is written as data flow, so that a pipeline can evaluate a whole
    stack in one loop (:mod:`citygen.edit.pipeline`) instead of nesting one call per edit:

    * :meth:`box`: outside it the output equals the input at the same position and nothing
      else is read (the pipeline skips the edit there);
    * :meth:`reads`: the samples for which the input is also read elsewhere (moves, raises)
      and where: ``(sub, xs)``;
    * :meth:`apply` / :meth:`apply_occ` / :meth:`selected_from`: output samples, occupancy
      and selection from the input at ``x`` (``here``) and at ``xs`` for ``sub`` (``there``).

    :meth:`evaluate`, :meth:`occupancy` and :meth:`selected` compose these with a callable
    input stage directly (one edit, or a reference composition of a stack).

    An operation is registered (:func:`register`) under its ``name`` and declares its
    parameters once, as the dataclass ``Params`` (:mod:`citygen.edit.params`): the check of an
    edit's params (:meth:`validate`, plus the op's own :meth:`check`), the typed values it
    reads (``self.p``) and the ``citygen edit add`` flags that set them all come from there.
    """

    name: ClassVar[str]
    #: what the operation does (``citygen edit`` error messages, docs)
    help: ClassVar[str] = ""
    #: other keys in params are kept for the record (restyle: how the style was made)
    open_keys: ClassVar[bool] = False
    #: added with ``citygen edit add`` (restyle comes from ``citygen style``)
    cli: ClassVar[bool] = True

    @dataclass(kw_only=True)
    class Params:
        pass

    def __init__(self, edit: dict, selection, ctx):
        self.edit, self.params, self.selection, self.ctx = edit, edit.get("params", {}), selection, ctx
        self.p = parse_params(self.Params, self.params)

    # -- parameters ----------------------------------------------------------------------------------
    @classmethod
    def validate(cls, params: Any) -> None:
        """Check an edit's params: the declared fields (keys, types, ranges), then :meth:`check`."""
        check_params(cls.name, cls.Params, params, cls.open_keys)
        cls.check(params, parse_params(cls.Params, params))

    @classmethod
    def check(cls, params: dict, p: Any) -> None:
        """Checks beyond one field's type and range (several fields together); SpecError."""

    def prepare(self, prev: Stage, prev_occ: OccStage) -> None:
        self.selection.prepare(lambda predicate: self.ctx.scan(prev, prev_occ, predicate))

    # -- data flow ---------------------------------------------------------------------------------
    def box(self) -> Tensor | None:
        """(2, 3) box outside which this edit is the identity and reads nothing; None: anywhere."""
        return self.selection.box()

    def reads(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(indices into x, source positions) where the input is also read elsewhere, or None."""
        return None

    def apply(self, x: Tensor, rays: Rays | None, here: Samples, there: Samples | None, sub: Tensor | None,
              need_rgb: bool) -> Samples:
        raise NotImplementedError

    def apply_occ(self, x: Tensor, here: Tensor, there: Tensor | None, sub: Tensor | None) -> Tensor:
        return here

    def selected_from(self, x: Tensor, here: Samples, there: Samples | None, sub: Tensor | None) -> Tensor:
        """(N,) bool: where this edit's selection holds on the field it reads."""
        return self.selection.evaluate(x, here.labels)

    # -- direct composition with a callable input --------------------------------------------------
    def _read(self, x, rays, prev, need_rgb):
        r = self.reads(x)
        if r is None or r[0].numel() == 0:
            return None, None
        sub, xs = r
        return prev(xs, None if rays is None else rays.take(sub), need_rgb), sub

    def evaluate(self, x: Tensor, rays: Rays | None, prev: Stage, need_rgb: bool) -> Samples:
        there, sub = self._read(x, rays, prev, need_rgb)
        return self.apply(x, rays, prev(x, rays, need_rgb), there, sub, need_rgb)

    def occupancy(self, x: Tensor, prev_occ: OccStage) -> Tensor:
        r = self.reads(x)
        there, sub = (prev_occ(r[1]), r[0]) if r is not None and r[0].numel() else (None, None)
        return self.apply_occ(x, prev_occ(x), there, sub)

    def selected(self, x: Tensor, prev: Stage) -> Tensor:
        """(N,) bool: where this edit's selection holds on the field it reads (``prev``)."""
        there, sub = self._read(x, None, prev, False)
        return self.selected_from(x, prev(x, None, False), there, sub)

    def extend_aabb(self, aabb: Tensor) -> Tensor:
        return aabb

    def background(self, rgb: Tensor) -> Tensor:
        return rgb


@register
class RemoveOp(Op):
    name = "remove"
    help = "density suppressed on the selection; the revealed ground filled by inpainting"

    @dataclass(kw_only=True)
    class Params:
        fill_ground: bool = param(True, flag="no_fill", invert=True, help="fill the revealed ground")
        thickness: float = param(1.0, lo=0.01, hi=100.0, help="ground layer thickness, metres")
        reach: float = param(3.0, lo=0.0, hi=1000.0, help="removed matter this far above the ground is filled under")

    def prepare(self, prev, prev_occ):
        super().prepare(prev, prev_occ)
        self.fill = self.p.fill_ground
        self.thickness = float(self.p.thickness)
        self.reach = float(self.p.reach)
        self.footprint = None
        if not self.fill:
            return
        ctx = self.ctx
        sbox = self.selection.box()
        # Footprint: columns where the selection removes matter within `reach` of the ground.
        # A test at cell centres misses matter between them, so the coarse mask, grown by a
        # cell, holds every column that may need the fill (and sets where the fill's colour
        # is inpainted); the fill itself covers only the columns where a fine scan inside it
        # finds the removed matter opaque enough to have hidden the ground.  The fill
        # replaces the ground it covers, so covering more would change what the edit did
        # not select (ground and water beside a building, ground under a thin fringe).
        selected = lambda x, labels: self.selection.evaluate(x, labels)  # noqa: E731
        band = (-1.0, self.reach)
        fp = ctx.scan(prev, prev_occ, selected, band=band, bound=self.selection.bound, box=sbox)
        mask = dilate(fp.values[..., 0] > 0, 1)
        if not bool(mask.any()):
            return
        fine = ctx.scan(prev, prev_occ, selected, band=band, bound=self.selection.bound, cell=ctx.fine_cell,
                        within=Raster2D(mask[..., None].float(), fp.origin, fp.cell), column_opacity=ctx.fill_opacity,
                        box=sbox)
        self.fill_mask = Raster2D(dilate(fine.values[..., 0] > 0, ctx.fine_margin)[..., None].float(),
                                  fine.origin, fine.cell)
        # The removed object's envelope: under its top, every view saw the object, so what the
        # field holds there besides it (unlabelled haze, the inside of a building) was never
        # observed; it is cleared with the object where the fill goes.  Tops per coarse column,
        # grown by a cell (the fine fill cells lie between coarse centres).
        tops = ctx.scan(prev, prev_occ, selected, bound=self.selection.bound,
                        within=Raster2D(mask[..., None].float(), fp.origin, fp.cell), top=True, box=sbox)
        grown = torch.nn.functional.max_pool2d(tops.values[..., 0][None, None], 3, stride=1, padding=1)[0, 0]
        self.envelope_top = Raster2D(grown[..., None], tops.origin, tops.cell)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        ring = ctx.ring_cells
        r0, r1 = max(int(rows.min()) - ring, 0), min(int(rows.max()) + ring + 1, mask.shape[0])
        c0, c1 = max(int(cols.min()) - ring, 0), min(int(cols.max()) + ring + 1, mask.shape[1])
        window = Raster2D(mask[r0:r1, c0:c1, None].float(),
                          (fp.origin[0] + c0 * fp.cell[0], fp.origin[1] + r0 * fp.cell[1]), fp.cell)
        inside = window.values[..., 0] > 0
        # What the ground looks like from above just outside: composite of the ground band.
        rgb, probs, acc = ctx.ground_look(prev, window)
        # copy only from cells whose top is ground or road (not a neighbouring car or wall)
        is_ground = torch.isin(probs.argmax(-1), torch.tensor(GROUND_IDS))
        known = (~inside) & (acc > 0.5) & is_ground
        if not bool(known.any()):  # nothing to copy from: a neutral grey ground
            rgb = torch.full_like(rgb, 0.5)
            probs = torch.zeros_like(probs)
            probs[..., GROUND_IDS[0]] = 1.0
            known = torch.ones_like(known)
        self.color = Raster2D(inpaint(rgb, known), window.origin, window.cell)
        filled = inpaint(probs, known)
        ground_probs = filled[..., list(GROUND_IDS)]
        label = torch.tensor(GROUND_IDS)[ground_probs.argmax(-1)]
        self.label = Raster2D(label[..., None].float(), window.origin, window.cell)
        self.footprint = self.fill_mask

    def box(self):
        sbox = self.selection.box()
        if self.footprint is None:
            return sbox
        return _union_box(sbox, raster_box(self.fill_mask))

    def _layer(self, x: Tensor):
        """(in footprint, in the layer slab, in the cleared band) masks."""
        r, c, inside = self.fill_mask.index(x[:, :2])
        infp = inside & (self.fill_mask.values.to(x.device)[r, c, 0] > 0)
        g = self.ctx.ground.height(x[:, :2])
        h = x[:, 2] - g
        below_top = (h <= 0.5) | (x[:, 2] <= self.envelope_top.nearest(x[:, :2])[:, 0].to(x))
        return infp, infp & (h <= 0) & (h >= -self.thickness), infp & (h >= -self.thickness) & below_top

    def apply(self, x, rays, here, there, sub, need_rgb):
        s = here
        out = s.masked(~self.selection.evaluate(x, s.labels))
        if self.footprint is None:
            return out
        _, slab, cleared = self._layer(x)
        out = out.masked(~cleared)
        if not bool(slab.any()):
            return out
        layer = empty_like(s)
        layer.sigma = torch.where(slab, torch.full_like(s.sigma, LAYER_SIGMA), layer.sigma)
        lab = self.label.nearest(x[:, :2])[:, 0].long()
        layer.logits = torch.where(slab[:, None], 20.0 * torch.nn.functional.one_hot(lab, s.logits.shape[1]).to(s.logits),
                                   layer.logits)
        if layer.rgb is not None:
            layer.rgb = torch.where(slab[:, None], self.color.bilinear(x[:, :2]).to(s.rgb), layer.rgb)
        return Samples.union(out, layer)

    def apply_occ(self, x, here, there, sub):
        if self.footprint is not None:
            return here | self._layer(x)[1]
        return here


@register
class RecolorOp(Op):
    name = "recolor"
    help = "a colour transform on the selection: matrix (+ offset, rgb or lab), HSV shift, or target colour"

    @dataclass(kw_only=True)
    class Params:
        matrix: list[list[float]] | None = param(None, n=3, label="recolor matrix")
        offset: list[float] | None = param(None, n=3, label="recolor offset")
        space: str = param("rgb", label="recolor space")
        hsv: list[float] | None = param(None, n=3, label="recolor hsv [hue_deg, saturation, value]", flag="hsv")
        color: list[float] | None = param(None, n=3, label="recolor color", flag="color")
        strength: float = param(1.0, lo=0.0, hi=1.0)

    @classmethod
    def check(cls, params, p):
        modes = [k for k in ("matrix", "hsv", "color") if getattr(p, k) is not None]
        if len(modes) != 1:
            raise SpecError("recolor needs exactly one of 'matrix' (+ 'offset'), 'hsv' or 'color'")
        if p.matrix is not None:
            if any(abs(v) > 100 for row in p.matrix for v in row):
                raise SpecError("recolor matrix entries beyond +-100")
            if p.space not in ("rgb", "lab"):
                raise SpecError("recolor space must be 'rgb' or 'lab'")
        elif p.hsv is not None:
            if not (0 <= p.hsv[1] <= 100 and 0 <= p.hsv[2] <= 100):
                raise SpecError("recolor hsv saturation/value scales must be in [0, 100]")
        elif not all(0 <= v <= 1 for v in p.color):
            raise SpecError("recolor color must be RGB in [0, 1]")

    def prepare(self, prev, prev_occ):
        super().prepare(prev, prev_occ)
        self.fn = color_function(self.params)

    def apply(self, x, rays, here, there, sub, need_rgb):
        s = here
        if s.rgb is None:
            return s
        m = self.selection.evaluate(x, s.labels)
        if bool(m.any()):
            s.rgb = torch.where(m[:, None], self.fn(s.rgb), s.rgb)
        return s


@register
class RestyleOp(Op):
    """Per-class colour transforms, or a fine-tuned colour branch of the base field."""

    name = "restyle"
    help = "per-class colour transforms or a fine-tuned colour branch (added by `citygen style`)"
    open_keys = True  # params also keep a record of how the style was made: reference, report, feature net
    cli = False

    @dataclass(kw_only=True)
    class Params:
        method: str = param("stats", label="restyle method")
        transforms: dict | None = param(None, label="restyle transforms")
        weights: dict | None = param(None, label="restyle weights")

    @classmethod
    def check(cls, params, p):
        if p.method in ("stats", "named"):
            if not p.transforms:
                raise SpecError("restyle needs 'transforms': {class name or '*': {space, matrix, offset}}")
            for key, t in p.transforms.items():
                if key != "*":
                    class_ids(key)
                if not isinstance(t, dict):
                    raise SpecError(f"restyle transform {key!r} must be an object")
                RecolorOp.validate({k: v for k, v in t.items() if k in ("matrix", "offset", "space")})
        elif p.method == "optimize":
            if not p.weights:
                raise SpecError("restyle/optimize needs 'weights': {block id: relative .safetensors path}")
            for block, path in p.weights.items():
                safe_relative_path(path, f"restyle weights of block {block!r}")
        else:
            raise SpecError(f"restyle method must be 'stats', 'named' or 'optimize', got {p.method!r}")

    def prepare(self, prev, prev_occ):
        super().prepare(prev, prev_occ)
        p = self.params
        self.method = self.p.method
        self.per_class: dict[int, ColorTransform] = {}
        self.default: ColorTransform | None = None
        self.styled_field = None
        if self.method == "optimize":
            rel = p["weights"].get(self.ctx.block_id)
            if rel is not None:
                self.styled_field = self.ctx.styled_color_field(rel)
            return
        for key, t in p["transforms"].items():
            tr = ColorTransform.from_dict(t)
            if key == "*":
                self.default = tr
            else:
                self.per_class[class_ids(key)[0]] = tr

    def _restyle(self, rgb: Tensor, labels: Tensor, m: Tensor) -> Tensor:
        out = rgb
        covered = torch.zeros_like(m)
        for cid, tr in self.per_class.items():
            sel = m & (labels == cid)
            covered |= labels == cid
            if bool(sel.any()):
                out = torch.where(sel[:, None], tr(rgb), out)
        if self.default is not None:
            sel = m & ~covered
            if bool(sel.any()):
                out = torch.where(sel[:, None], self.default(rgb), out)
        return out

    def apply(self, x, rays, here, there, sub, need_rgb):
        s = here
        if s.rgb is None:
            return s
        m = self.selection.evaluate(x, s.labels)
        if self.method == "optimize":
            if self.styled_field is None or s.geo is None:
                return s
            m = m & s.has_geo
            idx = m.nonzero().squeeze(-1)
            if idx.numel():
                r = rays.take(idx)
                styled = self.styled_field.color(s.geo[idx], r.dirs, r.appearance, r.ray_index)
                s.rgb = s.rgb.index_copy(0, idx, styled.to(s.rgb.dtype))
            return s
        s.rgb = self._restyle(s.rgb, s.labels, m)
        return s

    def background(self, rgb):
        if self.method != "optimize" and self.default is not None and isinstance(self.selection, Everything):
            return self.default(rgb)
        return rgb


class _MappingOp(Op):
    """Operations that read the field at a source position ``x' = source(x)``: only where the
    selection's bound holds at ``x'`` (elsewhere the read matter would not be selected)."""

    def source(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(source positions, density factor or None)."""
        raise NotImplementedError

    def reads(self, x):
        xs, _ = self.source(x)
        sub = self.selection.bound(xs).nonzero().squeeze(-1)
        return sub, xs[sub]

    def copied(self, x: Tensor, there: Samples) -> tuple[Samples, Tensor]:
        """The matter read at the source (``x`` the read samples' own positions), and where it is selected."""
        xs, jac = self.source(x)
        if jac is not None:
            there.sigma = there.sigma * jac
        return there, self.selection.evaluate(xs, there.labels)

    def _paste(self, x: Tensor, out: Samples, there: Samples | None, sub: Tensor | None) -> Samples:
        """``out`` with the selected matter read at the source added (densities add)."""
        if there is None:
            return out
        copy_, m = self.copied(x[sub], there)
        return out.scatter(sub, Samples.union(out.take(sub), copy_.masked(m)))

    def apply_occ(self, x, here, there, sub):
        if there is None:
            return here
        return here.index_copy(0, sub, here[sub] | there)

    def selected_from(self, x, here, there, sub):
        """The selected matter where it was, and where it is put."""
        return super().selected_from(x, here, there, sub) | self._selected_there(x, there, sub)

    def _selected_there(self, x, there, sub):
        out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if there is not None:
            xs, _ = self.source(x[sub])
            out[sub] = self.selection.evaluate(xs, there.labels)
        return out


class _HeightMap(_MappingOp):
    """Vertical maps: only the columns where the selection holds matter change, so those
    columns (a 2-D footprint found at prepare time) are the only ones read twice."""

    def prepare(self, prev, prev_occ):
        super().prepare(prev, prev_occ)
        fp = self.ctx.scan(prev, prev_occ, lambda x, labels: self.selection.evaluate(x, labels),
                           bound=self.selection.bound, box=self.selection.box())
        self.footprint = Raster2D(dilate(fp.values[..., 0] > 0, 1)[..., None].float(), fp.origin, fp.cell)

    def box(self):
        return raster_box(self.footprint)

    def _in_footprint(self, x: Tensor) -> Tensor:
        r, c, inside = self.footprint.index(x[:, :2])
        return inside & (self.footprint.values.to(x.device)[r, c, 0] > 0)

    def reads(self, x):
        idx = self._in_footprint(x).nonzero().squeeze(-1)
        xs, _ = self.source(x[idx])
        keep = self.selection.bound(xs)
        return idx[keep], xs[keep]

    def apply(self, x, rays, here, there, sub, need_rgb):
        idx = self._in_footprint(x).nonzero().squeeze(-1)
        if idx.numel() == 0:
            return here
        stay = here.take(idx)
        stay = stay.masked(~self.selection.evaluate(x[idx], stay.labels))  # vacated where it was selected
        out = here.scatter(idx, stay)
        if there is None:
            return out
        moved, m_src = self.copied(x[sub], there)  # the selected matter from below/above moves in
        return out.scatter(sub, moved.where(m_src, out.take(sub)))

    def selected_from(self, x, here, there, sub):
        return super().selected_from(x, here, there, sub) & self._in_footprint(x)


@register
class RaiseOp(_HeightMap):
    name = "raise"
    help = "heights above base move up by dz (down when negative)"

    @dataclass(kw_only=True)
    class Params:
        dz: float = param(lo=-1000.0, hi=1000.0, flag="dz", metavar="METRES (negative lowers)", help="metres up")
        base: float = param(1.0, lo=0.0, hi=100.0, help="heights below this (metres over the ground) stay")

    def _dz(self) -> float:
        """Metres up."""
        return float(self.p.dz)

    def source(self, x):
        dz, base = self._dz(), float(self.p.base)
        g = self.ctx.ground.height(x[:, :2])
        h = x[:, 2] - g
        hs = torch.where(h < base, h, (h - dz).clamp_min(base))
        return torch.cat([x[:, :2], (g + hs)[:, None]], dim=1), None

    def extend_aabb(self, aabb):
        out = aabb.clone()
        out[1, 2] += max(self._dz(), 0.0)
        return out


@register
class ScaleHeightOp(_HeightMap):
    name = "scale_height"
    help = "heights above base scale by factor about base (vertical optical depth kept)"

    @dataclass(kw_only=True)
    class Params:
        factor: float = param(lo=0.05, hi=20.0, flag="factor", help="height factor")
        base: float = param(1.0, lo=0.0, hi=100.0, help="heights below this (metres over the ground) stay")

    def source(self, x):
        f, base = float(self.p.factor), float(self.p.base)
        g = self.ctx.ground.height(x[:, :2])
        h = x[:, 2] - g
        hs = torch.where(h < base, h, base + (h - base) / f)
        jac = torch.where(h < base, torch.ones_like(h), torch.full_like(h, 1.0 / f))
        return torch.cat([x[:, :2], (g + hs)[:, None]], dim=1), jac

    def extend_aabb(self, aabb):
        out = aabb.clone()
        out[1, 2] = aabb[0, 2] + (aabb[1, 2] - aabb[0, 2]) * max(float(self.p.factor), 1.0)
        return out


def _rotation(deg: float) -> Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class _RigidCopy(_MappingOp):
    """x = R (x' - pivot) + pivot + offset, so x' = R^T (x - pivot - offset) + pivot."""

    @dataclass(kw_only=True)
    class Params:
        offset: list[float] = param(n=3, label="offset [dx, dy, dz]", flag="offset", metavar="DX,DY,DZ",
                                    help="metres")
        rotate_deg: float = param(0.0, lo=-360.0, hi=360.0, flag="rotate", help="rotation about the vertical")
        pivot: list[float] | None = param(None, n=2, label="pivot [x, y]", flag="pivot", only_if="rotate",
                                          help="rotation centre (local)")

    @classmethod
    def check(cls, params, p):
        if max(abs(v) for v in p.offset) > 1e5:
            raise SpecError("offset beyond 100 km")
        if p.rotate_deg != 0.0 and p.pivot is None:
            raise SpecError("rotate_deg needs pivot [x, y] (the rotation centre, local)")

    def _rigid(self):
        p = self.p
        pivot = torch.tensor([*(p.pivot or [0.0, 0.0])[:2], 0.0])
        return _rotation(float(p.rotate_deg)), pivot, torch.tensor(p.offset, dtype=torch.float32)

    def source(self, x):
        R, pivot, offset = self._rigid()
        return (x - pivot.to(x) - offset.to(x)) @ R.to(x) + pivot.to(x), None

    def _target_box(self) -> Tensor | None:
        """Where the copy may land: the selection's box, moved (padded for rounding)."""
        R, pivot, offset = self._rigid()
        return _placed_box(self.selection.box(), R, pivot, pivot + offset)

    def extend_aabb(self, aabb):
        # what can be copied lies in the box so far and in the selection's box: that, moved
        src = aabb.clone()
        sbox = self.selection.box()
        if sbox is not None:
            src = torch.stack([torch.maximum(src[0], sbox[0].to(src)), torch.minimum(src[1], sbox[1].to(src))])
            if not bool((src[0] <= src[1]).all()):
                return aabb
        R, pivot, offset = self._rigid()
        corners = torch.stack([torch.tensor([src[i, 0], src[j, 1], src[k, 2]])
                               for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        moved = (corners - pivot) @ R.T + pivot + offset
        return torch.stack([torch.minimum(aabb[0], moved.min(0).values.to(aabb)),
                            torch.maximum(aabb[1], moved.max(0).values.to(aabb))])


@register
class MoveOp(_RigidCopy):
    name = "move"
    help = "the selection moved (offset, rotation about the vertical); where it was is removed with ground fill"

    @dataclass(kw_only=True)
    class Params(_RigidCopy.Params, RemoveOp.Params):  # removal's fields first: edits.json key order
        pass

    @classmethod
    def check(cls, params, p):
        super().check(params, p)
        RemoveOp.check(params, p)

    def prepare(self, prev, prev_occ):
        super().prepare(prev, prev_occ)
        keys = {f.name for f in dataclasses.fields(RemoveOp.Params)}
        self.remover = RemoveOp({"params": {k: v for k, v in self.params.items() if k in keys}},
                                self.selection, self.ctx)
        self.remover.prepare(prev, prev_occ)

    def box(self):
        return _union_box(self.remover.box(), self._target_box())

    def apply(self, x, rays, here, there, sub, need_rgb):
        return self._paste(x, self.remover.apply(x, rays, here, None, None, need_rgb), there, sub)

    def apply_occ(self, x, here, there, sub):
        return super().apply_occ(x, here, there, sub) | self.remover.apply_occ(x, here, None, None)


@register
class DuplicateOp(_RigidCopy):
    name = "duplicate"
    help = "a copy of the selection, offset and rotated about the vertical"

    def box(self):
        return self._target_box()

    def apply(self, x, rays, here, there, sub, need_rgb):
        return self._paste(x, here, there, sub)

    def selected_from(self, x, here, there, sub):  # the original stays: only where the copy goes
        return self._selected_there(x, there, sub)


@register
class InsertOp(Op):
    """Another field, read at ``x_src = R^T (x - anchor) + source_anchor`` inside ``source_box``."""

    name = "insert"
    help = "another field (an asset checkpoint inside the tile) placed at an anchor"

    @dataclass(kw_only=True)
    class Params:
        asset: str = param(label="insert asset", path=True, flag="asset", metavar="PATH (inside the tile)",
                           help="checkpoint path inside the tile folder")
        source_box: list[float] = param(n=6, label="source_box", flag="source_box", metavar="X0,Y0,Z0,X1,Y1,Z1",
                                        help="region of the asset (asset frame)")
        anchor_crs: list[float] | None = param(None, n=3, label="anchor_crs", flag="anchor", unless="anchor_local",
                                               help="where the asset's anchor goes, E,N,H in the tile's CRS")
        anchor_local: list[float] | None = param(None, n=3, label="anchor_local", flag="anchor",
                                                 only_if="anchor_local", help="where the anchor goes, local frame")
        source_anchor: list[float] | None = param(None, n=3, label="source_anchor",
                                                  help="the asset's anchor (default: bottom centre of source_box)")
        rotate_deg: float = param(0.0, lo=-360.0, hi=360.0, flag="rotate", help="rotation about the vertical")

    @classmethod
    def check(cls, params, p):
        box = p.source_box
        if not all(box[i] < box[i + 3] for i in range(3)) or max(box[i + 3] - box[i] for i in range(3)) > 1e4:
            raise SpecError(f"source_box must have min < max and sides up to 10 km, got {[float(v) for v in box]}")
        anchors = [k for k in ("anchor_crs", "anchor_local") if getattr(p, k) is not None]
        if len(anchors) != 1:
            raise SpecError("insert needs exactly one of 'anchor_crs' [e, n, h] or 'anchor_local' [x, y, z]")
        if any(abs(v) > 1e8 for v in getattr(p, anchors[0])):
            raise SpecError(f"{anchors[0]} out of range")

    def prepare(self, prev, prev_occ):
        p = self.params
        self.asset = self.ctx.load_asset(p["asset"])
        if self.asset.n_classes != self.ctx.n_classes:
            raise SpecError(f"insert asset {p['asset']!r} has {self.asset.n_classes} classes, the tile "
                            f"{self.ctx.n_classes}")
        box = torch.tensor(p["source_box"], dtype=torch.float32)
        self.lo, self.hi = box[:3], box[3:]
        if self.p.anchor_crs is not None:
            if self.ctx.georef is None:
                raise SpecError("insert anchor_crs needs the tile's georef")
            anchor = self.ctx.georef.crs_to_local(p["anchor_crs"])
        else:
            anchor = p["anchor_local"]
        self.anchor = torch.tensor(anchor, dtype=torch.float32)
        default_src = [(float(self.lo[0] + self.hi[0]) / 2), float(self.lo[1] + self.hi[1]) / 2, float(self.lo[2])]
        self.src_anchor = torch.tensor(self.p.source_anchor or default_src, dtype=torch.float32)
        self.R = _rotation(float(self.p.rotate_deg))
        asset = self.asset
        self.asset_stage = lambda xs, rays, need_rgb: self.ctx.base_samples(asset, xs, rays, need_rgb, own_geo=False)
        occ_grid = getattr(asset, "occupancy", None)
        self.asset_occ = (lambda xs: occ_grid.query(xs)) if occ_grid is not None else \
            (lambda xs: torch.ones(xs.shape[0], dtype=torch.bool, device=xs.device))
        self.selection.prepare(lambda predicate: self.ctx.scan(self.asset_stage, self.asset_occ, predicate))
        self.code = self.ctx.default_code(asset)

    def box(self):
        return _placed_box(torch.stack([self.lo, self.hi]), self.R, self.src_anchor, self.anchor)

    def _source(self, x):
        xs = (x - self.anchor.to(x)) @ self.R.to(x) + self.src_anchor.to(x)
        inside = ((xs >= self.lo.to(x)) & (xs <= self.hi.to(x))).all(-1)
        return xs, inside

    def apply(self, x, rays, here, there, sub, need_rgb):
        s = here
        xs, inside = self._source(x)
        idx = inside.nonzero().squeeze(-1)
        if idx.numel() == 0:
            return s
        ar = None
        if rays is not None and need_rgb:
            d = rays.take(idx).sample_dirs() @ self.R.to(x)
            ar = Rays(d, self.code.to(x).expand(idx.numel(), -1))
        a = self.asset_stage(xs[idx], ar, need_rgb and rays is not None)
        a = a.masked(self.selection.evaluate(xs[idx], a.labels))
        if a.rgb is None and s.rgb is not None:
            a.rgb = torch.zeros(idx.numel(), 3, device=x.device)
        part = Samples.union(Samples(s.sigma[idx], None if s.rgb is None else s.rgb[idx], s.logits[idx],
                                     None if s.geo is None else s.geo[idx],
                                     None if s.has_geo is None else s.has_geo[idx]), a)
        return s.scatter(idx, part)

    def apply_occ(self, x, here, there, sub):
        xs, inside = self._source(x)
        return here | (inside & self.asset_occ(xs) & self.selection.bound(xs))

    def selected_from(self, x, here, there, sub):
        xs, inside = self._source(x)
        out = torch.zeros_like(inside)
        idx = inside.nonzero().squeeze(-1)
        if idx.numel():
            out[idx] = self.selection.evaluate(xs[idx], self.asset_stage(xs[idx], None, False).labels)
        return out

    def extend_aabb(self, aabb):
        corners = torch.stack([torch.tensor([self.lo[0] if i == 0 else self.hi[0], self.lo[1] if j == 0 else self.hi[1],
                                             self.lo[2] if k == 0 else self.hi[2]])
                               for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        placed = (corners - self.src_anchor) @ self.R.T + self.anchor
        return torch.stack([torch.minimum(aabb[0], placed.min(0).values.to(aabb)),
                            torch.maximum(aabb[1], placed.max(0).values.to(aabb))])


@register
class LowerOp(RaiseOp):
    """``raise`` the other way: the selection's heights above ``base`` move down by ``dz``, the
    vacated space stays empty (the raise with ``-dz``: one reading of the field, one footprint)."""

    name = "lower"
    help = "heights above base move down by dz"

    @dataclass(kw_only=True)
    class Params:
        dz: float = param(lo=0.0, hi=1000.0, flag="dz", metavar="METRES", help="metres down")
        base: float = param(1.0, lo=0.0, hi=100.0, help="heights below this (metres over the ground) stay")

    def _dz(self) -> float:
        return -float(self.p.dz)


# Derived from the registry: the known ops in declaration order, and name -> class.
OPS = tuple(REGISTRY)
OP_CLASSES = REGISTRY
#: the parameters each op reads (restyle keeps other keys too: :attr:`Op.open_keys`)
PARAM_KEYS = {name: {f.name for f in dataclasses.fields(cls.Params)} for name, cls in REGISTRY.items()
              if not cls.open_keys}

__all__ = ["OPS", "OP_CLASSES", "PARAM_KEYS", "REGISTRY", "Op", "color_function", "register", "resolve_in_tile",
           "safe_relative_path", "validate_params"]
