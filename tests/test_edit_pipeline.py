"""The edit stack evaluated in one loop (citygen/edit/pipeline.py) against the nested
composition it replaces: stage k = edit k applied to a callable stage k - 1, built here
edit by edit.  A mixed stack of every operation, where later edits read matter that earlier
ones moved, and a 10,000-edit stack (the nested composition overflowed Python's stack at
~450 edits) checked on the row of edits that can reach the samples."""

from __future__ import annotations

import sys

import pytest
import torch

from citygen.edit import EditedField, PlaneGround
from citygen.edit.analytic import BUILDING, AnalyticCityField, Box
from citygen.edit.field import base_samples
from citygen.edit.samples import Rays

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def edit(i, op, selection=None, **params):
    return {"id": f"e{i}_{op}", "op": op, "selection": selection, "params": params, "enabled": True}


def nested(field, ops):
    """The reference: stage k is ops[k - 1].evaluate on a callable stage k - 1 (occupancy likewise)."""
    stage = lambda x, rays, need_rgb: base_samples(field, x, rays, need_rgb)  # noqa: E731
    grid = field.occupancy
    occ = (lambda x: grid.query(x)) if grid is not None else (lambda x: torch.ones(x.shape[0], dtype=torch.bool))
    selected = []
    for op in ops:
        selected.append((op, stage))
        stage = (lambda op, prev: lambda x, rays, need_rgb: op.evaluate(x, rays, prev, need_rgb))(op, stage)
        occ = (lambda op, prev: lambda x: op.occupancy(x, prev))(op, occ)

    def selected_fn(x):
        out = torch.zeros(x.shape[0], dtype=torch.bool)
        for op, prev in selected:
            out |= op.selected(x, prev)
        return out

    return stage, occ, selected_fn


def assert_same(a, b, atol=1e-6):
    assert torch.allclose(a.sigma, b.sigma, atol=atol, rtol=1e-6)
    assert torch.allclose(a.logits, b.logits, atol=atol, rtol=1e-6)
    assert (a.rgb is None) == (b.rgb is None)
    if a.rgb is not None:
        assert torch.allclose(a.rgb, b.rgb, atol=atol, rtol=1e-6)


@pytest.fixture(scope="module")
def field(one_thread):
    return AnalyticCityField(with_occupancy=True, occupancy_resolution=32)


def test_mixed_stack_equals_nested_composition(field):
    tower = AnalyticCityField(boxes=[Box((-1.0, -1.0, 0.0), (1.0, 1.0, 4.0), (0.9, 0.9, 0.1), BUILDING)],
                              aabb=((-3.0, -3.0, -2.0), (3.0, 3.0, 6.0)))
    car = {"box": [-3.0, 4.0, -0.5, 2.0, 7.0, 3.0]}
    stack = [
        edit(1, "recolor", {"class": "vehicle"}, hsv=[90.0, 1.0, 1.0]),
        # the recoloured car, copied 5 m south: reads the recolour at the source
        edit(2, "duplicate", car, offset=[0.0, -5.0, 0.0]),
        # the copy raised: reads the duplicate's output 2 m lower
        edit(3, "raise", {"box": [-3.0, -1.0, -0.5, 2.0, 2.0, 3.0]}, dz=2.0, base=0.5),
        edit(4, "move", {"and": [{"class": "building"}, {"box": [2.0, 1.0, -0.5, 12.0, 13.0, 8.0]}]},
             offset=[-1.0, -3.0, 0.0], rotate_deg=10.0, pivot=[7.0, 7.0]),
        edit(5, "scale_height", {"box": [-13.0, -11.0, -1.0, -3.0, -1.0, 20.0]}, factor=1.3),
        edit(6, "remove", {"class": "vegetation"}),
        edit(7, "insert", None, asset="tower", source_box=[-1.5, -1.5, 0.01, 1.5, 1.5, 5.0],
             anchor_local=[-12.0, 14.0, 0.0], rotate_deg=30.0),
        edit(8, "restyle", {"box": [-20.0, -20.0, -2.0, 0.0, 20.0, 20.0]}, method="stats",
             transforms={"building": {"space": "rgb", "matrix": [[0.5, 0, 0], [0, 1, 0], [0, 0, 1]],
                                      "offset": [0.1, 0, 0]},
                         "*": {"space": "rgb", "matrix": [[1, 0, 0], [0, 0.8, 0], [0, 0, 1]], "offset": [0, 0, 0]}}),
        # reads the moved building (edit 4) and the inserted tower's surroundings
        edit(9, "duplicate", {"box": [0.0, -2.0, -0.5, 12.0, 12.0, 8.0]}, offset=[0.0, 0.0, 7.0]),
        edit(10, "recolor", {"polygon": {"type": "Polygon", "coordinates": [[[-6, -6], [8, -6], [8, 8], [-6, 8]]]},
                             "crs": "local"}, color=[0.1, 0.2, 0.9]),
    ]
    edited = EditedField(field, stack, ground=PlaneGround(0.0), raster_cell=0.5, assets={"tower": tower})
    assert [op.edit["op"] for op in edited.ops] == [e["op"] for e in stack]
    stage, occ, selected = nested(field, edited.ops)

    g = torch.Generator().manual_seed(0)
    lo, hi = edited.aabb[0], edited.aabb[1]
    x = lo + (hi - lo) * torch.rand(20000, 3, generator=g)
    x[:10000, 2] = torch.rand(10000, generator=g) * 4.0 - 0.5  # half near the ground, where the edits act
    dirs = torch.nn.functional.normalize(torch.randn(x.shape[0], 3, generator=g), dim=-1)
    app = torch.zeros(x.shape[0], 4)
    got = edited.samples(x, dirs, app)
    want = stage(x, Rays(dirs, app), True)
    assert_same(got, want)
    # the stack does change these samples, in each of its edits' ways (not a trivial agreement)
    plain = base_samples(field, x, Rays(dirs, app), True)
    # (measured: 770 densities and 1404 colours of the 20,000 change; half of each is required)
    assert int((got.sigma != plain.sigma).sum()) > 385 and int(((got.rgb - plain.rgb).abs().sum(-1) > 0.05).sum()) > 700
    # per-ray context (ray_index), density-only queries, occupancy and the selection probe
    rays_dirs = dirs[:100]
    ray_index = torch.arange(x.shape[0]) % 100
    got = edited.samples(x, rays_dirs, app[:100], ray_index)
    assert_same(got, stage(x, Rays(rays_dirs, app[:100], ray_index), True))
    assert_same(edited._stage(x, None, False), stage(x, None, False))
    assert torch.equal(edited._occ(x), occ(x))
    sel = edited.selected(x)
    assert torch.equal(sel, selected(x)) and 1000 < int(sel.sum()) < x.shape[0]


