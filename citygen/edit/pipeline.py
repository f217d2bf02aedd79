"""An edit stack evaluated in one loop over its edits, each edit only where it can act.

Stage ``k`` is edit ``k - 1`` applied to stage ``k - 1`` (stage 0: the field).  Most edits
read their input at the sample itself, but moves, duplicates and raises also read it at a
source position ``x'``, where it is itself the result of all earlier edits: evaluating the
stack by nesting one call per edit recursed once per edit (a RecursionError past ~450 edits)
and ran every edit on every sample.  Here a query is planned first, backwards, as a set of
*entries*: the query positions (needing stage ``n``) and, for every edit that reads
elsewhere, its source positions (needing the stage that edit reads, ``k``).  The entries are
then evaluated forwards: the field once on all of them, then, edit by edit, each edit on the
entries it may change (and that need a later stage), with its source entries already holding
exactly its input.  So the result is the nested composition's, sample for sample.

Culling: each edit has a box outside which it is the identity and reads nothing
(:meth:`Op.box`).  Boxed edits are indexed on a 2-D grid of cells: an entry meets only the
edits whose boxes cover its cell, so a sample costs work per edit that may touch it; edits
without a box (class selections, huge boxes) are tested against every entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .samples import Rays, Samples

#: cells per side of the grid that indexes the edits' boxes
GRID = 128
#: an edit whose box covers more than this share of the grid is tested against every entry
WIDE = 1 / 8
#: edits added since the grid was built that are tested box by box before it is rebuilt
PENDING = 64


class Pipeline:
    """Ops in stack order over a base stage; ``stage(k)`` / ``occupancy(k)`` evaluate the first
    ``k`` ops (all by default).  Ops are added after they are prepared (their boxes are known)."""

    def __init__(self, base: Callable, base_occ: Callable, region: Tensor, grid: int = GRID):
        self.base, self.base_occ = base, base_occ
        self.ops: list = []
        lo, hi = region[0, :2].float(), region[1, :2].float()
        self.grid = grid
        self.origin = lo
        self.cell = ((hi - lo) / grid).clamp_min(1e-6)
        self._boxes = _Grow(torch.zeros(0, 2, 3))  # per op: [lo, hi], padded
        self.wide: list[int] = []      # ops tested against every entry
        self.indexed: list[int] = []   # ops in the grid (or pending)
        self._built = 0                # how many of `indexed` the grid holds
        self._ptr = torch.zeros(grid * grid + 1, dtype=torch.long)
        self._cell_ops = torch.zeros(0, dtype=torch.long)

    # -- building --------------------------------------------------------------------------------
    def add(self, op) -> None:
        k = len(self.ops)
        self.ops.append(op)
        box = op.box()
        lo, hi = ([-math.inf] * 3, [math.inf] * 3) if box is None else box.tolist()
        # grown by a millimetre (and float32 rounding of large coordinates): a sample on the
        # edge must not be culled by a rounding difference between this test and the edit's
        pad = 1e-3 + 1e-6 * max([abs(v) for v in lo + hi if math.isfinite(v)] or [0.0])
        lo, hi = [v - pad for v in lo], [v + pad for v in hi]
        self._boxes.append(torch.tensor([[lo, hi]]))
        if any(a > b for a, b in zip(lo, hi)):
            return  # touches nothing
        # cells one wider on each side than the box's: the points' cells are computed in float32
        c0 = [self._cell(lo[i], i) - 1 for i in (0, 1)]
        c1 = [self._cell(hi[i], i) + 1 for i in (0, 1)]
        n_cells = (min(c1[0], self.grid - 1) - max(c0[0], 0) + 1) * (min(c1[1], self.grid - 1) - max(c0[1], 0) + 1)
        if n_cells > WIDE * self.grid * self.grid:
            self.wide.append(k)
        else:
            self.indexed.append(k)

    def _cell(self, v: float, axis: int) -> int:
        c = (v - float(self.origin[axis])) / float(self.cell[axis])
        return int(min(max(c, -1.0), float(self.grid)))

    @property
    def lo(self) -> Tensor:
        return self._boxes.view()[:, 0]

    @property
    def hi(self) -> Tensor:
        return self._boxes.view()[:, 1]

    def _cells(self, xy: Tensor) -> Tensor:
        """(..., 2) integer cell coordinates, clamped to the grid (outside points share the edge
        cells).  Monotonic in xy, so a point inside a box falls in one of the box's cells."""
        c = ((xy.float() - self.origin.to(xy.device)) / self.cell.to(xy.device)).nan_to_num(0.0, 1e9, -1e9)
        return c.clamp(0, self.grid - 1).long()

    def _build(self) -> None:
        ops = torch.tensor(self.indexed, dtype=torch.long)
        c0 = (self._cells(self.lo[ops, :2]) - 1).clamp_min(0)
        c1 = (self._cells(self.hi[ops, :2]) + 1).clamp_max(self.grid - 1)
        w, h = c1[:, 0] - c0[:, 0] + 1, c1[:, 1] - c0[:, 1] + 1
        n = w * h
        op_rep = torch.repeat_interleave(torch.arange(len(ops)), n)
        within = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        cx = c0[op_rep, 0] + within % w[op_rep]
        cy = c0[op_rep, 1] + within // w[op_rep]
        cell = cy * self.grid + cx
        order = torch.argsort(cell, stable=True)  # stable: each cell's ops stay in stack order
        self._cell_ops = ops[op_rep[order]]
        counts = torch.bincount(cell, minlength=self.grid * self.grid)
        self._ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        self._built = len(self.indexed)

    def _meets(self, pos: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
        """(entry, op) pairs: indexed op ``op < limit[entry]`` whose box holds ``pos[entry]``."""
        p = pos.detach().cpu()
        pending = len(self.indexed) - self._built
        if pending > PENDING or pending * p.shape[0] > 1 << 20:
            self._build()
        ents, ops = [], []
        if self._built:
            c = self._cells(p[:, :2])
            cell = c[:, 1] * self.grid + c[:, 0]
            start, cnt = self._ptr[cell], self._ptr[cell + 1] - self._ptr[cell]
            total = int(cnt.sum())
            if total:
                e = torch.repeat_interleave(torch.arange(p.shape[0]), cnt)
                first = torch.repeat_interleave(start - (torch.cumsum(cnt, 0) - cnt), cnt)
                ents.append(e)
                ops.append(self._cell_ops[first + torch.arange(total)])
        pending = self.indexed[self._built:]
        if pending:
            pend = torch.tensor(pending, dtype=torch.long)
            hit = ((p[:, None] >= self.lo[pend][None]) & (p[:, None] <= self.hi[pend][None])).all(-1)
            e, j = hit.nonzero(as_tuple=True)
            ents.append(e)
            ops.append(pend[j])
        if not ents:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        e, o = torch.cat(ents), torch.cat(ops)
        keep = (o < limit.cpu()[e]) & ((p[e] >= self.lo[o]) & (p[e] <= self.hi[o])).all(-1)
        return e[keep], o[keep]

    # -- evaluating --------------------------------------------------------------------------------
    def stage(self, k: int | None = None) -> Callable:
        """``fn(x, rays, need_rgb) -> Samples``: the output of the first ``k`` ops."""
        k = len(self.ops) if k is None else k
        return lambda x, rays, need_rgb: self.run(x, rays, need_rgb, k)[0]

    def occupancy(self, k: int | None = None) -> Callable:
        k = len(self.ops) if k is None else k
        return lambda x: self.run(x, None, False, k, occ=True)[0]

    @torch.no_grad()
    def run(self, x: Tensor, rays: Rays | None, need_rgb: bool, k: int | None = None, occ: bool = False,
            selected: bool = False) -> tuple:
        """Stage ``k`` at ``x``: (Samples, or the occupancy (N,) bool with ``occ``; with
        ``selected``, also (N,) bool: where some op selects, each tested on its own input)."""
        k = len(self.ops) if k is None else k
        n, device = x.shape[0], x.device
        # entries: positions, the stage each needs, the query sample each descends from (its rays)
        pos, level, origin = _Grow(x), _Grow(torch.full((n,), k, dtype=torch.long)), _Grow(torch.arange(n))
        buckets: dict[int, list[Tensor]] = {}

        def enter(p: Tensor, lv: Tensor, first: int) -> None:
            e, o = self._meets(p, lv)
            if e.numel() == 0:
                return
            order = torch.argsort(o, stable=True)
            e, o = e[order] + first, o[order]
            ids, counts = torch.unique_consecutive(o, return_counts=True)
            for op, part in zip(ids.tolist(), torch.split(e, counts.tolist())):
                buckets.setdefault(op, []).append(part)

        enter(x, level.view(), 0)
        wide = set(self.wide)
        touched: dict[int, Tensor] = {}
        reads: dict[int, tuple[Tensor, int]] = {}  # op -> (indices into its entries, first source entry)
        # backwards: the entries each op acts on, and the source entries it reads
        for j in range(k - 1, -1, -1):
            parts = buckets.pop(j, None)
            if j in wide:
                all_pos = pos.view()
                lo, hi = self.lo[j].to(device), self.hi[j].to(device)
                inbox = (level.view().to(device) > j) & ((all_pos >= lo) & (all_pos <= hi)).all(-1)
                idx = inbox.nonzero().squeeze(-1).cpu()
            elif parts:
                idx = torch.sort(torch.cat(parts)).values if len(parts) > 1 else parts[0]
            else:
                continue
            if idx.numel() == 0:
                continue
            touched[j] = idx
            r = self.ops[j].reads(pos.view()[idx.to(device)])
            if r is None or r[0].numel() == 0:
                continue
            sub, xs = r[0].cpu(), r[1]
            lv = torch.full((xs.shape[0],), j, dtype=torch.long)
            first = len(pos)
            reads[j] = (sub, first)
            origin.append(origin.view()[idx[sub]])
            pos.append(xs)
            level.append(lv)
            enter(xs, lv, first)
        count = len(pos)
        all_pos, all_origin = pos.view(), origin.view()
        # forwards: the field at every entry, then each op on the entries it acts on
        if occ:
            values = self.base_occ(all_pos).clone()
        else:
            base = self.base(all_pos, None if rays is None else rays.take(all_origin.to(device)), need_rgb)
            values = _own(base)  # written in place below: no tensor shared with the field or the caller
        sel = torch.zeros(count, dtype=torch.bool, device=device) if selected else None
        for j in range(k):
            idx = touched.get(j)
            if idx is None:
                continue
            op = self.ops[j]
            idx_d = idx.to(device)
            xe = all_pos[idx_d]
            there = sub = None
            if j in reads:
                sub, first = reads[j]
                src = torch.arange(first, first + sub.numel(), device=device)
                there = values[src] if occ else values.take(src)
                sub = sub.to(device)
            if occ:
                values[idx_d] = op.apply_occ(xe, values[idx_d], there, sub)
                continue
            here = values.take(idx_d)
            if selected:
                sel[idx_d] |= op.selected_from(xe, here, there, sub)
            r = None if rays is None else rays.take(all_origin[idx].to(device))
            _put(values, idx_d, op.apply(xe, r, here, there, sub, need_rgb))
        roots = torch.arange(n, device=device)
        out = values[roots] if occ else values.take(roots)
        return out, None if sel is None else sel[:n]


class _Grow:
    """A tensor that grows along dim 0 by appending (capacity doubles: amortised linear)."""

    def __init__(self, first: Tensor):
        self.buf, self.n = first, first.shape[0]

    def __len__(self) -> int:
        return self.n

    def append(self, t: Tensor) -> None:
        need = self.n + t.shape[0]
        if need > self.buf.shape[0]:
            grown = torch.empty((max(need, 2 * self.buf.shape[0]), *self.buf.shape[1:]), dtype=self.buf.dtype,
                                device=self.buf.device)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:need] = t.to(self.buf.device)
        self.n = need

    def view(self) -> Tensor:
        return self.buf[:self.n]


def _own(s: Samples) -> Samples:
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    return Samples(c(s.sigma), c(s.rgb), c(s.logits), c(s.geo), c(s.has_geo))


def _put(values: Samples, idx: Tensor, part: Samples) -> None:
    """``values`` with the samples at ``idx`` replaced by ``part``, in place (as Samples.scatter)."""
    values.sigma[idx] = part.sigma.to(values.sigma.dtype)
    if values.rgb is not None:
        if part.rgb is None:
            values.rgb = None
        else:
            values.rgb[idx] = part.rgb.to(values.rgb.dtype)
    values.logits[idx] = part.logits.to(values.logits.dtype)
    if values.geo is not None:
        if part.geo is not None:
            values.geo[idx] = part.geo.to(values.geo.dtype)
            values.has_geo[idx] = part.has_geo
        else:
            values.has_geo[idx] = False


__all__ = ["Pipeline"]
