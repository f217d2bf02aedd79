"""Semantic editing on a closed-form city (ground slab + boxes): exact effects of remove,
recolor, raise, scale, move/duplicate/insert; selections in CRS and lon/lat; the edit
stack (undo/redo, malformed files), the CLI, the tile wrapper, bake and the examples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from citygen.cli import entrypoint
from citygen.config import RenderConfig
from citygen.edit import EditedField, EditStack, PlaneGround, estimate_ground
from citygen.edit.analytic import (
    BUILDING,
    DEFAULT_BOXES,
    GROUND,
    GROUND_RGB,
    ROAD,
    ROAD_RGB,
    VEHICLE,
    AnalyticCityField,
    Box,
)
from citygen.edit.field import base_samples
from citygen.errors import CitygenError
from citygen.render import intersect_aabb, render_image
from citygen.render.sampling import camera_rays, look_at
from survey_io import Camera, Georef

STEP = 0.2
CAM = Camera(width=40, height=40, fl_x=40.0, fl_y=40.0, cx=20.0, cy=20.0)
NADIR = look_at(np.array([0.0, 0.0, 40.0]), np.array([0.0, 0.0, 0.0]))
OBLIQUE = look_at(np.array([28.0, -26.0, 34.0]), np.array([-3.0, 2.0, 0.0]))
GEOREF = Georef("EPSG:32633", (500000.0, 4500000.0, 0.0))
B1, B2 = DEFAULT_BOXES[0], DEFAULT_BOXES[1]


def render(field, c2w):
    return render_image(field, CAM, c2w, render=RenderConfig(step_size=STEP, chunk_rays=4096))


def pixel_of(c2w, xyz) -> tuple[int, int]:
    """(row, col) of the pixel seeing local point ``xyz``."""
    p = np.linalg.inv(c2w) @ np.append(np.asarray(xyz, float), 1.0)
    return int(CAM.cy + CAM.fl_y * p[1] / p[2]), int(CAM.cx + CAM.fl_x * p[0] / p[2])


def rays_missing(c2w, boxes, margin=1.0) -> torch.Tensor:
    """(H, W) True where the pixel's ray passes no box (grown by ``margin``, down to z = -2)."""
    o, d, _ = camera_rays(CAM, c2w)
    miss = torch.ones(o.shape[0], dtype=torch.bool)
    for b in boxes:
        box = torch.tensor([[b.lo[0] - margin, b.lo[1] - margin, -2.0], [b.hi[0] + margin, b.hi[1] + margin,
                                                                           b.hi[2] + margin]])
        miss &= ~intersect_aabb(o, d, box)[2]
    return miss.reshape(CAM.height, CAM.width)


def edit(op, selection=None, **params):
    return {"id": f"t_{op}", "op": op, "selection": selection, "params": params, "enabled": True}


def rect_polygon(x0, y0, x1, y1, to=lambda p: p):
    ring = [to([x0, y0]), to([x1, y0]), to([x1, y1]), to([x0, y1]), to([x0, y0])]
    return {"type": "Polygon", "coordinates": [ring]}


def crs(p):
    return [p[0] + GEOREF.origin[0], p[1] + GEOREF.origin[1]]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def field(one_thread):
    return AnalyticCityField(with_occupancy=True, occupancy_resolution=32)


@pytest.fixture(scope="module")
def renders(field):
    return {"nadir": render(field, NADIR), "oblique": render(field, OBLIQUE)}