def test_ten_thousand_edits_apply_without_recursion(field):
    # 100 x 100 cells of 0.4 m over the block, one small edit per cell (recolour, remove
    # without fill, duplicate one cell east, recolour to a colour, in turn): a sample is
    # reached only by the edits of its own row of cells (duplicates copy along the row).
    n, side, x0 = 100, 0.4, -20.0
    stack = []
    kinds = ("recolor_hsv", "remove", "duplicate", "recolor_color")
    for r in range(n):
        for c in range(n):
            i = r * n + c
            box = [x0 + c * side, x0 + r * side, -2.0, x0 + (c + 1) * side, x0 + (r + 1) * side, 14.0]
            kind = kinds[(r + c) % 4]
            if kind == "recolor_hsv":
                stack.append(edit(i, "recolor", {"box": box}, hsv=[float(i % 360), 1.0, 1.0]))
            elif kind == "remove":
                stack.append(edit(i, "remove", {"and": [{"box": box}, {"class": "vehicle"}]}, fill_ground=False))
            elif kind == "duplicate":
                stack.append(edit(i, "duplicate", {"box": box}, offset=[side, 0.0, 0.5]))
            else:
                stack.append(edit(i, "recolor", {"box": box}, color=[0.2, 0.4, 0.6], strength=0.5))
    edited = EditedField(field, stack, ground=PlaneGround(0.0))
    assert len(edited.ops) == 10_000
    # samples on three rows (one crossing vehicles and a building) at heights around the ground
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([12, 62, 87])
    ry = rows.repeat_interleave(400)
    x = torch.stack([x0 + torch.rand(1200, generator=g) * n * side,
                     x0 + (ry + torch.rand(1200, generator=g)) * side,
                     torch.rand(1200, generator=g) * 3.0 - 0.5], -1)
    dirs = torch.nn.functional.normalize(torch.randn(1200, 3, generator=g), dim=-1)
    app = torch.zeros(1200, 4)
    limit = sys.getrecursionlimit()
    got = edited.samples(x, dirs, app)
    assert sys.getrecursionlimit() == limit
    for row in rows.tolist():
        m = ry == row
        ops = edited.ops[row * n:(row + 1) * n]  # the row's edits, in stack order
        stage, occ, _ = nested(field, ops)
        want = stage(x[m], Rays(dirs[m], app[m]), True)
        assert_same(got.take(m.nonzero().squeeze(-1)), want)
        assert torch.equal(edited._occ(x[m]), occ(x[m]))
    plain = base_samples(field, x, Rays(dirs, app), True)
    changed = ((got.rgb - plain.rgb).abs().sum(-1) > 0.05) | (got.sigma != plain.sigma)
    assert int(changed.sum()) > 90  # measured 181 of the 1200 (the rest is empty space): half is required
