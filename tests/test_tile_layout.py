"""The tile layout has one owner (citygen.store.layout): render, edit and export see the same blocks.

The folder built here holds both a plan (three blocks, two of them trained) and a top-level
``checkpoints/`` (a stray single training run).  Before the layout had one owner, the renderer
read such a folder as the plan's tile and the editor as one block named "block".  The expected
block lists below are what the test wrote into the plan, not what any reader reports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from citygen.cli import entrypoint
from citygen.config import TrainConfig, to_dict
from citygen.edit import EditStack, tile_blocks, tile_field_wrapper
from citygen.errors import CitygenError
from citygen.export.run import ExportOptions, export_tile
from citygen.partition import Block, Grid, TilePlan
from citygen.render.tile import TileRenderer
from citygen.store import layout
from citygen.store.checkpoint import save_checkpoint
from citygen.store.field import build_field
from citygen.tile import open_tile, resolve_config
from survey_io import Georef
from survey_io.semantics import CLASSES

GEOREF = {"crs": "EPSG:32651", "origin": [354281.0, 3456101.0, 14.0]}
SIZE, MARGIN = 8.0, 1.0
TRAINED, UNTRAINED = ["b_r0_c0", "b_r0_c1"], "b_r1_c0"


def tiny_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.max_resolution = 2, 10, 16
    cfg.field.hidden_dim, cfg.field.appearance_dim, cfg.field.backend = 16, 4, "torch"
    cfg.render.grid_resolution = 8
    return cfg


def write_run(folder, aabb: np.ndarray, seed: int) -> None:
    """A (small, untrained) field checkpoint in ``folder/checkpoints``."""
    cfg = tiny_config()
    torch.manual_seed(seed)
    f = build_field(cfg, aabb, 2, len(CLASSES), torch.zeros(2, 3), torch.device("cpu"))
    save_checkpoint(folder / "checkpoints", 1, {f"model.{k}": v for k, v in f.state_dict().items()},
                    {"config": to_dict(cfg), "aabb": aabb.tolist(), "classes": list(CLASSES),
                     "image_names": ["a", "b"], "optimizer": {"type": "Adam", "groups": []}, "georef": GEOREF})


@pytest.fixture
def both(tmp_path):
    """A tile folder holding plan.json (blocks r0_c0, r0_c1 trained, r1_c0 not) and a top-level checkpoints/."""
    tile = tmp_path / "tile"
    blocks = []
    for bid in (*TRAINED, UNTRAINED):
        r, c = int(bid[3]), int(bid[6])
        core = (c * SIZE, r * SIZE, (c + 1) * SIZE, (r + 1) * SIZE)
        ext = (core[0] - MARGIN, core[1] - MARGIN, core[2] + MARGIN, core[3] + MARGIN)
        blocks.append(Block(id=bid, row=r, col=c, core=core, extended=ext, z_range=(-2.0, 6.0), images=["a", "b"]))
    plan = TilePlan(georef=Georef.from_dict(GEOREF), grid=Grid(origin=(0.0, 0.0), block_size=(SIZE, SIZE), rows=2,
                                                                  cols=2), margin_m=MARGIN, blocks=blocks)
    tile.mkdir()
    plan.save(tile / "plan.json")
    for i, b in enumerate(blocks[:2]):
        write_run(tile / f"block_{b.id}", np.array([[*b.extended[:2], -2.0], [*b.extended[2:], 6.0]]), i)
    write_run(tile, np.array([[-3.0, -3.0, -2.0], [3.0, 3.0, 6.0]]), 7)  # the stray single run
    return tile


def test_render_edit_and_export_see_the_same_blocks(both, tmp_path):
    assert TileRenderer.open(both).block_ids == TRAINED
    assert open_tile(both).block_ids == TRAINED and open_tile(both).missing_blocks == [UNTRAINED]
    assert list(tile_blocks(both)) == TRAINED
    assert list(layout.discover(both).trained) == TRAINED

    # an edit of the tile: its wrapper is asked for the plan's blocks, and the renderer applies it
    stack = EditStack.load(both)
    stack.add("recolor", {"class": "road"}, {"hsv": [30, 1, 1]})
    stack.save()
    seen = []
    wrap = tile_field_wrapper(both)
    renderer = TileRenderer.open(both)
    renderer.field_wrapper = lambda bid, f: seen.append(bid) or wrap(bid, f)
    renderer.render_rays(torch.tensor([[4.0, 4.0, 20.0], [12.0, 4.0, 20.0]]), torch.tensor([[0.0, 0.0, -1.0]] * 2))
    assert sorted(seen) == TRAINED

    # export renders the same blocks and reports the same untrained one
    manifest = export_tile(both, tmp_path / "out", ExportOptions(what=("ortho",), gsd=4.0, progress=False))
    assert manifest["missing_blocks"] == [UNTRAINED]


def test_a_single_run_is_one_block_for_every_reader(tmp_path):
    run = tmp_path / "run"
    write_run(run, np.array([[-3.0, -3.0, -2.0], [3.0, 3.0, 6.0]]), 0)
    assert TileRenderer.open(run).block_ids == ["block"] and list(tile_blocks(run)) == ["block"]
    assert layout.tile_georef(run).crs == GEOREF["crs"]


def test_layout_version_and_migration(both, monkeypatch):
    """A tile_config.json without a layout number (every tile before the number) reads as today;
    written, it carries the current number; a newer number is refused in one line."""
    record = {"kind": "citygen.tile_config", "version": 1, "data": "/nowhere/transforms.json", "blocks": {}}
    (both / "tile_config.json").write_text(json.dumps(record))
    assert layout.read_tile_config(both) == record and layout.layout_version(both) == 0
    assert TileRenderer.open(both).block_ids == TRAINED
    assert layout.upgraded_tile_config(record) == {**record, "layout": 1}
    assert layout.LAYOUT_VERSION == 1

    # train_tile writes the record in the current layout (the scheduler and the survey stubbed out)
    import citygen.tile

    fresh = {**record, "blocks": {"b_r0_c0": {"dir": "block_b_r0_c0"}}}
    monkeypatch.setattr(citygen.tile, "tile_tasks", lambda *a, **k: (["task"], dict(fresh)))
    monkeypatch.setattr(citygen.tile, "run_tile", lambda tasks, executor, tile_dir: "ran")
    assert citygen.tile.train_tile(both, both / "transforms.json", tiny_config()) == "ran"
    assert layout.read_tile_config(both) == {**fresh, "layout": 1} and layout.layout_version(both) == 1

    (both / "tile_config.json").write_text(json.dumps({**record, "layout": 99}))
    with pytest.raises(CitygenError, match="tile layout version 99 is newer"):
        layout.read_tile_config(both)
    assert entrypoint(["render", str(both), "--out", str(both.parent / "views")]) == 2


def test_tile_config_overrides_use_the_checked_mechanism():
    """Dotted overrides of a config given as a dict or a TrainConfig go through config.py's
    checks, like the CLI's: an unknown key and an out-of-range value are refused."""
    cfg = resolve_config(to_dict(tiny_config()), {"steps": 7, "optim.lr_grid": 0.02})
    assert cfg.steps == 7 and cfg.optim.lr_grid == 0.02 and cfg.field.n_levels == 2
    with pytest.raises(CitygenError, match="unknown config key 'nope'"):
        resolve_config(tiny_config(), {"optim.nope": 1})
    with pytest.raises(CitygenError, match="steps"):
        resolve_config(tiny_config(), {"steps": -1})