# -- remove -----------------------------------------------------------------------------------------
def test_remove_buildings_reveals_ground(field, renders):
    edited = EditedField(field, [edit("remove", {"class": "building"})], ground=PlaneGround(0.0), raster_cell=0.5)
    truth = AnalyticCityField(boxes=[b for b in DEFAULT_BOXES if b.label != BUILDING], with_occupancy=True,
                              occupancy_resolution=32)
    for view, c2w in (("nadir", NADIR), ("oblique", OBLIQUE)):
        before, after, gt = renders[view], render(edited, c2w), render(truth, c2w)
        labels = after["semantics"].argmax(-1)
        assert not bool((labels == BUILDING).any()), view
        hit = gt["acc"] > 0.5
        # depth where the buildings stood equals the analytic ground (same sample positions)
        assert float((after["depth"] - gt["depth"])[hit].abs().max()) < 1e-3, view
        # outside the selection (rays that pass no building) the render is unchanged
        far = rays_missing(c2w, [B1, B2])
        assert int(far.sum()) > 300
        assert float((after["rgb"] - before["rgb"])[far].abs().max()) < 1e-6, view
        # the revealed ground: ground/road class, colour inpainted from ground and road around it
        revealed = (before["semantics"].argmax(-1) == BUILDING) & hit
        gt_labels = gt["semantics"].argmax(-1)
        on_ground = revealed & torch.isin(gt_labels, torch.tensor([GROUND, ROAD]))
        assert int(on_ground.sum()) > 20
        assert bool(torch.isin(labels[on_ground], torch.tensor([GROUND, ROAD])).all())
        assert torch.equal(labels[revealed & ~on_ground], gt_labels[revealed & ~on_ground])  # what stood behind
        g, r = torch.tensor(GROUND_RGB), torch.tensor(ROAD_RGB)
        c = after["rgb"][on_ground]
        t = ((c - r) @ (g - r) / float((g - r) @ (g - r))).clamp(0, 1)
        assert float((c - (r + t[:, None] * (g - r))).norm(dim=-1).max()) < 0.03


def test_ground_estimated_from_field(field):
    def sample(x):
        s = base_samples(field, x, None, False)
        return s.sigma, s.labels

    ground = estimate_ground(sample, field.aabb, cell=1.0, samples_per_column=96)
    pts = torch.tensor([[-8.0, -6.0], [7.0, 7.0], [15.0, -15.0], [-0.5, 5.8], [0.0, 0.0]])  # under buildings too
    assert float(ground.height(pts).abs().max()) < 0.2


# -- recolor / selections ---------------------------------------------------------------------------
def test_recolor_roofs_in_crs_polygon_changes_only_selected(field, renders):
    poly = rect_polygon(B2.lo[0] - 1, B2.lo[1] - 1, B2.hi[0] + 1, B2.hi[1] + 1, crs)
    sel = {"and": [{"class": "building"}, {"polygon": poly, "crs": "tile"}]}
    edited = EditedField(field, [edit("recolor", sel, color=[0.1, 0.8, 0.2])], georef=GEOREF, ground=PlaneGround(0.0))
    before, after = renders["nadir"], render(edited, NADIR)
    changed = (after["rgb"] - before["rgb"]).abs().sum(-1) > 1e-4
    # exactly the pixels showing building 2 changed: label building and seen inside its footprint
    o, d, z = camera_rays(CAM, NADIR)
    hitp = o + d * (before["depth"].reshape(-1) / z)[:, None]
    in_b2 = ((hitp[:, :2] >= torch.tensor(B2.lo[:2]) - 1e-3) & (hitp[:, :2] <= torch.tensor(B2.hi[:2]) + 1e-3)).all(-1)
    expected = (before["semantics"].argmax(-1) == BUILDING) & in_b2.reshape(CAM.height, CAM.width)
    assert int(expected.sum()) > 30
    assert torch.equal(changed, expected)
    assert bool((after["rgb"][changed][:, 1] > after["rgb"][changed][:, 0]).all())  # now green
    assert torch.equal(after["depth"], before["depth"])
    # the same polygon given in lon/lat selects the same samples
    to_ll = lambda p: GEOREF.local_to_lonlat(np.array([p[0], p[1], 0.0]))[:2].tolist()
    sel_ll = {"and": [{"class": "building"}, {"polygon": rect_polygon(B2.lo[0] - 1, B2.lo[1] - 1, B2.hi[0] + 1,
                                                                      B2.hi[1] + 1, to_ll), "crs": "lonlat"}]}
    edited_ll = EditedField(field, [edit("recolor", sel_ll, color=[0.1, 0.8, 0.2])], georef=GEOREF,
                            ground=PlaneGround(0.0))
    assert torch.equal(render(edited_ll, NADIR)["rgb"], after["rgb"])


