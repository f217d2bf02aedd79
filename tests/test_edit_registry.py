"""The edit-operation registry: parameters declared once per operation class (checks, defaults,
command-line flags derived from them), edits.json written as before, and the ``lower``
operation added as one class (render, occupancy, export) against closed-form expectations."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from citygen.cli import entrypoint
from citygen.config import RenderConfig
from citygen.edit import EditedField, EditStack, PlaneGround
from citygen.edit.analytic import BUILDING, AnalyticCityField
from citygen.edit.ops import OP_CLASSES, OPS, PARAM_KEYS, validate_params
from citygen.edit.params import _kind
from citygen.edit.selection import SpecError
from citygen.render import render_image
from citygen.render.sampling import look_at
from survey_io import Camera, Georef

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

GEOREF = Georef("EPSG:32633", (500000.0, 4500000.0, 0.0))
STEP = 0.2
CAM = Camera(width=40, height=40, fl_x=40.0, fl_y=40.0, cx=20.0, cy=20.0)
NADIR = look_at(np.array([0.0, 0.0, 40.0]), np.array([0.0, 0.0, 0.0]))
# building 1 of the analytic city: x -12..-4, y -10..-2, roof at 10 m; building 2 (3..11, 2..12) roof at 6 m
B1_SEL = {"and": [{"class": "building"}, {"box": [-13.0, -11.0, -1.0, -3.0, -1.0, 20.0]}]}

#: the smallest valid params of every operation (written here, not taken from the registry)
MINIMAL = {
    "remove": {},
    "recolor": {"color": [0.5, 0.5, 0.5]},
    "restyle": {"method": "named", "transforms": {"*": {"matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}}},
    "raise": {"dz": 1.0},
    "scale_height": {"factor": 2.0},
    "move": {"offset": [1.0, 0.0, 0.0], "pivot": [0.0, 0.0]},
    "duplicate": {"offset": [1.0, 0.0, 0.0], "pivot": [0.0, 0.0]},
    "insert": {"asset": "asset/checkpoints", "source_box": [-1, -1, 0, 1, 1, 3], "anchor_local": [0, 0, 0]},
    "lower": {"dz": 1.0},
}


def pixel_of(c2w, xyz) -> tuple[int, int]:
    """(row, col) of the pixel seeing local point ``xyz``."""
    p = np.linalg.inv(c2w) @ np.append(np.asarray(xyz, float), 1.0)
    return int(CAM.cy + CAM.fl_y * p[1] / p[2]), int(CAM.cx + CAM.fl_x * p[0] / p[2])


def edit(op, selection=None, **params):
    return {"id": f"t_{op}", "op": op, "selection": selection, "params": params, "enabled": True}


def test_every_declared_range_and_type_is_enforced():
    assert set(OPS) == set(MINIMAL)  # a new op gets its minimal params here
    for op, cls in OP_CLASSES.items():
        validate_params(op, MINIMAL[op])
        for f in dataclasses.fields(cls.Params):
            lo, hi = f.metadata["lo"], f.metadata["hi"]
            if _kind(f) == "float" and math.isfinite(lo):
                for v in (lo, hi):
                    validate_params(op, {**MINIMAL[op], f.name: v})
                for v in (lo - 0.5 * (hi - lo + 1), hi + 0.5 * (hi - lo + 1)):
                    with pytest.raises(SpecError, match=rf"param '{f.name}' = .* is outside"):
                        validate_params(op, {**MINIMAL[op], f.name: v})
                with pytest.raises(SpecError, match="non-finite"):
                    validate_params(op, {**MINIMAL[op], f.name: float("nan")})
            if _kind(f) == "bool":
                with pytest.raises(SpecError, match="must be true or false"):
                    validate_params(op, {**MINIMAL[op], f.name: 1})
            if _kind(f) == "list[float]":
                with pytest.raises(SpecError, match="must be a list of"):
                    validate_params(op, {**MINIMAL[op], f.name: [1.0] * (f.metadata["n"] + 1)})
        if not cls.open_keys:
            with pytest.raises(SpecError, match=f"unknown param 'bogus' for {op}"):
                validate_params(op, {**MINIMAL[op], "bogus": 1})
    # the keys each op reads, as the stack format documents them
    assert PARAM_KEYS["raise"] == PARAM_KEYS["lower"] == {"dz", "base"}
    assert PARAM_KEYS["move"] == {"offset", "rotate_deg", "pivot", "fill_ground", "thickness", "reach"}
    assert "restyle" not in PARAM_KEYS


def test_op_specific_checks_still_hold():
    for op, params, reason in [
        ("recolor", {"color": [1, 0, 0], "hsv": [0, 1, 1]}, "exactly one of"),
        ("recolor", {"color": [1.5, 0, 0]}, "RGB in"),
        ("recolor", {"matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "space": "xyz"}, "'rgb' or 'lab'"),
        ("move", {"offset": [1, 0, 0], "rotate_deg": 30}, "pivot"),
        ("duplicate", {"offset": [2e5, 0, 0]}, "beyond 100 km"),
        ("insert", {**MINIMAL["insert"], "anchor_crs": [0, 0, 0]}, "exactly one of 'anchor_crs'"),
        ("insert", {**MINIMAL["insert"], "source_box": [1, 1, 1, 0, 0, 0]}, "min < max"),
        ("insert", {**MINIMAL["insert"], "asset": "../x"}, "escapes the tile folder"),
        ("restyle", {"method": "stats", "transforms": {}}, "needs 'transforms'"),
        ("lower", {}, "param 'dz' is required"),
    ]:
        with pytest.raises(SpecError, match=reason):
            validate_params(op, params)


def test_cli_writes_the_same_edits_json(tmp_path):
    """The params the flags produce, key order included (compared byte for byte with the
    edits.json of the version before the registry on the same commands)."""
    tile = tmp_path / "tile"
    tile.mkdir()
    runs = [
        ["--op", "remove", "--class", "vehicle"],
        ["--op", "remove", "--box", "0,0,0,5,5,20", "--no-fill"],
        ["--op", "recolor", "--class", "building", "--color", "0.2,0.4,0.6"],
        ["--op", "recolor", "--height", "2,30", "--hsv", "30,1.2,0.9"],
        ["--op", "raise", "--class", "building", "--dz", "2.5"],
        ["--op", "scale_height", "--box", "0,0,0,5,5,20", "--factor", "1.5", "--params", '{"base": 0.5}'],
        ["--op", "move", "--instance", "-0.5,5.8", "--class", "vehicle", "--offset", "0,-4,0", "--no-fill"],
        ["--op", "move", "--class", "vehicle", "--offset", "1,2,0", "--rotate", "30", "--pivot", "3,4"],
        ["--op", "duplicate", "--box", "0,0,0,5,5,20", "--offset", "0,-5,0", "--rotate", "90", "--pivot", "1,1"],
        ["--op", "duplicate", "--box", "0,0,0,5,5,20", "--offset", "0,-5,0", "--pivot", "1,1"],  # no rotation
    ]
    for argv in runs:
        assert entrypoint(["edit", str(tile), "add", *argv]) == 0, argv
    edits = json.loads((tile / "edits.json").read_text())["edits"]
    assert [(e["op"], list(e["params"].items())) for e in edits] == [
        ("remove", []),
        ("remove", [("fill_ground", False)]),
        ("recolor", [("color", [0.2, 0.4, 0.6])]),
        ("recolor", [("hsv", [30.0, 1.2, 0.9])]),
        ("raise", [("dz", 2.5)]),
        ("scale_height", [("factor", 1.5), ("base", 0.5)]),
        ("move", [("fill_ground", False), ("offset", [0.0, -4.0, 0.0])]),
        ("move", [("offset", [1.0, 2.0, 0.0]), ("rotate_deg", 30.0), ("pivot", [3.0, 4.0])]),
        ("duplicate", [("offset", [0.0, -5.0, 0.0]), ("rotate_deg", 90.0), ("pivot", [1.0, 1.0])]),
        ("duplicate", [("offset", [0.0, -5.0, 0.0])]),
    ]


def test_new_op_reaches_the_cli_without_a_cli_edit(tmp_path, capsys):
    tile = tmp_path / "tile"
    tile.mkdir()
    assert entrypoint(["edit", str(tile), "add", "--op", "lower", "--class", "building", "--dz", "2"]) == 0
    assert entrypoint(["edit", str(tile), "add", "--op", "lower", "--params", '{"dz": 1, "base": 0.5}']) == 0
    assert [e["params"] for e in EditStack.load(tile).edits] == [{"dz": 2.0}, {"dz": 1, "base": 0.5}]
    capsys.readouterr()
    for argv, flag, text in [(["--op", "lower"], "--op lower needs --dz", ""),
                             (["--op", "lower", "--dz", "-1"], "--dz:", "outside [0, 1000]"),
                             (["--op", "lower", "--dz", "nan"], "--dz:", "non-finite"),
                             (["--op", "lower", "--dz", "1", "--params", '{"bse": 1}'], "--params:", "'bse'")]:
        assert entrypoint(["edit", str(tile), "add", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and text in err, (argv, err)
    assert len(EditStack.load(tile).edits) == 2  # nothing half-written


# -- the lower operation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def field(one_thread):
    return AnalyticCityField(with_occupancy=True, occupancy_resolution=32)


def solid(f, pts) -> list[bool]:
    with torch.no_grad():
        return (f.density(torch.tensor(pts))[0] > 100).tolist()


def test_lower_moves_the_selection_down_and_leaves_the_rest(field):
    lowered = EditedField(field, [edit("lower", B1_SEL, dz=3.0)], ground=PlaneGround(0.0))
    # closed form: building 1 (roof 10 m) now ends at 7 m; below base (1 m) and building 2 unchanged
    column = [[-8.0, -6.0, z] for z in (0.5, 3.0, 6.8, 7.2, 8.5, 9.5)]
    assert solid(lowered, column) == [True, True, True, False, False, False]
    assert solid(lowered, [[7.0, 7.0, 5.5], [7.0, 7.0, 6.5]]) == [True, False]
    assert torch.equal(lowered.aabb, field.aabb)  # lowering brings no matter anywhere new
    # the same as raising by -dz: every sample and the conservative occupancy grid
    raised = EditedField(field, [edit("raise", B1_SEL, dz=-3.0)], ground=PlaneGround(0.0))
    g = torch.linspace(0, 1, 24)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    x = field.aabb[0] + grid * (field.aabb[1] - field.aabb[0])
    d = torch.tensor([[0.0, 0.0, -1.0]]).expand(len(x), 3)
    with torch.no_grad():
        a, b = lowered.samples(x, d, torch.zeros(len(x), 4)), raised.samples(x, d, torch.zeros(len(x), 4))
        assert torch.equal(a.sigma, b.sigma) and torch.equal(a.rgb, b.rgb) and torch.equal(a.labels, b.labels)
        assert torch.equal(lowered.occupancy.occupied, raised.occupancy.occupied)
        # conservative: every sample holding matter lies in an occupied cell
        assert bool(lowered.occupancy.query(x[a.sigma > 0]).all())
    # rendered: the roof of building 1 is 3 m further from a nadir camera, building 2's is not
    cfg = RenderConfig(step_size=STEP, chunk_rays=4096)
    before, after = render_image(field, CAM, NADIR, render=cfg), render_image(lowered, CAM, NADIR, render=cfg)
    roof1, roof2 = pixel_of(NADIR, (-8.0, -6.0, 10.0)), pixel_of(NADIR, (7.0, 7.0, 6.0))
    assert float(after["depth"][roof1] - before["depth"][roof1]) == pytest.approx(3.0, abs=STEP)
    assert float(after["depth"][roof2] - before["depth"][roof2]) == pytest.approx(0.0, abs=1e-6)
    assert int(after["semantics"][roof1].argmax()) == BUILDING


def test_lower_through_the_tile_renderer_and_export(field, tmp_path):
    """DSM and class raster of an exported tile with building 1 lowered: the analytic heights."""
    import rasterio

    from citygen.export.run import ExportOptions, export_scene
    from citygen.partition.plan import Block, Grid, TilePlan
    from citygen.render.tile import BlockSource, TileRenderer

    grid = Grid(origin=(-20.0, -20.0), block_size=(40.0, 40.0), rows=1, cols=1)
    block = Block(id="b_r0_c0", row=0, col=0, core=grid.core(0, 0), extended=grid.core(0, 0), z_range=(-2.0, 14.0))
    source = BlockSource(block.id, block.core, block.extended, field.aabb.numpy().astype(np.float64), lambda: field)
    renderer = TileRenderer(TilePlan(georef=GEOREF, grid=grid, margin_m=0.0, blocks=[block]), [source],
                            classes=("ground", "road", "building", "vegetation", "water", "vehicle", "other"),
                            render_config=RenderConfig(step_size=0.1))
    edits = [edit("lower", B1_SEL, dz=4.0)]
    renderer.field_wrapper = lambda block_id, f: EditedField(f, edits, ground=PlaneGround(0.0))
    rect = (-14.0, -12.0, 14.0, 14.0)
    export_scene(renderer, tmp_path, ExportOptions(what=("dsm", "semantics"), gsd=1.0, rect=rect, progress=False))
    with rasterio.open(tmp_path / "dsm.tif") as src:
        dsm = src.read(1)
        cols, rows = np.meshgrid(np.arange(src.width) + 0.5, np.arange(src.height) + 0.5)
        x, y = src.transform.c + cols - GEOREF.origin[0], src.transform.f - rows - GEOREF.origin[1]
    with rasterio.open(tmp_path / "semantics.tif") as src:
        labels = src.read(1)
    in1 = (x > -12) & (x < -4) & (y > -10) & (y < -2)
    in2 = (x > 3) & (x < 11) & (y > 2) & (y < 12)
    assert int(in1.sum()) == 64 and int(in2.sum()) == 80
    np.testing.assert_allclose(dsm[in1], 6.0, atol=0.12)   # 10 m - 4 m
    np.testing.assert_allclose(dsm[in2], 6.0, atol=0.12)   # untouched
    assert (labels[in1] == BUILDING).all() and (labels[in2] == BUILDING).all()