def test_height_and_not_selections(field):
    sel = {"and": [{"height": [5.0, 100.0]}, {"not": {"class": "vegetation"}}]}
    edited = EditedField(field, [edit("recolor", sel, hsv=[0.0, 0.0, 1.0])], ground=PlaneGround(0.0))
    x = torch.tensor([[-8.0, -6.0, 9.0], [-8.0, -6.0, 3.0], [7.0, 7.0, 5.5], [6.0, -10.0, 2.0]])
    d = torch.tensor([[0.0, 0.0, -1.0]]).expand(4, 3)
    s = edited.samples(x, d, torch.zeros(4, 4))
    grey = (s.rgb.max(-1).values - s.rgb.min(-1).values) < 1e-5
    assert grey.tolist() == [True, False, True, False]


# -- geometry edits ---------------------------------------------------------------------------------
def test_raise_moves_roof_by_dz(field, renders):
    sel = {"and": [{"class": "building"}, {"polygon": rect_polygon(-13, -11, -3, -1, crs)}]}
    edited = EditedField(field, [edit("raise", sel, dz=3.0)], georef=GEOREF, ground=PlaneGround(0.0))
    assert float(edited.aabb[1, 2]) == pytest.approx(17.0)
    before, after = renders["nadir"], render(edited, NADIR)
    roof1 = pixel_of(NADIR, (-8.0, -6.0, 10.0))
    roof2 = pixel_of(NADIR, (7.0, 7.0, 6.0))
    assert float(before["depth"][roof1] - after["depth"][roof1]) == pytest.approx(3.0, abs=0.05)
    assert float(before["depth"][roof2] - after["depth"][roof2]) == pytest.approx(0.0, abs=STEP)
    assert int(after["semantics"][roof1].argmax()) == BUILDING
    # the walls were extended: a point 1.5 m above the ground inside the raised building is solid
    assert float(edited.density(torch.tensor([[-8.0, -6.0, 1.5], [-8.0, -6.0, 12.5]]))[0].min()) > 100


def test_scale_height(field, renders):
    edited = EditedField(field, [edit("scale_height", {"box": [-13, -11, -1, -3, -1, 20]}, factor=1.5)],
                         ground=PlaneGround(0.0))
    roof1 = pixel_of(NADIR, (-8.0, -6.0, 10.0))
    after = render(edited, NADIR)
    # roof at base + (10 - base) * 1.5 = 14.5 m (base 1 m)
    assert float(renders["nadir"]["depth"][roof1] - after["depth"][roof1]) == pytest.approx(4.5, abs=STEP)


def test_move_instance_and_duplicate(field, renders):
    click = {"instance": {"class": "vehicle", "point": [-0.5, 5.8]}}
    moved = EditedField(field, [edit("move", click, offset=[0.0, -4.0, 0.0])], ground=PlaneGround(0.0),
                        raster_cell=0.5)
    after = render(moved, NADIR)
    lab = after["semantics"].argmax(-1)
    new, old, other = pixel_of(NADIR, (-0.5, 1.8, 0)), pixel_of(NADIR, (-0.5, 5.8, 0)), pixel_of(NADIR, (-13.5, 8.8, 0))
    assert int(lab[new]) == VEHICLE and int(lab[old]) in (GROUND, ROAD) and int(lab[other]) == VEHICLE
    assert float(after["depth"][new]) == pytest.approx(40.0 - 1.5, abs=STEP)
    assert float(after["depth"][old]) == pytest.approx(40.0, abs=STEP)

    dup = EditedField(field, [edit("duplicate", {"box": [-16, 7, -0.5, -11, 11, 3]}, offset=[0.0, -5.0, 0.0])],
                      ground=PlaneGround(0.0))
    lab = render(dup, NADIR)["semantics"].argmax(-1)
    assert int(lab[pixel_of(NADIR, (-13.5, 3.8, 0))]) == VEHICLE and int(lab[other]) == VEHICLE


def test_insert_asset_at_crs_anchor(field):
    tower = AnalyticCityField(boxes=[Box((-1.0, -1.0, 0.0), (1.0, 1.0, 4.0), (0.9, 0.9, 0.1), BUILDING)],
                              aabb=((-3.0, -3.0, -2.0), (3.0, 3.0, 6.0)))
    anchor = [GEOREF.origin[0] - 10.0, GEOREF.origin[1] + 14.0, 0.0]
    edited = EditedField(field, [edit("insert", None, asset="assets/tower", source_box=[-1.5, -1.5, 0.01, 1.5, 1.5, 5],
                                      anchor_crs=anchor)],
                         georef=GEOREF, ground=PlaneGround(0.0), assets={"assets/tower": tower})
    after = render(edited, NADIR)
    px = pixel_of(NADIR, (-10.0, 14.0, 4.0))  # the roof centre
    assert int(after["semantics"][px].argmax()) == BUILDING
    assert float(after["depth"][px]) == pytest.approx(40.0 - 4.0, abs=STEP)
    assert torch.allclose(after["rgb"][px], torch.tensor([0.9, 0.9, 0.1]), atol=1e-4)


# -- the stack --------------------------------------------------------------------------------------
def test_stack_roundtrip_undo_redo(tmp_path):
    stack = EditStack.load(tmp_path)
    a = stack.add("remove", {"class": "vehicle"})
    b = stack.add("raise", {"box": [0, 0, 0, 5, 5, 30]}, {"dz": 2.0})
    stack.save()
    loaded = EditStack.load(tmp_path)
    assert [e["id"] for e in loaded.edits] == [a["id"], b["id"]]
    assert loaded.undo()["id"] == b["id"]
    loaded.save()
    again = EditStack.load(tmp_path)
    assert [e["id"] for e in again.edits] == [a["id"]] and [e["id"] for e in again.undone] == [b["id"]]
    assert again.redo()["id"] == b["id"]
    again.undo()
    c = again.add("recolor", {"class": "road"}, {"hsv": [30, 1, 1]})
    assert again.undone == [] and [e["id"] for e in again.edits] == [a["id"], c["id"]]
    with pytest.raises(CitygenError, match="nothing to redo"):
        again.redo()
    again.save()
    assert json.loads((tmp_path / "edits.json").read_text())["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["edits.json"]  # no temp files left


BAD_STACKS = [
    ("not json {", "not valid JSON"),
    ('{"version": 2, "edits": []}', "version"),
    ('[1, 2]', "must be a JSON object"),
    ('{"version": 1, "edits": [{"id": "a", "op": "explode", "selection": null, "params": {}}]}', "unknown op"),
    (('{"version": 1, "edits": [{"id": "a", "op": "remove", "selection": {"polygon": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [1, 1], [0, 0]]]}}, "params": {}}]}'), "3 distinct vertices"),
    ('{"version": 1, "edits": [{"id": "a", "op": "raise", "selection": null, "params": {"dz": NaN}}]}', "non-finite"),
    (('{"version": 1, "edits": [{"id": "a", "op": "remove", "selection": {"box": [0, 0, 0, 1e7, 1, 1]}, '
     '"params": {}}]}'), "box side beyond"),
    ('{"version": 1, "edits": [{"id": "a", "op": "raise", "selection": null, "params": {"dz": 1e9}}]}', "outside"),
    (('{"version": 1, "edits": [{"id": "a", "op": "insert", "selection": null, "params": {"asset": "../other/ckpt", '
     '"source_box": [0, 0, 0, 1, 1, 1], "anchor_local": [0, 0, 0]}}]}'), "escapes the tile folder"),
    (('{"version": 1, "edits": [{"id": "a", "op": "insert", "selection": null, "params": {"asset": "/etc/passwd", '
     '"source_box": [0, 0, 0, 1, 1, 1], "anchor_local": [0, 0, 0]}}]}'), "escapes the tile folder"),
    (('{"version": 1, "edits": [{"id": "a", "op": "remove", "selection": null, "params": {}}, '
     '{"id": "a", "op": "remove", "selection": null, "params": {}}]}'), "duplicate edit id"),
    ('{"version": 1, "edits": [{"id": "a", "op": "remove", "selection": {"sphere": [0, 0, 0, 1]}, "params": {}}]}',
     "unknown selection kind"),
    (('{"version": 1, "edits": [{"id": "a", "op": "remove", "selection": {"polygon": {"type": "Polygon", '
     '"coordinates": [[["a", 0], [1, 0], [1, 1]]]}}, "params": {}}]}'), "must hold numbers"),
    ('{"version": 1, "edits": [{"id": "a", "op": "remove", "selection": {"class": "spaceship"}, "params": {}}]}',
     "unknown class"),
]


@pytest.mark.parametrize("text,reason", BAD_STACKS)
def test_malformed_stack_is_a_clear_error(tmp_path, capsys, text, reason):
    path = tmp_path / "edits.json"
    path.write_text(text)
    with pytest.raises(CitygenError) as err:
        EditStack.load(tmp_path)
    assert str(path) in str(err.value) and reason in str(err.value)
    assert entrypoint(["edit", str(tmp_path), "list"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and str(path) in line and reason in line


def test_cli_add_list_undo_redo(tmp_path, capsys):
    poly = tmp_path / "district.geojson"
    poly.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": rect_polygon(-13, -11, -3, -1, crs)}]}))
    tile = tmp_path / "tile"
    tile.mkdir()
    assert entrypoint(["edit", str(tile), "add", "--op", "remove", "--class", "vehicle"]) == 0
    assert entrypoint(["edit", str(tile), "add", "--op", "raise", "--class", "building", "--polygon", str(poly),
                       "--dz", "10"]) == 0
    assert entrypoint(["edit", str(tile), "add", "--op", "recolor", "--box", "0,0,0,5,5,20", "--color",
                       "1,0,0"]) == 0
    assert entrypoint(["edit", str(tile), "undo"]) == 0
    capsys.readouterr()
    assert entrypoint(["edit", str(tile), "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["op"] for e in listed["edits"]] == ["remove", "raise"] and len(listed["undone"]) == 1
    stack = EditStack.load(tile)
    assert [e["op"] for e in stack.edits] == ["remove", "raise"] and [e["op"] for e in stack.undone] == ["recolor"]
    raise_sel = stack.edits[1]["selection"]["and"]
    assert raise_sel[0] == {"class": "building"} and raise_sel[1]["crs"] == "tile"
    assert entrypoint(["edit", str(tile), "redo"]) == 0
    assert [e["op"] for e in EditStack.load(tile).edits] == ["remove", "raise", "recolor"]
    # bad flags and bad files: one line, exit 2
    assert entrypoint(["edit", str(tile), "add", "--op", "raise", "--class", "building"]) == 2
    assert entrypoint(["edit", str(tile), "add", "--op", "remove", "--box", "1,2,3"]) == 2
    (tmp_path / "bad.geojson").write_text('{"type": "Point", "coordinates": [0, 0]}')
    assert entrypoint(["edit", str(tile), "add", "--op", "remove", "--polygon", str(tmp_path / "bad.geojson")]) == 2
    assert "bad.geojson" in capsys.readouterr().err


# -- tiles, bake, examples --------------------------------------------------------------------------
def _tiny_tile(tmp_path: Path, teacher) -> Path:
    """A single-block 'tile' (a training run folder) holding a small CityField fit to ``teacher``."""
    from citygen.config import TrainConfig, to_dict
    from citygen.edit.bake import distill
    from citygen.store.checkpoint import save_checkpoint
    from citygen.store.field import build_field
    from survey_io.semantics import CLASSES

    cfg = TrainConfig()
    cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.base_resolution = 4, 12, 4
    cfg.field.max_resolution, cfg.field.hidden_dim, cfg.field.appearance_dim = 48, 16, 4
    cfg.field.semantic_hidden_dim, cfg.field.backend = 16, "torch"
    cfg.render.grid_resolution, cfg.render.step_size = 16, 0.5
    torch.manual_seed(0)
    f = build_field(cfg, teacher.aabb.numpy(), 2, len(CLASSES), torch.tensor([[0.0, 0.0, 40.0], [5.0, 0.0, 40.0]]),
                    torch.device("cpu"))
    distill(teacher, f, steps=120, batch=2048, lr=1e-2, step_size=0.5)
    f.occupancy.occupied.fill_(True)
    tile = tmp_path / "tile"
    meta = {"config": to_dict(cfg), "aabb": teacher.aabb.tolist(), "classes": list(CLASSES),
            "georef": GEOREF.to_dict(), "image_names": ["a.png", "b.png"], "optimizer": {"type": "Adam", "groups": []}}
    save_checkpoint(tile / "checkpoints", 120, {f"model.{k}": v for k, v in f.state_dict().items()}, meta)
    return tile


def test_bake_folds_removal_into_weights(tmp_path, field):
    from citygen.edit import tile_field_wrapper
    from citygen.edit.tile import tile_blocks, tile_georef
    from citygen.store.field import load_field

    tile = _tiny_tile(tmp_path, field)
    assert list(tile_blocks(tile)) == ["block"] and tile_georef(tile) == GEOREF
    stack = EditStack(tile_dir=tile, ground={"kind": "plane", "height": 0.0})
    stack.add("remove", {"box": [-12.5, -10.5, 0.5, -3.5, -1.5, 12]})
    stack.save()
    original, _ = load_field(tile)
    inside = torch.stack(torch.meshgrid(torch.linspace(-11, -5, 5), torch.linspace(-9, -3, 5), torch.linspace(2, 9, 5),
                                        indexing="ij"), -1).reshape(-1, 3)
    wrapped = tile_field_wrapper(tile)("block", original)
    assert isinstance(wrapped, EditedField) and float(wrapped.density(inside)[0].detach().max()) == 0.0
    with torch.no_grad():
        assert float(original.density(inside)[0].mean()) > 1.0  # the small field did learn the building
    # the selection weight through the tile renderer (a learned field): the removed box vs elsewhere
    from citygen.edit.probe import selection_weight
    from citygen.render.tile import TileRenderer

    renderer = TileRenderer.open(tile, apply_edits=False)
    weight = selection_weight(renderer, tile, CAM, NADIR)
    assert renderer.field_wrapper is None and renderer.background_color is None  # restored
    assert float(weight[pixel_of(NADIR, (-8.0, -6.0, 10.0))]) > 0.9
    assert float(weight[pixel_of(NADIR, (7.0, 7.0, 6.0))]) < 0.01 and float(weight[pixel_of(NADIR, (15, -15, 0))]) < 0.01
    out = tmp_path / "baked"
    assert entrypoint(["edit", str(tile), "bake", "--out", str(out), "--steps", "80"]) == 0
    baked, meta = load_field(out)
    assert meta["baked_edits"] == [stack.edits[0]["id"]]
    # opacity over one marching step inside the removed building: opaque before, mostly clear after
    alpha = lambda f: float((1 - torch.exp(-f.density(inside)[0].detach() * 0.5)).mean())
    assert alpha(original) > 0.9 and alpha(baked) < 0.2, (alpha(original), alpha(baked))
    baked_stack = EditStack.load(out)
    assert baked_stack.edits == [] and [e["id"] for e in baked_stack.baked] == [stack.edits[0]["id"]]
    assert EditStack.load(tile).edits == stack.edits  # the source tile is untouched
    assert entrypoint(["edit", str(tile), "bake", "--out", str(out)]) == 2  # refuses to overwrite


@pytest.mark.parametrize("name", ["remove_vehicles", "recolor_roofs_in_polygon", "raise_district"])
def test_examples_run(tmp_path, name):
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(tmp_path / name, size=32)
    assert (tmp_path / name / "before.png").is_file() and (tmp_path / name / "after.png").is_file()
    assert (tmp_path / name / "tile" / "edits.json").is_file()
    assert summary["check"] is True, summary


def test_tile_renderer_applies_edits_through_field_wrapper(field):
    """Two blocks split at x = 0 (a vehicle straddles the seam); the wrapper edits each block."""
    from citygen.partition.plan import Block, Grid, TilePlan
    from citygen.render.tile import BlockSource, TileRenderer

    margin = 4.0
    grid = Grid(origin=(-20.0, -20.0), block_size=(20.0, 40.0), rows=1, cols=2)
    blocks, fields = [], {}
    for c in range(2):
        core = grid.core(0, c)
        ext = (max(core[0] - margin, -20.0), core[1], min(core[2] + margin, 20.0), core[3])
        blocks.append(Block(id=f"b_r0_c{c}", row=0, col=c, core=core, extended=ext, z_range=(-2.0, 14.0)))
        fields[blocks[-1].id] = AnalyticCityField(aabb=((ext[0], ext[1], -2.0), (ext[2], ext[3], 14.0)),
                                                  with_occupancy=True, occupancy_resolution=32)
    plan = TilePlan(georef=GEOREF, grid=grid, margin_m=margin, blocks=blocks)
    sources = [BlockSource(b.id, b.core, b.extended, fields[b.id].aabb.numpy().astype(np.float64),
                           (lambda f=fields[b.id]: f)) for b in blocks]
    renderer = TileRenderer(plan, sources, classes=("ground", "road", "building", "vegetation", "water", "vehicle",
                                                    "other"), render_config=RenderConfig(step_size=STEP))
    before = renderer.render_view(CAM, NADIR)
    edits = [edit("remove", {"class": "vehicle"})]
    renderer.field_wrapper = lambda block_id, f: EditedField(f, edits, ground=PlaneGround(0.0), raster_cell=0.5)
    after = renderer.render_view(CAM, NADIR)
    labels = after["semantics"].argmax(-1)
    assert int((before["semantics"].argmax(-1) == VEHICLE).sum()) > 5 and not bool((labels == VEHICLE).any())
    single = render(EditedField(field, edits, ground=PlaneGround(0.0), raster_cell=0.5), NADIR)
    hit = single["acc"] > 0.5
    assert float((after["depth"] - single["depth"])[hit].abs().max()) < 1e-3
    assert float((after["rgb"] - single["rgb"])[hit].abs().mean()) < 0.01


def test_selection_weight_marks_what_a_removal_may_change(field, renders):
    """The probe renders, per pixel, the unedited ray's opacity share on selected samples: ~1
    where a building stops the ray, exactly 0 where the ray meets no building; and removing
    the buildings (with the ground fill) leaves every pixel of weight 0 untouched."""
    from citygen.edit.probe import SelectionProbe

    edited = EditedField(field, [edit("remove", {"class": "building"})], ground=PlaneGround(0.0), raster_cell=0.5)
    for view, c2w in (("nadir", NADIR), ("oblique", OBLIQUE)):
        before, after = renders[view], render(edited, c2w)
        probe = render(SelectionProbe(edited), c2w)
        weight = probe["rgb"][..., 0]
        assert torch.equal(probe["depth"], before["depth"]) and torch.equal(probe["acc"], before["acc"])
        building = before["semantics"].argmax(-1) == BUILDING
        assert int(building.sum()) > 50 and float(weight[building].min()) > 0.99, view
        miss = rays_missing(c2w, [B1, B2], margin=0.05)
        assert int(miss.sum()) > 300 and float(weight[miss].abs().max()) == 0.0, view
        outside = weight == 0
        # unchanged, but for a grazing ray whose first sample under the ground falls under a
        # wall's base (inside the fill) without any sample in the building: a sampling effect
        changed = (after["rgb"] - before["rgb"]).abs().amax(-1) > 1e-6
        assert float(changed[outside].float().mean()) < 0.005, view
        assert float((after["rgb"] - before["rgb"])[outside].abs().max()) < 0.01, view
        assert float((after["depth"] - before["depth"])[outside].abs().max()) < 1e-4, view
